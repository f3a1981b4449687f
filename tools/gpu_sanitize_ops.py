"""Every CUDA kernel of the extension once, on small inputs, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/gpu_sanitize_ops.py

Shapes cover the plan's odd sizes (13x21, 1x64, 64x1), a 64x64 ROI, N = 0, all ROIs dropped, both
formulations, share on/off and float32/float16/bfloat16 z; integer outputs are compared with the CPU
kernels so a wrong result fails here too. Run by `make gpu-check` (tools/gpu_check.py).
`--device cpu` runs the same script on the CPU kernels (a check of the script itself, no GPU needed).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's in-place build, run from anywhere
import contrastmask_ops as cm  # noqa: E402


def batch(n, h, w, c, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    yy = (torch.linspace(-1, 1, h) if h > 1 else torch.zeros(1)).view(1, h, 1)
    xx = (torch.linspace(-1, 1, w) if w > 1 else torch.zeros(1)).view(1, 1, w)
    r = 0.3 + 0.5 * torch.rand(n, 1, 1, generator=g)
    masks = (yy ** 2 + xx ** 2 + 0.2 * torch.rand(n, h, w, generator=g)) < r
    cams = (masks.float() * 0.8 + 0.2 * torch.rand(n, h, w, generator=g)).clamp(0, 1)
    is_novel = torch.arange(n) % 2 == 1
    z = torch.randn(n, c, h, w, generator=g).to(dtype)
    return masks, cams, is_novel, z


def check(n, h, w, c, seed, dtype=torch.float32, share=True, formulation="paper", min_keys=5):
    masks, cams, is_novel, z = batch(n, h, w, c, seed, dtype)
    plan_cpu = torch.ops.contrastmask.roi_plan(masks, cams, is_novel, None, 0.1, 0.3, 2, min_keys, seed)
    dev = [t.to(DEVICE) for t in (masks, cams, is_novel)]
    plan_gpu = torch.ops.contrastmask.roi_plan(*dev, None, 0.1, 0.3, 2, min_keys, seed)
    for a, b in zip(plan_cpu, plan_gpu):
        assert torch.equal(a, b.cpu()), f"roi_plan CPU != CUDA at n={n} {h}x{w}"
    labels = cm.partition(*dev, delta=0.1)
    assert torch.equal(labels.cpu(), cm.partition(masks, cams, is_novel, delta=0.1))
    sqdist = cm.boundary_sqdist(dev[0])
    assert torch.equal(sqdist.cpu(), cm.boundary_sqdist(masks))
    keys, keep = cm.sample_keys(labels, sqdist, dev[2], seed=seed, min_keys=min_keys)
    assert torch.equal(keys.cpu(), plan_cpu[1]) and torch.equal(keep.cpu(), plan_cpu[2])
    zg = z.to(DEVICE).requires_grad_()
    loss = cm.contrastive_loss_from_keys(zg, labels, keys, keep, share_queries=share, formulation=formulation)
    loss.backward()
    zg.grad = None
    loss2 = cm.query_sharing_contrastive_loss(zg, *dev, share_queries=share, formulation=formulation, seed=seed,
                                              min_keys=min_keys)
    loss2.backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    loss = loss.detach()
    assert torch.isfinite(loss).all() and torch.isfinite(zg.grad).all()
    print(f"ok n={n} {h}x{w} c={c} {str(dtype)[6:]} share={share} {formulation} min_keys={min_keys} "
          f"kept={int(keep.sum())} loss={loss.item():.5f}", flush=True)


DEVICE = "cuda"


def main():
    global DEVICE
    DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    info = cm.build_info()
    if not info["cuda" if DEVICE == "cuda" else "cpu"]:
        print(f"the extension has no {DEVICE} kernels: {info}", file=sys.stderr)
        return 1
    check(6, 28, 28, 16, seed=1)
    check(5, 13, 21, 8, seed=2, share=False)
    check(4, 28, 28, 16, seed=3, formulation="released")
    check(3, 64, 64, 8, seed=4, dtype=torch.float16)
    check(3, 1, 64, 4, seed=5, dtype=torch.bfloat16, min_keys=1)
    check(3, 64, 1, 4, seed=6, min_keys=1)
    check(4, 28, 28, 300, seed=7)
    check(0, 28, 28, 8, seed=8)
    check(4, 28, 28, 8, seed=9, min_keys=10**6)  # every ROI dropped
    print("all kernels ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
