"""Running the arms: one run's resolved config and folder, training and evaluating it under a run lock
(several processes can share a study), and the finished runs a report covers."""
import json
import os
import time

from ..config import load_config
from ..engine.locks import claim, release
from .digest import config_digest
from .protocol import ARMS


def run_config(base_config, arm, seed, out_root, extra=(), study=None):
    overrides = (study.arm_overrides if study else {}).get(arm, ARMS[arm][0])
    cfg = load_config(base_config, [*overrides, f"seed={seed}", *extra])
    cfg["output_dir"] = os.path.join(out_root, arm, f"seed{seed}")
    return cfg


def folder_holds(out, cfg):
    """Whether the run folder out holds this run: its config.json (written when training starts) has the
    same seed and config digest. A folder without one has nothing to reuse."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return True
    with open(path) as f:
        saved = json.load(f)
    return saved.get("seed") == cfg["seed"] and config_digest(saved) == config_digest(cfg)


def run_one(cfg, device=None, progress=False):
    """Trains (or resumes) and evaluates one run; writes and returns its result.json record, or None
    when another process is running it. A folder left by another config is an error, never reused."""
    from ..evaluate import evaluate
    from ..train import train

    out = cfg["output_dir"]
    if not folder_holds(out, cfg):
        raise RuntimeError(f"{out} holds a run of another config or seed (its config.json differs from this "
                           f"run's, digest {config_digest(cfg)}): move it away, or pass --out-dir")
    result_path = os.path.join(out, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    if not claim(out):
        return None
    try:
        return _train_and_evaluate(cfg, device, progress, evaluate, train)
    finally:
        release(out)


def _train_and_evaluate(cfg, device, progress, evaluate, train):
    out = cfg["output_dir"]
    result_path = os.path.join(out, "result.json")
    resume = "auto" if os.path.exists(os.path.join(out, "checkpoint.pt")) else None
    start = time.time()
    final = train(cfg, resume=resume, device=device, progress=progress)
    train_seconds = time.time() - start
    start = time.time()
    record = evaluate(cfg, device=device, progress=progress, gt_boxes=True)
    result = {"iterations": final["iteration"], "contrast_backend": final["contrast_backend"],
              "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.time() - start, 1),
              "images": record["images"], "detected": record["metrics"], "gt_boxes": record["gt_boxes"]}
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(result_path + ".tmp", result_path)
    return result


def collect(base_config, arms, seeds, out_root, extra=(), recorded=None, study=None):
    """The finished runs: each run folder's result.json (when the folder holds this run), else the results
    file's record of that run."""
    runs = []
    for seed in seeds:
        for arm in arms:
            cfg = run_config(base_config, arm, seed, out_root, extra, study)
            path = os.path.join(cfg["output_dir"], "result.json")
            if os.path.exists(path) and folder_holds(cfg["output_dir"], cfg):
                with open(path) as f:
                    runs.append({"arm": arm, "seed": seed, "metrics": json.load(f)})
            elif recorded and (arm, seed) in recorded:
                runs.append({"arm": arm, "seed": seed, "metrics": recorded[(arm, seed)]})
    return runs
