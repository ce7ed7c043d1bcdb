"""What every entry script does around its work (main_pretrain.py, main_lincls.py, main_knn.py,
detection/train_torchvision.py): usage errors and the checks that raise them, agreeing across
processes that setup failed, output folders, the args dump, and the launcher tail - torchrun's
environment, or facebookresearch/moco's --multiprocessing-distributed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from .distributed import DistInfo, LaunchEnv, concat_all_gather, launch_env
from .errors import UsageError


def per_process_batch(global_batch: int, world_size: int) -> int:
    """The per-process batch of a global --batch-size; a UsageError when it does not divide."""
    if global_batch <= 0:
        raise UsageError(f"--batch-size must be positive (got {global_batch})")
    if global_batch % world_size:
        raise UsageError(
            f"--batch-size {global_batch} is the global batch and must divide by the {world_size} processes; "
            f"use e.g. --batch-size {max(world_size, global_batch // world_size * world_size)}"
        )
    return global_batch // world_size


def agree_on_error(error: BaseException | None, dist: DistInfo) -> bool:
    """True when setup failed on any process. Call it on every process after a setup that runs
    no collective. The message is printed once - by rank 0 if it failed, else by the lowest
    failing rank - and every process can then exit with the same status instead of hanging in
    the first collective of the others."""
    flags = torch.tensor([0.0 if error is None else 1.0])
    flags = concat_all_gather(flags) if dist.distributed else flags
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if failed and error is not None and dist.rank == failed[0]:
        where = f" (rank {dist.rank})" if dist.rank else ""
        print(f"error{where}: {error}", file=sys.stderr, flush=True)
    return bool(failed)


def write_json(path: str | os.PathLike, obj: Any, dist: DistInfo) -> None:
    """`obj` as JSON at `path` (values that are not JSON as strings), by rank 0."""
    if dist.is_main:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)


def write_args(output_dir: str | os.PathLike, args: argparse.Namespace, dist: DistInfo) -> None:
    """OUTPUT_DIR/args.json: the command's every argument, by rank 0."""
    write_json(Path(output_dir) / "args.json", vars(args), dist)


def report(error: BaseException) -> int:
    """Print a usage error found before any process group exists - once, not once per torchrun
    worker or srun task (the others share it) - and return the exit status, 2."""
    if _launched().rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return 2


def _launched() -> LaunchEnv:
    """This process's place in the job before any process group (torchrun's or srun's variables);
    one process's when they cannot be read (setting up the process group reports why)."""
    try:
        return launch_env()
    except ValueError:
        return LaunchEnv()


