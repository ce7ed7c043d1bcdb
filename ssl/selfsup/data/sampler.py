"""Which samples each process takes, in which order.

* `ResumableDistributedSampler`: training - drop_last, a permutation per epoch, any step to
  start from, and `(index, sample_seed)` pairs so that each sample's augmentation is seeded by
  its position (selfsup.rng), not by the loader worker that happens to load it;
* `StepBatchSampler`: the same batches as whole keys, for loaders that make a batch at once;
* `ShardSampler` / `shard_range`: evaluation - each sample exactly once over all processes.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..distributed import get_rank, get_world_size
from ..rng import mix_seed


class ResumableDistributedSampler(Sampler):
    """DistributedSampler with drop_last that yields `(index, sample_seed)` and can start at any
    step of an epoch.

    Every epoch draws one permutation of the dataset from (seed, epoch), keeps the largest
    multiple of the global batch, and deals it to the processes like DistributedSampler (rank r
    takes positions r, r + W, r + 2W, ...). Global step s therefore holds positions
    [s * B, (s + 1) * B) of the permutation for any number of processes W with the same global
    batch B, and each sample's seed depends on (seed, epoch, position) only.

    With `accum` K (--accum-iter) the global batch is dealt to W x K virtual processes and rank r
    takes, step by step, the micro-batches of virtual ranks r*K .. r*K + K - 1 one after another:
    what those processes of a run of W x K would take.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        accum: int = 1,
    ) -> None:
        """`batch_size` is the per-process batch (K micro-batches); the global batch is
        batch_size * num_replicas."""
        global_batch = batch_size * num_replicas
        if dataset_len < global_batch:
            raise ValueError(
                f"the dataset has {dataset_len} images, fewer than one global batch of {global_batch}; "
                "use a smaller --batch-size or more data"
            )
        if batch_size % accum:
            raise ValueError(f"a per-process batch of {batch_size} does not split into {accum} micro-batches")
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.num_replicas, self.rank, self.accum = num_replicas, rank, accum
        self.shuffle, self.seed = shuffle, seed
        self.steps_per_epoch = dataset_len // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation and skip its first `start_step` steps (for resume)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def positions(self) -> torch.Tensor:
        """Positions in the epoch's permutation that this process visits, in order: per step, its
        micro-batches in turn, virtual rank v = rank*K + j taking v, v + W*K, v + 2*W*K, ...
        of the step's global batch."""
        world = self.num_replicas * self.accum
        micro = self.batch_size // self.accum
        steps = torch.arange(self.start_step, self.steps_per_epoch) * (self.batch_size * self.num_replicas)
        ranks = torch.arange(self.accum) + self.rank * self.accum
        # steps x K x micro: step start + virtual rank + i * world
        grid = steps.view(-1, 1, 1) + ranks.view(1, -1, 1) + torch.arange(micro).view(1, 1, -1) * world
        return grid.reshape(-1)

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.dataset_len, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = self.permutation().tolist()
        for p in self.positions().tolist():
            yield perm[p], mix_seed(self.seed, self.epoch, p, 1)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size


class StepBatchSampler:
    """The per-process batches of a ResumableDistributedSampler, each as
    `(epoch, step, [(index, seed), ...])`, so that a whole batch - and its per-step augmentation
    generator - can be made in a loader worker. The same batches as
    DataLoader(batch_size=sampler.batch_size, drop_last=True) would form."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        items = list(self.sampler)
        b = self.sampler.batch_size
        for i in range(len(items) // b):
            yield self.sampler.epoch, self.sampler.start_step + i, items[i * b : (i + 1) * b]

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size


def shard_range(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s block of range(n): sizes differ by at most one, blocks are
    disjoint, cover range(n) and follow each other in rank order."""
    return n * rank // world_size, n * (rank + 1) // world_size


class ShardSampler(Sampler[int]):
    """This process's contiguous block of range(n), in order: every sample on exactly one process.

    Unlike DistributedSampler it neither pads (which would count samples twice) nor drops any;
    a process may get one sample fewer than another, or none at all when n < world size.
    """

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.n = n
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        self.start, self.end = shard_range(n, self.num_replicas, self.rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start
