"""Training diagnostics: which loss drives the shared weights, and how big the fused CL features are.

    python -m model.diagnose --config model/configs/demo.json --iters 100 [--set model.use_cl=false]

Runs the config's training loop (optimizer, lr and lambda schedules, data order, sampler seeds) for
--iters iterations and every --every iterations prints one JSON line with
- each loss term;
- gbb_<loss>: the norm of that loss's gradient on the backbone's parameters alone (what it teaches the
  features that the box head also uses);
- x_rms, fused_y_rms: the RMS of the mask head's ROI input X and of the fused CL term 1x1(Y) that
  ContrastMask adds to it (only with the CL head).
"""
import json

import torch
import torch.nn.functional as F

from .config import config_from_args, script_parser
from .contrastmask import build_model
from .data.build import build_dataset, prepare_data
from .data.loader import train_loader
from .engine.schedule import Schedule, sampler_seed
from .train import build_optimizer, seed_everything, total_loss


def main(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
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
    for iteration in range(args.iters):
        images, targets = next(data)
        model.roi_heads.sampler_seed = sampler_seed(cfg["seed"], iteration)
        losses = model(list(images), list(targets))
        lam = schedule.contrast_weight(iteration)
        if iteration % args.every == 0 or iteration == args.iters - 1:
            row = {"iter": iteration, "lambda": round(lam, 4)}
            row.update({k: round(float(v.detach()), 4) for k, v in losses.items()})
            row.update({k: round(v, 4) for k, v in sizes.items()})
            for name, value in losses.items():
                grads = torch.autograd.grad(value, backbone, retain_graph=True, allow_unused=True)
                row["gbb_" + name] = round(sum(float(g.pow(2).sum()) for g in grads if g is not None) ** 0.5, 5)
            print(json.dumps(row), flush=True)
        optimizer.zero_grad(set_to_none=True)
        total_loss(losses, lam).backward()
        optimizer.step()
        scheduler.step()


if __name__ == "__main__":
    main()