def check_numbers(args: argparse.Namespace, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                  fractions: tuple[str, ...] = ()) -> None:
    """A UsageError naming the flag for the first value out of its range: `positive` (> 0),
    `non_negative` (>= 0), `fractions` (in [0, 1]). None (unset) passes."""
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (fractions, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            value = getattr(args, name, None)
            values = value if isinstance(value, list) else [value]
            if any(v is not None and not ok(v) for v in values):
                raise UsageError(f"--{name.replace('_', '-')} must be {what} (got {value})")


def default_workers() -> int:
    """Loader workers per process when -j is not given: the CPUs this process may use, shared by
    the processes of this node (LOCAL_WORLD_SIZE), or the CPUs SLURM gave this task
    (SLURM_CPUS_PER_TASK, under srun), one left for the process itself; 1 to 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    env = _launched()
    mine = min(env.cpus_per_task, cpus) if env.cpus_per_task else cpus // env.local_world_size
    return max(1, min(8, mine - 1))


def evaluation_folder(pretrained: str | os.PathLike, kind: str) -> Path:
    """Results next to the evaluated checkpoint: `<its folder>/<kind>` for checkpoint.pth.tar,
    `<its folder>/<kind>-<name>` for any other file (e.g. lincls-checkpoint_0199)."""
    path = Path(pretrained)
    name = path.name.removesuffix(".tar").removesuffix(".pth")
    return path.parent / (kind if name == "checkpoint" else f"{kind}-{name}")


# ----------------------------------------------------------------------------------------------
# facebookresearch/moco's launcher (--multiprocessing-distributed), mapped onto torchrun's variables
# ----------------------------------------------------------------------------------------------


def add_moco_launcher_args(p: argparse.ArgumentParser) -> None:
    """MoCo's launch flags, with MoCo's names and meanings (its --dist-backend and --gpu come
    with selfsup.distributed.add_device_args).

    MoCo's scripts spawn one process per GPU themselves and turn (node rank, local rank) into a
    global rank. Here each spawned process only gets the environment torchrun would have given it
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the rest of the program knows a
    single way to start.
    """
    p.add_argument("--multiprocessing-distributed", action="store_true",
                   help="spawn one process per GPU on this node (MoCo's launcher); torchrun does not need it")
    p.add_argument("--world-size", default=-1, type=int, help="number of NODES for --multiprocessing-distributed")
    p.add_argument("--rank", default=-1, type=int, help="node rank for --multiprocessing-distributed")
    p.add_argument("--dist-url", default="tcp://localhost:10001", type=str, help="url of the rendezvous (tcp://HOST:PORT)")
    p.add_argument("--nproc-per-node", default=None, type=int,
                   help="processes per node for --multiprocessing-distributed (default: the GPU count)")


def _spawned_world_size(args: argparse.Namespace) -> int:
    """Total processes of a --multiprocessing-distributed launch."""
    return max(args.world_size, 1) * (args.nproc_per_node or torch.cuda.device_count() or 1)


def _worker(local_rank: int, main: Callable[[argparse.Namespace], int], args: argparse.Namespace, nproc: int) -> None:
    url = urlparse(args.dist_url)
    os.environ.update(
        RANK=str(max(args.rank, 0) * nproc + local_rank), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nproc),
        WORLD_SIZE=str(max(args.world_size, 1) * nproc),
        MASTER_ADDR=url.hostname or "127.0.0.1", MASTER_PORT=str(url.port or 10001))
    if args.workers is None:  # now that LOCAL_WORLD_SIZE says how many processes share the CPUs
        args.workers = default_workers()
    status = main(args)
    if status:
        sys.exit(status)


def launch(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The entry scripts' tail: `main(args)` in this process (alone, or one of torchrun's), or -
    with MoCo's --multiprocessing-distributed - in one spawned process per local GPU (or
    --nproc-per-node processes), after checking the global batch divides among them."""
    if not getattr(args, "multiprocessing_distributed", False):
        if getattr(args, "workers", 0) is None:
            args.workers = default_workers()
        try:
            return main(args)
        except KeyboardInterrupt:  # a Ctrl-C during setup, or the second one during training
            if _launched().rank == 0:
                print("\ninterrupted: stopped at once; checkpoints already written are intact, and the same command "
                      "resumes from the last one", file=sys.stderr, flush=True)
            return 130
    if _launched().launcher == "torchrun":
        print("error: --multiprocessing-distributed spawns its own processes; do not combine it with torchrun",
              file=sys.stderr)
        return 2
    try:
        per_process_batch(args.batch_size, _spawned_world_size(args))  # before any process starts
    except UsageError as e:
        return report(e)
    nproc = _spawned_world_size(args) // max(args.world_size, 1)
    workers = torch.multiprocessing.spawn(_worker, args=(main, args, nproc), nprocs=nproc, join=False)
    interrupted = False
    while True:
        try:
            while not workers.join():
                pass
            return 130 if interrupted else 0
        except KeyboardInterrupt:  # the workers got the Ctrl-C too: they stop, and this process waits for them
            if not interrupted:
                print("\ninterrupted: waiting for the workers to write their checkpoint (Ctrl-C again in a worker "
                      "stops it at once)", file=sys.stderr, flush=True)
            interrupted = True
        except torch.multiprocessing.ProcessExitedException as e:  # a worker's own status (its error is logged)
            return e.exit_code if e.exit_code and e.exit_code > 0 else 1
