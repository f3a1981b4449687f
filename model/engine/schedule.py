"""Iteration-based schedules: learning rate (linear warm-up, x0.1 steps) and the lambda of L_con."""
import bisect


def contrast_weight(progress, start=0.25, end=1.0, warmup=1.0):
    """lambda of Eq. 5, warmed up linearly from start to end over `warmup` units of progress."""
    if warmup <= 0:
        return end
    t = min(max(progress / warmup, 0.0), 1.0)
    return start + (end - start) * t


def sampler_seed(run_seed, iteration, rank=0):
    """The key sampler's seed for one training step: a pure function of the run's seed, the iteration
    and the rank (so resume is exact, and the loss never draws from torch's global generator)."""
    x = (run_seed * 0x9E3779B97F4A7C15 + iteration * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % 2**64
    return x - 2**64 if x >= 2**63 else x

def lr_factor(iteration, steps, warmup_iters, warmup_factor, gamma=0.1):
    factor = gamma ** bisect.bisect_right(steps, iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


class Schedule:
    """Turns the config's train section into iteration counts for a dataset of a given size."""

    def __init__(self, train_cfg, contrast_cfg, iters_per_epoch):
        unit = {"epoch": iters_per_epoch, "iter": 1}[train_cfg["unit"]]
        self.iters_per_epoch = iters_per_epoch
        self.max_iters = int(round(train_cfg["length"] * unit))
        self.steps = [int(round(s * unit)) for s in train_cfg["lr_steps"]]
        self.warmup_iters = train_cfg["warmup_iters"]
        self.warmup_factor = train_cfg["warmup_factor"]
        self.lambda_warmup_iters = contrast_cfg["lambda_warmup"] * unit
        if contrast_cfg["lambda_schedule"] not in ("linear", "epoch_step"):
            raise ValueError(f"contrast.lambda_schedule must be linear or epoch_step, got {contrast_cfg['lambda_schedule']!r}")
        self.lambda_schedule = contrast_cfg["lambda_schedule"]
        self.lambda_start, self.lambda_end = contrast_cfg["lambda_start"], contrast_cfg["lambda_end"]

    def contrast_weight(self, iteration):
        """lambda of Eq. 5 at this iteration: warmed up linearly from lambda_start to lambda_end, either
        every iteration ("linear") or once per epoch, from the epoch's first iteration ("epoch_step")."""
        progress = iteration
        if self.lambda_schedule == "epoch_step":
            progress = iteration - iteration % self.iters_per_epoch
        return contrast_weight(progress, self.lambda_start, self.lambda_end, self.lambda_warmup_iters)

    def lr_factor(self, iteration):
        return lr_factor(iteration, self.steps, self.warmup_iters, self.warmup_factor)
