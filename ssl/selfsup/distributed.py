"""Process-group helpers that work the same with one CPU process and with many GPU processes.

Every helper here is an identity (or a constant) when no process group is initialised, so the
models and the training loop never branch on "am I distributed?".

A process learns its place in the job here and nowhere else (`launch_env`): from torchrun's
variables, or from SLURM's when srun started it without torchrun.

Every collective of the project goes through this module (tests/test_distributed.py scans the
sources for any other call). The helpers move their tensors to the process group's device and
give the results back on the caller's device: NCCL serves CUDA tensors only ("No backend type
associated with device type cpu"), and gloo, which the CPU tests use, accepts anything, so a CPU
tensor handed to a collective would pass every test and crash the first multi-GPU run.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from .meters import setup_logging

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class DistInfo:
    """What a process knows about its place in the job; immutable once set up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # the process group's backend; None when there is no group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group exists: collectives run and the model is wrapped in DDP. Usually
        world_size > 1; an explicit --dist-backend also makes a group of one process."""
        return self.backend is not None


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


def group_device() -> torch.device:
    """Where the tensors of a collective must be: the current GPU for NCCL, the CPU otherwise
    (gloo; it also takes CUDA tensors for some collectives but not all, so the CPU is the one
    device that always works)."""
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_group_device(x: torch.Tensor, copy: bool) -> torch.Tensor:
    """`x` on the group's device, contiguous; a copy (which an in-place collective may overwrite)
    when `copy`, else only moved where it has to be."""
    x = x.detach().to(group_device(), copy=copy)
    return x.contiguous()


def barrier() -> None:
    if is_dist_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Where a process's world comes from: torchrun's variables, or SLURM's in a task srun started
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job as its launcher describes it, read before any process group.

    `launcher` is 'torchrun' when RANK/WORLD_SIZE are set (torchrun, MoCo's --multiprocessing-distributed,
    submitit's local executor through tools/submitit_pretrain.py), 'srun' for a SLURM task, None for
    one process. `origin` says so in words, for the log."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node
    master_addr: str | None = None  # the rendezvous (rank 0's host and a free port on it)
    master_port: int | None = None
    cpus_per_task: int | None = None  # SLURM_CPUS_PER_TASK: the CPUs SLURM gave this process
    launcher: str | None = None
    origin: str = "one process (no RANK/WORLD_SIZE from torchrun, not an srun task)"


# Tasks per node, SLURM's compressed form: '8(x2),4' is 8 tasks on each of two nodes, 4 on a third.
_TASKS_PER_NODE = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
MAX_RANGE = 65536  # hosts in one range; SLURM's own limit (hostlist.c's MAX_RANGE)


def expand_nodelist(nodelist: str) -> list[str]:
    """The hostnames of a SLURM node list, in order, as `scontrol show hostnames` prints them.

    SLURM's grammar (src/common/hostlist.c): hosts are separated by commas or spaces outside
    brackets; a bracket holds numbers and ranges `lo-hi` separated by commas, each printed
    zero-padded to the width of its `lo` ('node[08-10]' -> node08 node09 node10); several
    brackets in one name expand as a product, the first one slowest ('r[1-2]-n[1-2]' -> r1-n1 r1-n2
    r2-n1 r2-n2), and text may follow the last ('n[1-2]-ib', which SLURM reads from 23.02.5 on).
    Raises ValueError naming the part it cannot read.
    """
    hosts: list[str] = []
    token, depth = "", 0
    for ch in nodelist + ",":
        if ch in ", \t\n" and depth == 0:
            if token:
                hosts += _expand_host(token, nodelist)
            token = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"node list '{nodelist}': brackets do not pair up (or nest) in '{token + ch}'")
        token += ch
    if depth:
        raise ValueError(f"node list '{nodelist}': a '[' is not closed")
    return hosts


def _expand_host(name: str, nodelist: str) -> list[str]:
    """One host expression of a node list: 'gpu-[1-2]-[3-4]' -> gpu-1-3 gpu-1-4 gpu-2-3 gpu-2-4."""
    start = name.find("[")
    if start < 0:
        return [name]
    end = name.index("]", start)
    numbers = []
    for item in name[start + 1:end].split(","):
        m = _RANGE.fullmatch(item)
        if m is None or int(m[1]) > int(m[2] or m[1]) or int(m[2] or m[1]) - int(m[1]) >= MAX_RANGE:
            raise ValueError(f"node list '{nodelist}': '{item}' in '{name}' is not a number or a range lo-hi "
                             f"(lo <= hi, at most {MAX_RANGE} hosts)")
        numbers += [f"{n:0{len(m[1])}d}" for n in range(int(m[1]), int(m[2] or m[1]) + 1)]
    tails = _expand_host(name[end + 1:], nodelist) if name[end + 1:] else [""]
    return [name[:start] + number + tail for number in numbers for tail in tails]


def _tasks_on_node(tasks_per_node: str, node: int) -> int:
    """The tasks on node `node` (0-based) from SLURM's '8(x2),4' form."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = _TASKS_PER_NODE.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"SLURM_STEP_TASKS_PER_NODE='{tasks_per_node}' is not of the form 8(x2),4")
        counts += [int(m[1])] * int(m[2] or 1)
    if node >= len(counts):
        raise ValueError(f"SLURM_STEP_TASKS_PER_NODE='{tasks_per_node}' names {len(counts)} node(s), this is node "
                         f"{node}")
    return counts[node]


