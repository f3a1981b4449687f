"""`make gpu-check`: every check that needs a GPU, in one command, on a machine whose Python already has a
CUDA build of torch (any recent version, e.g. 2.11) and that can download nothing. No venv, no install.

    make gpu-check                          # = python3 tools/gpu_check.py
    make gpu-check GPU_PYTHON=/path/python  # another interpreter
    python3 tools/gpu_check.py --quick      # short benchmark sweep (results named ...-quick, not committed)

Steps (each reported in the summary at the end, with its log under build/gpu-check/):
  1. environment: torch and its CUDA version, the GPU, the CUDA toolkit (tools/find_cuda.py), which optional
     packages are missing and what is skipped because of them;
  2. build the extension in place against this torch (`setup.py build_ext --inplace`, CONTRASTMASK_CUDA=1);
  3. -- from here on a GPU is needed; without one the run stops here with exit status 2 --
     `pytest tests -m cuda` (every test that needs a GPU carries the marker: the device-parametrised cases'
     cuda rows and the CUDA-only tests; tests/toolchain/test_gpu_check.py holds them to it);
  4. compute-sanitizer memcheck and racecheck over tools/gpu_sanitize_ops.py (when compute-sanitizer exists);
  5. the benchmark sweep on CUDA with the model-step benchmark (python -m benchmarks.run --device cuda):
     benchmarks/results/cuda-<gpu>-<date>.json and its plots;
  6. measured beside predicted per kernel (python -m benchmarks.gpu_measure: the newest committed
     benchmarks/results/gpu-model-*.json against torch.profiler): benchmarks/results/cuda-<gpu>-<date>-kernels.json.
Exit status: 0 all steps that ran passed (steps skipped for a missing package or tool are listed),
1 a step failed, 2 no GPU visible (steps 1-2 ran; nothing GPU-side was checked).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOGS = REPO / "build" / "gpu-check"
OPTIONAL = {  # package: what needs it
    "pytest": "the test steps",
    "scipy": "the per-ROI benchmark column and the scipy-based tests",
    "matplotlib": "the benchmark plots",
    "torchvision": "the model-step benchmark and the model tests",
    "pycocotools": "the COCO data tests",
    "ninja": "a parallel build (without it the build is serial)",
}


class Steps:
    def __init__(self):
        self.rows = []  # (name, status, detail)

    def add(self, name, status, detail=""):
        self.rows.append((name, status, detail))
        print(f"\n==> {name}: {status}{' - ' + detail if detail else ''}", flush=True)

    def failed(self):
        return any(status == "FAIL" for _, status, _ in self.rows)

    def summary(self, extra=()):
        width = max(len(n) for n, _, _ in self.rows)
        lines = ["", "=" * 100, "gpu-check summary", "=" * 100]
        lines += [f"{n:<{width}}  {s:<7}  {d}" for n, s, d in self.rows]
        lines += list(extra)
        lines.append("=" * 100)
        return "\n".join(lines)


def run(cmd, log_name, env=None, timeout=None):
    """Runs cmd with its output shown and kept in build/gpu-check/<log_name>.log; returns the exit status."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{log_name}.log"
    print(f"$ {' '.join(map(str, cmd))}   (log: {log.relative_to(REPO)})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return 124


def have(module):
    return importlib.util.find_spec(module) is not None


def junit_counts(path):
    """(passed, failed, errors, skipped, collection errors as file names) from a pytest junit XML."""
    root = ET.parse(path).getroot()
    passed = failed = errors = skipped = 0
    uncollected = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None:
            failed += 1
        elif case.find("error") is not None:
            if "collection failure" in (case.find("error").get("message") or ""):
                uncollected.append(case.get("name") or case.get("classname"))
            else:
                errors += 1
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, errors, skipped, uncollected


def pytest_step(steps, name, args, missing, log_name):
    xml = LOGS / f"{log_name}.xml"
    rc = run([sys.executable, "-m", "pytest", "tests", "-q", "-ra", "-p", "no:cacheprovider",
              "--continue-on-collection-errors", f"--junitxml={xml}", *args], log_name)
    if rc == 5:
        steps.add(name, "SKIPPED", "no test selected in this tree")
        return
    if not xml.exists():
        steps.add(name, "FAIL", f"pytest exit {rc}, no report")
        return
    passed, failed, errors, skipped, uncollected = junit_counts(xml)
    detail = f"{passed} passed, {failed} failed, {errors} errors, {skipped} skipped"
    if uncollected:
        detail += f"; not collected: {', '.join(uncollected)}"
        if missing:
            detail += f" (missing packages: {', '.join(missing)})"
    ok = failed == 0 and errors == 0 and (not uncollected or missing)
    steps.add(name, "PASS" if ok else "FAIL", detail)


def bench_summary(json_path):
    """The targets' verdicts and the model step, from the sweep's JSON."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.model_step import summary

    data = json.loads(Path(json_path).read_text())
    lines = ["benchmark targets (" + str(Path(json_path).relative_to(REPO)) + "):"]
    for row in data["meta"].get("targets", []):
        figure = "-" if row["figure"] is None else f"{row['figure']:.3g}{row['unit']}"
        lines.append(f"  {row['device']:<5} {row['target']:<80} {row['bar']:>8} {figure:>10}  {row['verdict']}")
    lines.append("model step: " + (summary(data["model_step"]) if data.get("model_step") else "not measured"))
    return lines


def find_sanitizer(toolkit_home):
    candidates = [shutil.which("compute-sanitizer")]
    for home in filter(None, [toolkit_home, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]):
        candidates += [os.path.join(home, "bin", "compute-sanitizer"),
                       os.path.join(home, "compute-sanitizer", "compute-sanitizer")]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None), candidates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short benchmark sweep (--quick): not for committing")
    p.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    p.add_argument("--no-bench", action="store_true", help="leave out the benchmark sweep")
    args = p.parse_args(argv)
    steps = Steps()
    extra = []
    started = time.time()

    # 1. environment
    try:
        import torch
    except ImportError:
        steps.add("environment", "FAIL", f"{sys.executable} has no torch: run with a Python that has a CUDA torch "
                                         "(make gpu-check GPU_PYTHON=...)")
        print(steps.summary())
        return 1
    missing = [m for m in OPTIONAL if not have(m)]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        sm = "".join(map(str, torch.cuda.get_device_capability(0)))
        gpu_text = f"{gpus} GPU(s): {torch.cuda.get_device_name(0)} (sm_{sm})"
    else:
        gpu_text = "no GPU visible"
    env_detail = f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu_text}"
    if torch.version.cuda is None:
        steps.add("environment", "FAIL", env_detail + "; this torch is a CPU-only build")
        print(steps.summary())
        return 2
    import find_cuda  # beside this script (sys.path[0] when run as tools/gpu_check.py)
    search = find_cuda.find_toolkit(torch.version.cuda)
    toolkit_home = search.toolkit.home if search.toolkit else None
    steps.add("environment", "PASS", env_detail + f"; toolkit: {search.reason}")
    for module in missing:
        extra.append(f"missing package {module}: skips {OPTIONAL[module]}")
    if "pytest" in missing:
        extra.append("without pytest no test step runs")

    # 2. build in place
    if args.skip_build:
        steps.add("build", "SKIPPED", "--skip-build")
    elif search.toolkit is None:
        steps.add("build", "FAIL", "no usable CUDA toolkit:\n" + search.message())
    else:
        env = dict(os.environ, CONTRASTMASK_CUDA="1")
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        t0 = time.time()
        rc = run([sys.executable, "setup.py", "build_ext", "--inplace"], "build", env=env)
        steps.add("build", "PASS" if rc == 0 else "FAIL",
                  f"setup.py build_ext --inplace, {time.time() - t0:.0f} s" + ("" if rc == 0 else f", exit {rc}"))
    info_proc = subprocess.run(
        [sys.executable, "-c", "import json, contrastmask_ops as cm; print(json.dumps(cm.build_info()))"],
        cwd=REPO, capture_output=True, text=True)
    try:
        info = json.loads(info_proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"error": info_proc.stderr[-2000:]}
    built_ok = bool(info.get("cuda"))
    steps.add("build_info", "PASS" if built_ok else "FAIL",
              f"cuda={info.get('cuda')}, arch list {info.get('cuda_arch_list')}, built with torch "
              f"{info.get('built_with_torch')}" if "error" not in info else info["error"])

    # 3.- everything below needs a GPU
    if not gpus:
        rest = ["pytest -m cuda", "compute-sanitizer memcheck", "compute-sanitizer racecheck",
                "benchmark sweep + model step", "kernels: measured vs predicted"]
        for name in rest:
            steps.add(name, "NOT RUN", "no GPU")
        print(steps.summary(extra + [
            "NO GPU: torch.cuda.is_available() is False on this machine. The build ran; every GPU check above "
            "was not run. Exit status 2."]))
        return 2
    if steps.failed():
        print(steps.summary(extra + ["stopped: the build failed"]))
        return 1

    if "pytest" in missing:
        steps.add("pytest -m cuda", "SKIPPED", "pytest is not installed")
    else:
        pytest_step(steps, "pytest -m cuda", ["-m", "cuda"], missing, "pytest-cuda")

    # 4. compute-sanitizer
    sanitizer, looked = find_sanitizer(toolkit_home)
    for tool in ("memcheck", "racecheck"):
        name = f"compute-sanitizer {tool}"
        if sanitizer is None:
            steps.add(name, "SKIPPED", "compute-sanitizer not found (looked in: PATH, "
                                       + ", ".join(c for c in looked[1:]) + ")")
            continue
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # memcheck sees every allocation's bounds
        rc = run([sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "20",
                  sys.executable, "tools/gpu_sanitize_ops.py"], f"sanitizer-{tool}", env=env)
        steps.add(name, "PASS" if rc == 0 else "FAIL", f"exit {rc}")

    # 5. benchmarks (the model step is part of the sweep on CUDA)
    if args.no_bench:
        steps.add("benchmark sweep + model step", "SKIPPED", "--no-bench")
    else:
        cmd = [sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--model-step", "on"]
        if args.quick:
            cmd.append("--quick")
        if "scipy" in missing:
            cmd += ["--impls", "fused", "reference"]
            extra.append("benchmark: per-ROI column left out (scipy missing)")
        rc = run(cmd, "benchmarks")
        log = (LOGS / "benchmarks.log").read_text()
        wrote = [line for line in log.splitlines() if line.startswith("wrote ")]
        detail = wrote[-1] if wrote else "no results written"
        steps.add("benchmark sweep + model step", "PASS" if rc == 0 else "FAIL",
                  detail + ("" if rc == 0 else f"; exit {rc}"))
        if wrote:
            extra += bench_summary(REPO / wrote[-1].split()[1].rstrip(","))

    # 6. the memory-traffic model's prediction beside the measurement, per kernel (calibrates the model)
    rc = run([sys.executable, "-m", "benchmarks.gpu_measure"], "gpu-measure")
    log = (LOGS / "gpu-measure.log").read_text()
    wrote = [line for line in log.splitlines() if line.startswith("wrote ")]
    total = [line for line in log.splitlines() if line.startswith("| all |")]
    steps.add("kernels: measured vs predicted", "PASS" if rc == 0 else "FAIL",
              (wrote[-1] if wrote else "no results written") + (f"; {total[-1]}" if total else "")
              + ("" if rc == 0 else f"; exit {rc}"))

    extra.append(f"gpu-check took {time.time() - started:.0f} s; logs in {LOGS.relative_to(REPO)}/")
    print(steps.summary(extra))
    return 1 if steps.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
