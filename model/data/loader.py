"""Data order for training that any run can reproduce and resume exactly.

Global batch b of epoch e is a slice of a permutation drawn from (seed, e); each rank takes its
share of every global batch, and each sample's flip is drawn together with the permutation. The
order is therefore a pure function of (seed, iteration): resuming at iteration k only needs k.
"""
import torch


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches as lists of (index, flip) keys, forever, from a start iteration."""

    def __init__(self, dataset_size, batch_size, seed, start_iter=0, rank=0, world_size=1, flip_prob=0.5):
        self.dataset_size = dataset_size
        self.batch_size = batch_size  # per rank
        self.global_batch = batch_size * world_size
        if dataset_size < self.global_batch:
            raise ValueError(f"dataset of {dataset_size} images is smaller than one global batch ({self.global_batch})")
        self.iters_per_epoch = dataset_size // self.global_batch  # the tail of each epoch is dropped
        self.seed, self.start_iter, self.rank, self.flip_prob = seed, start_iter, rank, flip_prob

    def epoch_order(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(self.dataset_size, generator=g)
        flips = torch.rand(self.dataset_size, generator=g) < self.flip_prob
        return order.tolist(), flips.tolist()

    def __iter__(self):
        iteration = self.start_iter
        while True:
            epoch, step = divmod(iteration, self.iters_per_epoch)
            order, flips = self.epoch_order(epoch)
            for b in range(step, self.iters_per_epoch):
                start = b * self.global_batch + self.rank * self.batch_size
                yield [(order[i], flips[i]) for i in range(start, start + self.batch_size)]
            iteration = (epoch + 1) * self.iters_per_epoch

    def __len__(self):  # infinite in practice; DataLoader only needs a number
        return 2**62


def collate(batch):
    return tuple(zip(*batch))


def train_loader(dataset, batch_size, seed, start_iter, rank, world_size, flip_prob, num_workers):
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, start_iter, rank, world_size, flip_prob)
    # its own generator: creating the iterator must not draw from the global RNG (exact resume)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset, batch_size, num_workers, rank=0, world_size=1):
    """Sequential batches of this rank's share of the dataset (every world_size-th image)."""
    indices = list(range(rank, len(dataset), world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate, generator=torch.Generator().manual_seed(0))