PORTS = (25000, 32768)  # above Lightning's 15000-24999, below Linux's ephemeral ports (32768-60999)
PORTS_SKIPPED = (29400, 29500)  # torchrun's defaults (--rdzv-endpoint, MASTER_PORT)
PORT_STEP_STRIDE = 4799  # ~0.618 x the 7,766 ports, prime to it: the steps of a job spread over all of them


def job_port(job_id: str, step_id: str = "0") -> int:
    """The rendezvous port of step `step_id` of SLURM job `job_id`, in 25000-32767 without
    torchrun's 29400 and 29500: (job + 4799 x step) mod 7766 counted from 25000.

    Every task of a step derives the same port, and so does the step of the same number after a
    requeue (SLURM keeps the job id and numbers the steps from 0 again); two steps of one job
    (two srun in one batch script, also at the same time) never share one (below 7,766 steps).
    Two jobs' steps on one node share one with odds of 1 in 7,766 (their ids equal modulo 7,766
    for step 0 of both), never when the ids differ by less than 1,135 and the step numbers by
    less than 5; the range is disjoint from Lightning's (15000 + job id mod 10000), so a
    Lightning step of the same job never collides. Otherwise: set MASTER_PORT.
    Raises ValueError for a step id that is not a number."""
    if not str(step_id).isdigit():
        raise ValueError(f"SLURM_STEP_ID='{step_id}' is not a step number to derive the rendezvous port from: set "
                         "MASTER_PORT")
    span = PORTS[1] - PORTS[0] - len(PORTS_SKIPPED)
    port = PORTS[0] + (int(job_id) + PORT_STEP_STRIDE * int(step_id)) % span
    for skipped in PORTS_SKIPPED:  # in increasing order: each one moves the ports from it up by one
        port += port >= skipped
    return port


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Where this process's world comes from, read from `environ` (default: os.environ).

    torchrun's variables win (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT). Without them, a task started by srun takes SLURM's: rank SLURM_PROCID, world
    size SLURM_STEP_NUM_TASKS, local rank SLURM_LOCALID, the tasks on its node from
    SLURM_STEP_TASKS_PER_NODE, the rendezvous at the first host of SLURM_STEP_NODELIST (rank 0's
    node under srun's block distribution) on `job_port(SLURM_JOB_ID, SLURM_STEP_ID)`; MASTER_ADDR and
    MASTER_PORT, when set, win over those two. A batch script's own shell also has SLURM_PROCID
    but no step variables: a process started there without srun is one process.
    Raises ValueError naming the variable it cannot read.
    """
    env = os.environ if environ is None else environ
    master_port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None
    if "RANK" in env or "WORLD_SIZE" in env:
        world, addr = int(env.get("WORLD_SIZE", "1")), env.get("MASTER_ADDR")
        return LaunchEnv(rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                         local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")), master_addr=addr,
                         master_port=master_port, launcher="torchrun",
                         origin=f"{world} process(es) from RANK/WORLD_SIZE (torchrun or a launcher)"
                                + (f", rendezvous env:// at {addr}:{master_port}" if addr else ""))
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        tasks = env.get("SLURM_NTASKS", "1")
        if tasks.isdigit() and int(tasks) > 1:
            return LaunchEnv(origin=f"one process, although SLURM job {env.get('SLURM_JOB_ID')} has {tasks} tasks: "
                                    "this process was not started by srun (srun python ... starts one per task)")
        return LaunchEnv()
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    master_addr = env.get("MASTER_ADDR") or next(iter(expand_nodelist(nodelist)), None)
    if master_addr is None:
        raise ValueError("srun started this process but SLURM_STEP_NODELIST is empty: set MASTER_ADDR to the host "
                         "of task 0")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID", "")
    if master_port is None and not job_id.isdigit():
        raise ValueError(f"srun started this process but SLURM_JOB_ID='{job_id}' is not a job number to derive the "
                         "rendezvous port from: set MASTER_PORT")
    master_port = master_port or job_port(job_id, env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "0")
    node = int(env.get("SLURM_STEP_NODEID") or env.get("SLURM_NODEID") or "0")
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    cpus = env.get("SLURM_CPUS_PER_TASK")
    world = int(env["SLURM_STEP_NUM_TASKS"])
    where = ("MASTER_ADDR" if env.get("MASTER_ADDR") else f"first node of '{nodelist}'",
             "MASTER_PORT" if env.get("MASTER_PORT") else "port from the job and step ids")
    return LaunchEnv(rank=int(env["SLURM_PROCID"]), world_size=world, local_rank=int(env.get("SLURM_LOCALID", "0")),
                     local_world_size=_tasks_on_node(tasks_per_node, node) if tasks_per_node else 1,
                     master_addr=master_addr, master_port=master_port,
                     cpus_per_task=int(cpus) if cpus and cpus.isdigit() else None, launcher="srun",
                     origin=f"{world} process(es) from SLURM job {job_id} (srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, "
                            f"SLURM_LOCALID), rendezvous tcp://{master_addr}:{master_port} ({where[0]}, {where[1]})")


# ----------------------------------------------------------------------------------------------
# Setting up a process: device and process group
# ----------------------------------------------------------------------------------------------


def add_device_args(p: argparse.ArgumentParser, moco_gpu: bool = False) -> None:
    """--device and --dist-backend (and MoCo's --gpu) for the entry scripts."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available; with several "
                                                  "processes 'cuda' means GPU LOCAL_RANK)")
    p.add_argument("--dist-backend", default="auto", choices=BACKENDS,
                   help="process-group backend: auto (default) = nccl on CUDA, gloo on the CPU; nccl or gloo also "
                        "make a group of one process, and gloo lets several processes share one GPU (testing)")
    if moco_gpu:
        p.add_argument("--gpu", default=None, type=int,
                       help="MoCo's flag: GPU id of a single process (= --device cuda:N); with several processes "
                            "each takes GPU LOCAL_RANK, as in MoCo")


def choose_device(requested: str | None, gpu: int | None, local_rank: int, world_size: int,
                  cuda_count: int, warn: bool = True) -> torch.device:
    """The device of this process, from --device (`requested`: 'cpu', 'cuda', 'cuda:N' or None
    for CUDA when available), MoCo's --gpu, this process's LOCAL_RANK and the visible GPU count.

    'cuda' without an index means GPU `local_rank`: one process per GPU. MoCo's `--gpu N` picks
    the GPU of a single process; with several processes MoCo itself overrides it with the local
    rank, and so does this function, with a warning (every process on GPU N would make NCCL fail
    with a duplicate-GPU error). Raises ValueError with the fix when the request cannot be met.
    """
    if gpu is not None:
        if world_size > 1:
            if warn:
                logger.warning("--gpu %d selects the GPU of a single process; with %d processes each takes GPU "
                               "LOCAL_RANK instead, as facebookresearch/moco does", gpu, world_size)
            requested = "cuda"
        else:
            requested = f"cuda:{gpu}"
    if requested is None:
        requested = "cuda" if cuda_count else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise ValueError(f"--device {requested} is not a device: use cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not cuda_count:
            raise ValueError(f"--device {requested} was asked for but CUDA is not available on this machine; use "
                             "--device cpu (or leave --device unset to pick automatically)")
        index = local_rank if device.index is None else device.index
        if index >= cuda_count:
            raise ValueError(
                f"this process needs GPU {index} but only {cuda_count} GPU(s) are visible; "
                + ("start at most one process per GPU (--nproc_per_node)" if device.index is None
                   else f"use --device cuda:N with N < {cuda_count}"))
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"--device {requested}: only cpu and cuda devices are supported")
    return device


def choose_backend(requested: str, device: torch.device, world_size: int, local_world_size: int,
                   explicit_index: bool) -> str:
    """The process group's backend: `requested` ('nccl', 'gloo' or 'auto': nccl on CUDA, gloo on
    the CPU), checked against the device. Raises ValueError with the fix."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown --dist-backend '{requested}'; valid: {', '.join(BACKENDS)}")
    backend = ("nccl" if device.type == "cuda" else "gloo") if requested == "auto" else requested
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("--dist-backend nccl needs CUDA devices but this process runs on the CPU; use "
                         "--dist-backend gloo (or auto)")
    if backend == "nccl" and explicit_index and local_world_size > 1:
        raise ValueError(
            f"--device {device} puts all {local_world_size} processes of this node on one GPU, which NCCL refuses; "
            "use --device cuda (each process takes GPU LOCAL_RANK), or --dist-backend gloo to share one GPU "
            "between processes (slower; for testing)")
    return backend


def local_gpu(env: LaunchEnv, requested: str | None, gpu: int | None, cuda_count: int) -> int:
    """Which visible GPU '--device cuda' (or no --device) means for this process: GPU LOCAL_RANK,
    one process per GPU; for an srun task that sees one GPU, that GPU (SLURM binds each task to
    its own with --gpus-per-task=1). Refuses an srun task alone on a node with several GPUs, which
    would leave all but one idle, with the fix."""
    if (env.launcher == "srun" and env.local_world_size == 1 and cuda_count > 1 and gpu is None
            and requested in (None, "cuda")):
        raise ValueError(f"srun started one task on this node, which sees {cuda_count} GPUs: only one of them would "
                         f"train. Start one task per GPU (srun --ntasks-per-node={cuda_count} --gpus-per-task=1 ...), "
                         "or pass --device cuda:0 to train on one GPU on purpose")
    return 0 if env.launcher == "srun" and cuda_count == 1 else env.local_rank


def init_distributed(device: str | None = None, backend: str = "auto", gpu: int | None = None,
                     timeout_minutes: float = 30.0, env: LaunchEnv | None = None) -> DistInfo:
    """Pick this process's device and set up its process group from its launcher's environment
    (`env`, default `launch_env()`: torchrun's variables, or SLURM's in an srun task).

    With `backend` 'auto' a single process (no such variables, or a world of 1) gets no group.
    An explicit 'nccl' or 'gloo' always makes one, at world size 1 too, so that one GPU runs the
    NCCL code path (torchrun's variables, or a group of this process alone). Raises ValueError
    with the fix when the device or backend cannot work.
    """
    env = env or launch_env()
    rank, world_size = env.rank, env.world_size
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev = choose_device(device, gpu, local_gpu(env, device, gpu, cuda_count), world_size, cuda_count, warn=rank == 0)
    explicit_index = gpu is None and device is not None and ":" in device
    name = choose_backend(backend, dev, world_size, env.local_world_size, explicit_index)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # object collectives and NCCL use the current device
    if is_dist_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=env.local_rank, device=dev,
                        backend=dist.get_backend())
    if world_size == 1 and backend == "auto":
        return DistInfo(rank=0, world_size=1, local_rank=env.local_rank, device=dev)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    kwargs = {"device_id": dev} if name == "nccl" else {}  # binds NCCL to this GPU, avoids a guess in barrier()
    if env.master_addr is not None:
        # env:// reads MASTER_ADDR/MASTER_PORT (under torchrun its agent serves that store already);
        # under srun, task 0 serves one at the address derived from SLURM's variables.
        url = "env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
        store, rank, world_size = next(dist.rendezvous(url, rank=rank, world_size=world_size, timeout=timeout))
        # torchrun shares its rendezvous store with the workers, so after a --max-restarts restart
        # the new group could read the dead group's addresses (pytorch/pytorch#135712) and fail to
        # connect. Each attempt gets its own key space.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"selfsup/attempt{attempt}", store)
    elif world_size == 1:  # an explicit backend without a launcher: a group of this process alone
        store = dist.HashStore()
    else:
        raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: start the processes with "
                         "torchrun (or --multiprocessing-distributed), which sets them")
    dist.init_process_group(backend=name, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=env.local_rank, device=dev, backend=name)


def cleanup_distributed() -> None:
    if is_dist_initialized():
        dist.destroy_process_group()


def run_in_process_group(fn: Callable[..., int], args, device: str | None = None) -> int:
    """`fn(args, dist_info)` inside this process's group (torchrun's or srun's environment, or none
    at world size 1), which is torn down afterwards, also when `fn` raises. The entry scripts'
    `main`; reads `args.dist_backend` and MoCo's `args.gpu` when they exist. Rank 0 logs where the
    world came from. A device, backend or launch environment that cannot work is reported as one
    line, exit status 2."""
    try:
        env = launch_env()
        dist_info = init_distributed(device, getattr(args, "dist_backend", None) or "auto", getattr(args, "gpu", None),
                                     env=env)
    except ValueError as e:
        print(f"error: {e}", flush=True)
        return 2
    setup_logging(dist_info.rank)
    logger.info("world: %s", env.origin)
    try:
        return fn(args, dist_info)
    finally:
        cleanup_distributed()


# ----------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all processes in rank order along dim 0. No gradient (MoCo keys).

    x: N x ... on every process (same N) -> (world_size * N) x ...
    """
    if not is_dist_initialized():
        return x
    xg = _on_group_device(x, copy=False)
    out = [torch.empty_like(xg) for _ in range(dist.get_world_size())]
    dist.all_gather(out, xg)
    return torch.cat(out, dim=0).to(x.device)


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
        xg = _on_group_device(x, copy=False)
        out = [torch.empty_like(xg) for _ in range(dist.get_world_size())]
        dist.all_gather(out, xg)
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out, dim=0).to(x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = _on_group_device(grad, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n].to(grad.device)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all processes in rank order, passing gradients back (SimCLR).

    x: N x C -> (world_size * N) x C. Identity without a process group.
    """
    if not is_dist_initialized():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a copy, on `x`'s device); identity without a process group."""
    if not is_dist_initialized():
        return x
    total = _on_group_device(x, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy, on `x`'s device); identity without a process group. For
    logging, not for gradients."""
    if not is_dist_initialized():
        return x
    return all_reduce_sum(x) / dist.get_world_size()


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Process `src`'s `x` on every process (a copy, on `x`'s device); identity without a group."""
    if not is_dist_initialized():
        return x
    out = _on_group_device(x, copy=True)
    dist.broadcast(out, src=src)
    return out.to(x.device)


@torch.no_grad()
def broadcast_buffers_(module: nn.Module, src: int = 0) -> None:
    """Copy process `src`'s BatchNorm running statistics into every process's `module`.

    DDP runs here without its per-step buffer broadcast (every process enqueues the same keys
    already), so the running statistics of each process follow its own batches and drift apart.
    They never enter training (BatchNorm normalises with batch statistics in train mode), but an
    evaluation - the online kNN - and the checkpoint (rank 0's) must see one model.
    """
    if not is_dist_initialized():
        return
    buffers = [buf for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
    for dtype in sorted({b.dtype for b in buffers}, key=str):  # one broadcast per dtype, not per buffer
        same = [b for b in buffers if b.dtype == dtype]
        flat = broadcast(torch.cat([b.reshape(-1) for b in same]), src)
        for b, value in zip(same, flat.split([b.numel() for b in same])):
            b.copy_(value.view_as(b))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Process `src`'s picklable `obj` on every process; identity without a process group."""
    if not is_dist_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=group_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in rank order; [obj] without a process group. (With NCCL
    the objects travel through the current GPU, which init_distributed sets.)"""
    if not is_dist_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: nn.Module, dist: DistInfo, sync_buffers: bool = True) -> nn.Module:
    """`module` in DistributedDataParallel when a process group exists, else `module` itself.

    `sync_buffers=False` stops DDP's per-step broadcast of rank 0's buffers (pretraining: every
    process enqueues the same keys already; see distributed.broadcast_buffers_)."""
    if not dist.distributed:
        return module
    kwargs = {}
    if not sync_buffers:  # the keyword was renamed in recent PyTorch
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        kwargs = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, **kwargs)


def configure_kernels(deterministic: bool) -> None:
    """cuDNN's autotuner for the fixed-size batches of training (as facebookresearch/moco turns it
    on), or with `deterministic` the kernels that make a GPU run repeat bit for bit (--deterministic,
    which a bitwise resume on a GPU needs), at some cost in speed. No effect on a CPU."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        # cuBLAS repeats its results only with a fixed workspace, read when its first handle is made
        # (after this, before the first matmul); a value the user set is kept.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
