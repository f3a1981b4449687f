"""Iteration-based schedules: learning rate (linear warm-up, x0.1 steps) and the lambda of L_con."""
import bisect


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

    def lr_factor(self, iteration):
        return lr_factor(iteration, self.steps, self.warmup_iters, self.warmup_factor)
