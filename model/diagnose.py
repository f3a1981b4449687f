"""Training diagnostics: which loss drives the shared weights, and how big the fused CL features are.

    python -m model.diagnose --config model/configs/demo.json --iters 100 [--set model.use_cl=false]
    python -m model.diagnose --probes                # PROBES on the v3 ablation config, into model/results/

Runs the config's training loop (optimizer, lr and lambda schedules, data order, sampler seeds) for
--iters iterations and every --every iterations prints one JSON line with
- each loss term;
- gbb_<loss>: the norm of that loss's gradient on the backbone's parameters alone (what it teaches the
  features that the box head also uses);
- x_rms, fused_y_rms: the RMS of the mask head's ROI input X and of the fused CL term 1x1(Y) that
  ContrastMask adds to it (only with the CL head).

--probes runs PROBES, the variants that tell apart the hypotheses for the contrastive loss's cost to base
AP (README, "Does the contrastive loss help?"): E1 Y as a shortcut around X (enhance_op on / off, against
+CAM's mask gradient on the backbone), E2 the CL head's input left attached (a deliberate departure from
the authors' code), E3 the mask loss on ground-truth-box ROIs only. Each writes its rows to
<results>/<probe>.jsonl; <results>.md holds the means over the rows.
"""
import copy
import json
import os
import statistics

import torch
import torch.nn.functional as F

from .config import config_from_args, script_parser
from .contrastmask import build_model
from .data.build import build_dataset, prepare_data
from .data.loader import train_loader
from .engine.schedule import Schedule, sampler_seed
from .train import build_optimizer, seed_everything, total_loss


PROBES = {
    "cam": (["model.use_cl=false"], "+CAM (no CL head): the mask gradient to match"),
    "released": (["preset=released"], "+CAM+CL, the authors' model (enhance_op on)"),
    "released_no_enhance": (["preset=released", "model.cl_enhance=false"], "E1: the same, Y not enhanced"),
    "clhead": (["contrast.lambda_start=0", "contrast.lambda_end=0"], "+CAM, CL head at lambda 0"),
    "clhead_attached": (["contrast.lambda_start=0", "contrast.lambda_end=0", "model.cl_detach_input=false"],
                        "E2: CL head at lambda 0, input not detached"),
    "paper_attached": (["model.cl_detach_input=false"], "E2: +CAM+CL paper, input not detached"),
    "cam_gtrois": (["model.use_cl=false", "model.mask_loss_rois=gt"], "E3: +CAM, mask loss on gt-box ROIs only"),
}
PROBE_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "ablation_pretrained.json")
PROBE_RESULTS = os.path.join(os.path.dirname(__file__), "results", "diagnose-v3")
SUMMARY = ["loss_mask", "gbb_loss_mask", "gbb_loss_classifier", "gbb_loss_contrast", "x_rms", "fused_y_rms"]


def main(argv=None):
    p = script_parser(__doc__, default_config=PROBE_CONFIG)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--probes", nargs="*", choices=list(PROBES), help="run these probes (none named: all)")
    p.add_argument("--results", default=PROBE_RESULTS, help="with --probes: folder of the rows, + .md summary")
    args = p.parse_args(argv)
    if args.probes is None:
        for row in diagnose(config_from_args(args), args.iters, args.every):
            print(json.dumps(row), flush=True)
        return
    os.makedirs(args.results, exist_ok=True)
    for name in args.probes or list(PROBES):
        args_probe = argparse_copy(args, PROBES[name][0])
        with open(os.path.join(args.results, name + ".jsonl"), "w") as f:
            for row in diagnose(config_from_args(args_probe), args.iters, args.every):
                f.write(json.dumps(row) + "\n")
                f.flush()
        print(f"[diagnose] {name} done", flush=True)
    print(write_summary(args.results, args), end="")


def argparse_copy(args, overrides):
    out = copy.copy(args)
    out.set = [*args.set, *overrides]
    return out


def write_summary(folder, args):
    """<folder>.md: per probe, the mean of SUMMARY's columns over its rows (iteration 0 left out)."""
    lines = [f"`python -m model.diagnose --probes --iters {args.iters} --every {args.every}` on "
             f"{os.path.relpath(args.config)} {' '.join(args.set)}: means over the logged iterations after the first.",
             "", "| probe | what | " + " | ".join(SUMMARY) + " |", "|---" * (len(SUMMARY) + 2) + "|"]
    for name, (_, what) in PROBES.items():
        path = os.path.join(folder, name + ".jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()][1:]
        cells = []
        for key in SUMMARY:
            got = [r[key] for r in rows if key in r]
            cells.append(f"{statistics.fmean(got):.4g}" if got else "-")
        lines.append(f"| {name} | {what} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(folder.rstrip("/") + ".md", "w") as f:
        f.write(text)
    return text


def diagnose(cfg, iters, every):
    """Yields one row per logged iteration of cfg's training loop (module doc)."""
    tc = cfg["train"]
    prepare_data(cfg["data"])
    dataset = build_dataset(cfg["data"], "train")
    seed_everything(cfg["seed"])
    model = build_model(cfg["model"], cfg["contrast"], dataset.num_classes).train()
    optimizer = build_optimizer([q for q in model.parameters() if q.requires_grad], tc)
    schedule = Schedule(tc, cfg["contrast"], len(dataset) // tc["images_per_batch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    seed_everything(cfg["seed"] * 1000)
    backbone = [q for n, q in model.named_parameters() if n.startswith("backbone.") and q.requires_grad]

    sizes = {}

    def record_inputs(module, inputs):
        x, y = inputs[0], inputs[1] if len(inputs) > 1 else None
        sizes["x_rms"] = float(x.detach().pow(2).mean().sqrt())
        if y is not None and module.fuse is not None:
            with torch.no_grad():
                fused = module.fuse(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))
            sizes["fused_y_rms"] = float(fused.pow(2).mean().sqrt())

    model.roi_heads.mask_head.register_forward_pre_hook(record_inputs)
    data = iter(train_loader(dataset, tc["images_per_batch"], cfg["seed"], 0, 0, 1, tc["flip_prob"], 0))
    for iteration in range(iters):
        images, targets = next(data)
        model.roi_heads.sampler_seed = sampler_seed(cfg["seed"], iteration)
        losses = model(list(images), list(targets))
        lam = schedule.contrast_weight(iteration)
        if iteration % every == 0 or iteration == iters - 1:
            row = {"iter": iteration, "lambda": round(lam, 4)}
            row.update({k: round(float(v.detach()), 4) for k, v in losses.items()})
            row.update({k: round(v, 4) for k, v in sizes.items()})
            for name, value in losses.items():
                grads = torch.autograd.grad(value, backbone, retain_graph=True, allow_unused=True)
                row["gbb_" + name] = round(sum(float(g.pow(2).sum()) for g in grads if g is not None) ** 0.5, 5)
            yield row
        optimizer.zero_grad(set_to_none=True)
        total_loss(losses, lam).backward()
        optimizer.step()
        scheduler.step()


if __name__ == "__main__":
    main()
