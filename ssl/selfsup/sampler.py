"""A distributed sampler that can resume mid-epoch, and per-sample random seeds.

Exact resume needs the data of step s and its random augmentation to be a function of
(seed, epoch, s) alone - not of how many loader workers ran, which worker took which batch or
how far their random generators had advanced. So the sampler yields `(index, sample_seed)`
pairs, and the dataset seeds its augmentation with `sample_seed`.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from .distributed import all_gather_objects

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 finaliser over the sequence); deterministic
    across processes and Python versions, unlike hash() of strings."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's CPU generator and Python's for a block, then restore them.

    torchvision's v1 transforms draw from these two, so a sample's augmentation becomes a function
    of its seed. Restoring keeps the caller's random streams untouched (this runs in the main
    process when num_workers=0). Nothing else is touched: `torch.manual_seed` would also reseed
    every CUDA generator (or, before CUDA starts, queue that reseed for when it does), and with
    loading in the main process the GPU's stream - MoCo's batch shuffle and BN-split permutations
    draw from it - would restart at every sample.
    """
    cpu = torch.default_generator
    torch_state, py_state = cpu.get_state(), random.getstate()
    cpu.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        cpu.set_state(torch_state)
        random.setstate(py_state)


class ResumableDistributedSampler(Sampler):
    """DistributedSampler with drop_last that yields `(index, sample_seed)` and can start at any
    step of an epoch.

    Every epoch draws one permutation of the dataset from (seed, epoch), keeps the largest
    multiple of the global batch, and deals it to the processes like DistributedSampler (rank r
    takes positions r, r + W, r + 2W, ...). Global step s therefore holds positions
    [s * B, (s + 1) * B) of the permutation for any number of processes W with the same global
    batch B, and each sample's seed depends on (seed, epoch, position) only.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        """`batch_size` is the per-process batch; the global batch is batch_size * num_replicas."""
        global_batch = batch_size * num_replicas
        if dataset_len < global_batch:
            raise ValueError(
                f"the dataset has {dataset_len} images, fewer than one global batch of {global_batch}; "
                "use a smaller --batch-size or more data"
            )
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.steps_per_epoch = dataset_len // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation and skip its first `start_step` steps (for resume)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def positions(self) -> range:
        """Positions in the epoch's permutation that this process visits, in order."""
        total = self.steps_per_epoch * self.batch_size * self.num_replicas
        start = self.start_step * self.batch_size * self.num_replicas + self.rank
        return range(start, total, self.num_replicas)

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.dataset_len, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = self.permutation().tolist()
        for p in self.positions():
            yield perm[p], mix_seed(self.seed, self.epoch, p, 1)

    def __len__(self) -> int:
        return len(self.positions())


def capture_rng_state() -> dict:
    """This process's random generators as plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states() -> list[dict]:
    """Every process's `capture_rng_state()`, in rank order (a collective on every process), so
    rank 0 can store them all in one checkpoint."""
    return all_gather_objects(capture_rng_state())


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
