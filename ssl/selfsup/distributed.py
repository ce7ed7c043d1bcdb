"""Process-group helpers that work the same with one CPU process and with many GPU processes.

Every helper here is an identity (or a constant) when no process group is initialised, so the
models and the training loop never branch on "am I distributed?".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """What a process knows about its place in the job; immutable once set up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank; 0 when no process group exists."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes; 1 when no process group exists."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    """`requested` is 'cpu', 'cuda', 'cuda:N' or None (CUDA when available, else CPU).

    For 'cuda' without an index the process takes GPU `local_rank`, one process per GPU.
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"--device {requested} was asked for but CUDA is not available on this machine; "
                "use --device cpu (or leave --device unset to pick automatically)."
            )
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                    "start at most one process per GPU (--nproc_per_node)."
                )
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Set up the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT).

    Without those variables (or with WORLD_SIZE=1) this is a single process and no process group
    is created. The backend is nccl for CUDA devices and gloo for CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not is_dist_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        kwargs = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU, avoids a guess inside barrier()
        store, rank, world_size = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        # torchrun shares its rendezvous store with the workers, so after a --max-restarts restart
        # the new group could read the dead group's addresses (pytorch/pytorch#135712) and fail to
        # connect. Each attempt gets its own key space.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"selfsup/attempt{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if is_dist_initialized():
        dist.destroy_process_group()


def run_in_process_group(fn: Callable[..., int], args, device: str | None = None) -> int:
    """`fn(args, dist_info)` inside this process's group (torchrun's environment, or none at
    world size 1), which is torn down afterwards, also when `fn` raises. The entry scripts'
    `main`."""
    dist_info = init_distributed(device)
    try:
        return fn(args, dist_info)
    finally:
        cleanup_distributed()


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all processes in rank order along dim 0. No gradient (MoCo keys).

    x: N x ... on every process (same N) -> (world_size * N) x ...
    """
    world_size = get_world_size()
    if world_size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the gradient of its own slice, summed over
    the losses of every process.

    Each process computes a loss from the gathered tensor, so a sample's embedding influences
    the loss of every process. Summing the gathered gradients (all_reduce) and keeping one's own
    slice gives d(sum of all losses)/d(own embeddings); DistributedDataParallel then averages the
    parameter gradients over processes, which is d(mean loss)/d(parameters) - the gradient of one
    process computing the loss over the whole global batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        out = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all processes in rank order, passing gradients back (SimCLR).

    x: N x C -> (world_size * N) x C. Identity at world size 1.
    """
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across all processes for shuffle BN (MoCo, Sec. 3.3).

    Returns this process's share of a random permutation of the global batch and the index that
    undoes it. x: N x ... -> (N x ..., idx_unshuffle of length world_size * N). The permutation is
    drawn on rank 0 and broadcast so every process agrees. At world size 1: (x, arange(N)).
    """
    world_size = get_world_size()
    n = x.shape[0]
    if world_size == 1:
        return x, torch.arange(n, device=x.device)
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)
    rank = get_rank()
    return x_all[perm.view(world_size, n)[rank]], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo `batch_shuffle`: each process gets back the rows of its original samples."""
    world_size = get_world_size()
    if world_size == 1:
        return x[idx_unshuffle]
    n = x.shape[0]
    x_all = concat_all_gather(x)
    return x_all[idx_unshuffle.view(world_size, n)[get_rank()]]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy); identity at world size 1. For logging, not for gradients."""
    if get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a copy); identity at world size 1."""
    if get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
