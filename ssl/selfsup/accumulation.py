"""Gradient accumulation that keeps a recipe: K micro-batches per process stand for K processes.

A run of W processes with `--accum-iter K` trains the weights a run of W x K processes would
train with the same global batch. Micro-batch j of process r is virtual process v = r*K + j in
everything that defines the result: its samples (selfsup.data.sampler deals the global batch to
the W x K virtual processes), its augmentation draws (selfsup.rng.augment_generator of v), its
BatchNorm group (each micro-batch is one forward pass), its random streams (selfsup.rng.MicroStreams)
and its place in every gather (`Accumulation.gather`: virtual-rank order).

A method splits its step in three (selfsup.methods.base.Method): `prepare` computes, without
gradient, what the step's loss needs from the whole global batch (MoCo's keys, BYOL's targets,
SimCLR's embedding gradients); the engine then runs each micro-batch's `objective` through the
DDP wrapper and backward (scaled by 1/K; DDP all-reduces on the last micro-batch only); `finish`
does what follows the step once (MoCo's enqueue). BatchNorm running statistics change on
micro-batch 0 only: a run of W x K processes saves its rank 0's, which saw only its own batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from .cli import per_process_batch
from .distributed import concat_all_gather, get_rank, get_world_size
from .errors import UsageError
from .rng import MicroStreams


@dataclass
class Accumulation:
    """One optimizer step's K micro-batches on this process (K = 1: no accumulation), standing for
    processes rank*K .. rank*K + K - 1 of a run of world_size x K processes."""

    k: int = 1
    streams: MicroStreams | None = None  # the micro-batches' random streams (None: the live ones)

    @property
    def world_size(self) -> int:
        """How many processes the run stands for: the real ones times K."""
        return get_world_size() * self.k

    def rank(self, j: int) -> int:
        """The virtual rank of micro-batch j."""
        return get_rank() * self.k + j

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Every virtual process's tensor, concatenated in virtual-rank order (no gradient):
        `parts` are this process's micro-batches'. (K x N) x ... -> (world_size x N) x ..."""
        return concat_all_gather(parts[0] if len(parts) == 1 else torch.cat(parts))

    @contextlib.contextmanager
    def micro(self, j: int, *modules: nn.Module, keep_statistics: bool | None = None) -> Iterator[None]:
        """A block of micro-batch j's work: it draws from j's random stream, and the BatchNorm
        running statistics of `modules` stay as they were unless `keep_statistics` is False
        (default: kept for j > 0, so that they follow micro-batch 0 alone, as rank 0's do)."""
        keep = j > 0 if keep_statistics is None else keep_statistics
        with (self.streams.slot(j) if self.streams is not None else contextlib.nullcontext()):
            with (frozen_bn_statistics(modules) if keep and modules else contextlib.nullcontext()):
                yield


def _bn_buffers(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    return [buf for module in modules for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]


@contextlib.contextmanager
def frozen_bn_statistics(modules: Iterable[nn.Module]) -> Iterator[None]:
    """A block after which the BatchNorm running statistics of `modules` are what they were before
    (forward passes in train mode still normalise with their batch's statistics)."""
    buffers = _bn_buffers(modules)
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def micro_batches(global_batch: int, world_size: int, accum_iter: int | None,
                  micro_batch: int | None) -> tuple[int, int]:
    """(K, per-process batch) from --batch-size (global), the number of processes and either
    --accum-iter K or --micro-batch N (N = global / (processes x K)). Raises ValueError with the
    numbers and a fix when they do not divide."""
    if accum_iter is not None and micro_batch is not None:
        raise UsageError("--accum-iter and --micro-batch say the same thing two ways: give one of them")
    per_process = per_process_batch(global_batch, world_size)
    if micro_batch is not None:
        if micro_batch <= 0 or per_process % micro_batch:
            fits = [n for n in range(1, per_process + 1) if per_process % n == 0 and n <= micro_batch] or [1]
            raise UsageError(f"--micro-batch {micro_batch} does not divide the {per_process} images of each of the "
                             f"{world_size} process(es) (global batch {global_batch}); e.g. --micro-batch {fits[-1]}")
        return per_process // micro_batch, per_process
    k = accum_iter or 1
    if k <= 0 or per_process % k:
        raise UsageError(f"--accum-iter {k}: the {per_process} images of each of the {world_size} process(es) "
                         f"(global batch {global_batch}) do not split into {k} micro-batches; choose K dividing "
                         f"{per_process}")
    return k, per_process


def batch_line(global_batch: int, world_size: int, k: int) -> str:
    """'global batch 4096 = 2 processes x 8 micro-batches of 256' (or '... = 8 processes x 512')."""
    per = global_batch // (world_size * k)
    if k > 1:
        return f"global batch {global_batch} = {world_size} process(es) x {k} micro-batches of {per}"
    return f"global batch {global_batch}" + (f" = {world_size} processes x {per}" if world_size > 1 else "")
