"""The demo: synthetic shapes data -> train ContrastMask -> novel/base table -> picture.

    python -m model.demo                      # model/configs/demo.json, into runs/demo/
    python -m model.demo --set train.length=100 --output-dir runs/quick

Base categories (masks during training): circle, square, triangle, star, cross.
Novel categories (boxes only): ellipse, hexagon, ring, heart, crescent.
"""
import contextlib
import json
import os
import time

import torch

from .config import config_from_args, script_parser
from .data.build import prepare_data
from .evaluate import evaluate, format_table
from .train import train
from .visualize import visualize

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo.json")


@contextlib.contextmanager
def _step(times, name, title):
    """Prints the step's title; times[name] = the seconds the step took."""
    start = time.time()
    print(title, flush=True)
    yield
    times[name] = time.time() - start


def main(argv=None):
    args = script_parser(__doc__, default_config=DEFAULT_CONFIG).parse_args(argv)
    cfg = config_from_args(args)
    out = cfg["output_dir"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"ContrastMask demo on {device} ({torch.get_num_threads()} CPU threads); output in {out}/", flush=True)
    times = {}
    with _step(times, "data", "[1/4] shapes dataset"):
        prepare_data(cfg["data"])
    with _step(times, "train", f"[2/4] training ({cfg['train']['length']} {cfg['train']['unit']}s)"):
        final = train(cfg, device=args.device)
    with _step(times, "evaluate", "[3/4] evaluation"):
        record = evaluate(cfg, device=args.device)
    with _step(times, "picture", "[4/4] picture"):
        picture = visualize(cfg, device=args.device)
    times["total"] = sum(times.values())

    table = format_table(record["metrics_percent"])
    summary = {"device": device, "threads": torch.get_num_threads(), "iterations": final["iteration"],
               "contrast_backend": final["contrast_backend"], "seconds": {k: round(v, 1) for k, v in times.items()},
               "metrics_percent": record["metrics_percent"], "table": table, "picture": picture,
               "loss_plot": os.path.join(out, "loss.png")}
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print()
    print(f"novel (boxes only in training): {', '.join(record['novel_categories'])}")
    print(f"base  (masks in training):      {', '.join(record['base_categories'])}")
    print(f"{record['images']} validation images, {final['iteration']} iterations, "
          f"contrastive loss: {final['contrast_backend']} op")
    print(table)
    print("(one training run: runs of the same config with other seeds differ by a few AP points; the spread\n"
          " over seeds is in model/results/ablation-shapes-category-v2.md, from python -m model.ablate)")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"picture: {picture}\nloss curves: {summary['loss_plot']}")


if __name__ == "__main__":
    main()
