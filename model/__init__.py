"""The ContrastMask reference model (run from the repository root: python -m model.train, model.demo, ...).

OpenMP's threads spin for a short while only (GOMP_SPINCOUNT=10000) when they wait at the end of a parallel
region, then sleep. With libgomp's default (a long spin) a team on a machine shared with other work waits
for its descheduled thread: the demo config ran 2.6 s per iteration beside one busy process, against 0.8 s
with the short spin, which alone is no slower (0.33 s against 0.38 s; OMP_WAIT_POLICY=PASSIVE: 0.60 and
0.46 s; one thread: 0.46 s either way). Figures: benchmarks/results/cpu-2026-12-03-shared-machine.json,
`python -m benchmarks.shared_machine`. Set here, before torch loads OpenMP, since the scripts import this
package first. OMP_WAIT_POLICY or GOMP_SPINCOUNT already in the environment win; with
CONTRASTMASK_KEEP_WAIT_POLICY=1 the environment is left as it is.
"""
import os

if not (os.environ.get("CONTRASTMASK_KEEP_WAIT_POLICY") or "OMP_WAIT_POLICY" in os.environ):
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
