"""Train ContrastMask (or the baseline) from a config.

    python -m model.train --config model/configs/demo.json
    python -m model.train --config model/configs/demo.json --set train.length=100 model.use_cl=false
    torchrun --nproc_per_node 2 -m model.train --config ...        # DistributedDataParallel
    python -m model.train --config ... --resume                    # continue from output_dir/checkpoint.pt

Writes into output_dir: checkpoint.pt (every train.checkpoint_every iterations and at the end,
atomically; tensors and plain data only, read with weights_only=True), metrics.jsonl (window means
of every loss, lr, lambda), loss.png, config.json and final.json (iteration, contrastive-loss
backend, contrastive queries global or per process, per-rank weight digests).
"""
import json
import math
import os
import random
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .config import config_from_args, script_parser
from .contrastmask import build_model
from .contrastmask.contrast_loss import backend as contrast_backend
from .data.build import build_dataset, prepare_data
from .data.loader import train_loader
from .engine import checkpoint as ckpt
from .engine.distributed import (all_gather_object, barrier, cleanup, contrast_process_group, global_queries_enabled,
                                 init_distributed, mean_over_ranks)
from .engine.metrics import MetricsLog, plot_metrics
from .engine.schedule import Schedule, sampler_seed


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params, tc):
    """The optimizer of config["train"] tc, its lr scaled linearly from base_batch to images_per_batch."""
    lr = tc["base_lr"] * tc["images_per_batch"] / tc["base_batch"]  # linear scaling rule
    if tc["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=tc["momentum"], weight_decay=tc["weight_decay"])
    if tc["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=tc["weight_decay"])
    raise ValueError(f"train.optimizer must be sgd or adamw, got {tc['optimizer']!r}")


def total_loss(losses, lam, contrast_factor=1.0):
    """Eq. 5: L = L_box (RPN + box head) + L_mask + lambda L_con (L_con times contrast_factor: see train)."""
    return sum(lam * contrast_factor * v if name == "loss_contrast" else v for name, v in losses.items())


def contrast_queries_mode(cfg, info):
    """What final.json and the start-up line report: "global" (queries and keys over every process's ROIs),
    "per_process", or None without the contrastive loss. A single process is "global" whatever
    contrast.global_queries says: its ROIs are the whole batch, so its loss is the global batch's."""
    if not cfg["model"]["use_cl"]:
        return None
    if not info.distributed:
        return "global"
    return "global" if global_queries_enabled(info, cfg["contrast"]["global_queries"]) else "per_process"


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--resume", nargs="?", const="auto", help="checkpoint to resume from (default: output_dir's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def train(cfg, resume=None, device=None, progress=True):
    """Runs (or continues) the training described by cfg; returns the final.json record."""
    info = init_distributed(device)
    out_dir = cfg["output_dir"]
    tc, dc = cfg["train"], cfg["data"]
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        prepare_data(dc)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    barrier(info)

    dataset = build_dataset(dc, "train")
    if tc["images_per_batch"] % info.world_size:
        raise ValueError("train.images_per_batch must be a multiple of the number of processes")
    per_rank_batch = tc["images_per_batch"] // info.world_size
    schedule = Schedule(tc, cfg["contrast"], len(dataset) // tc["images_per_batch"])
    if schedule.iters_per_epoch < 1:
        raise ValueError(f"{len(dataset)} training images cannot fill one batch of {tc['images_per_batch']}")

    seed_everything(cfg["seed"])  # same initial weights on every rank
    model = build_model(cfg["model"], cfg["contrast"], dataset.num_classes).to(info.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    use_amp = bool(tc["amp"]) and info.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    seed_everything(cfg["seed"] * 1000 + info.rank)  # then each rank draws its own samples

    start_iter = 0
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if resume:
        # a missing, corrupt or foreign checkpoint is an error (CheckpointError), never a fresh start
        state = ckpt.load(ckpt_path if resume == "auto" else resume, require=ckpt.TRAINING_KEYS)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"][info.rank])
        start_iter = state["iteration"]

    # Global queries: the ranks' loss is that of the global batch, each rank's gradient its rows' share of
    # it, so DDP's mean over ranks would divide L_con's gradient by the world size; contrast_factor undoes it.
    queries_mode = contrast_queries_mode(cfg, info)
    model.roi_heads.contrast_process_group = contrast_process_group(info, cfg["contrast"]["global_queries"])
    contrast_factor = info.world_size if model.roi_heads.contrast_process_group is not None else 1
    seed_rank = 0 if queries_mode == "global" else info.rank  # global: the ranks sample one batch's keys
    if info.is_main:
        print(f"train: {info.world_size} process(es), contrastive queries: {queries_mode}", flush=True)

    net = model
    if info.distributed:
        net = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                      find_unused_parameters=tc["find_unused_parameters"])
    loader = train_loader(dataset, per_rank_batch, cfg["seed"], start_iter, info.rank, info.world_size,
                          tc["flip_prob"], dc["num_workers"])
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), start_iter if resume else None) if info.is_main else None
    backend = contrast_backend(info.device.type)

    def save(iteration):
        rngs = all_gather_object(info, ckpt.rng_state())
        if info.is_main:
            ckpt.save_atomic(ckpt.training_checkpoint(model, optimizer, scheduler, scaler, rngs, iteration, cfg),
                             ckpt_path)

    bar = tqdm(total=schedule.max_iters, initial=start_iter, disable=not (progress and info.is_main),
               dynamic_ncols=True, desc="train")
    net.train()
    window, window_start, t0 = {}, time.time(), time.time()
    iteration = start_iter
    data = iter(loader)
    while iteration < schedule.max_iters:
        images, targets = to_device(*next(data), info.device)
        lam = schedule.contrast_weight(iteration)
        model.roi_heads.sampler_seed = sampler_seed(cfg["seed"], iteration, seed_rank)
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            losses = net(images, targets)
            loss = total_loss(losses, lam)  # what the log shows
            objective = total_loss(losses, lam, contrast_factor) if contrast_factor != 1 else loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        if tc["clip_grad_norm"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, tc["clip_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        iteration += 1

        for name, value in dict(losses, loss=loss).items():
            window[name] = window.get(name, 0.0) + value.detach().float()
        window_len = (iteration - start_iter - 1) % tc["log_every"] + 1
        if window_len == tc["log_every"] or iteration == schedule.max_iters:
            means = mean_over_ranks(info, {k: v / window_len for k, v in window.items()})
            if info.is_main:
                if not all(math.isfinite(v) for v in means.values()):
                    raise FloatingPointError(f"non-finite loss at iteration {iteration}: {means}")
                log.write({"iter": iteration, "epoch": iteration / schedule.iters_per_epoch,
                           "lr": optimizer.param_groups[0]["lr"], "lambda": lam,
                           "sec_per_iter": (time.time() - window_start) / window_len, **means})
                bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}")
            window, window_start = {}, time.time()
        bar.update(1)
        if iteration % tc["checkpoint_every"] == 0 and iteration < schedule.max_iters:
            save(iteration)
    bar.close()
    if iteration > start_iter or not os.path.exists(ckpt_path):
        save(iteration)

    digests = all_gather_object(info, ckpt.weights_digest(model))
    final = {"iteration": iteration, "world_size": info.world_size, "contrast_backend": backend,
             "contrast_queries": queries_mode, "rank_weight_digests": digests, "train_seconds": time.time() - t0}
    if info.is_main:
        with open(os.path.join(out_dir, "final.json"), "w") as f:
            json.dump(final, f, indent=2)
        plot_metrics(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"))
    barrier(info)
    cleanup(info)
    return final


def main(argv=None):
    args = parse_args(argv)
    cfg = config_from_args(args)
    final = train(cfg, resume=args.resume, device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: final[k] for k in ("iteration", "contrast_backend", "contrast_queries", "train_seconds")}))


if __name__ == "__main__":
    main()
