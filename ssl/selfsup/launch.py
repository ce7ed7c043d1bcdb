"""facebookresearch/moco's launcher (--multiprocessing-distributed), mapped onto torchrun's variables.

MoCo's scripts spawn one process per GPU themselves and turn (node rank, local rank) into a
global rank. Here each spawned process only gets the environment torchrun would have given it
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the rest of the program knows a
single way to start.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable
from urllib.parse import urlparse

import torch


def add_moco_launcher_args(p: argparse.ArgumentParser) -> None:
    """MoCo's launch flags, with MoCo's names and meanings (its --dist-backend and --gpu come
    with selfsup.distributed.add_device_args)."""
    p.add_argument("--multiprocessing-distributed", action="store_true",
                   help="spawn one process per GPU on this node (MoCo's launcher); torchrun does not need it")
    p.add_argument("--world-size", default=-1, type=int, help="number of NODES for --multiprocessing-distributed")
    p.add_argument("--rank", default=-1, type=int, help="node rank for --multiprocessing-distributed")
    p.add_argument("--dist-url", default="tcp://localhost:10001", type=str, help="url of the rendezvous (tcp://HOST:PORT)")
    p.add_argument("--nproc-per-node", default=None, type=int,
                   help="processes per node for --multiprocessing-distributed (default: the GPU count)")


def spawned_world_size(args: argparse.Namespace) -> int:
    """Total processes of a --multiprocessing-distributed launch."""
    return max(args.world_size, 1) * (args.nproc_per_node or torch.cuda.device_count() or 1)


def _worker(local_rank: int, main: Callable[[argparse.Namespace], int], args: argparse.Namespace, nproc: int) -> None:
    url = urlparse(args.dist_url)
    os.environ.update(
        RANK=str(max(args.rank, 0) * nproc + local_rank), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nproc),
        WORLD_SIZE=str(max(args.world_size, 1) * nproc),
        MASTER_ADDR=url.hostname or "127.0.0.1", MASTER_PORT=str(url.port or 10001))
    status = main(args)
    if status:
        sys.exit(status)


def spawn(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run `main(args)` in one process per local GPU (or --nproc-per-node processes)."""
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        print("error: --multiprocessing-distributed spawns its own processes; do not combine it with torchrun",
              file=sys.stderr)
        return 2
    nproc = args.nproc_per_node or torch.cuda.device_count() or 1
    torch.multiprocessing.spawn(_worker, args=(main, args, nproc), nprocs=nproc)
    return 0
