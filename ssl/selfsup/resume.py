"""What a run is and one resume path for the training scripts: what continues a run exactly,
besides its model.

A pretraining run is defined by its data and the hyperparameters that change its weights
(`run_definition`); its folder refuses a command that defines another run (`check_same_run`).
Pretraining, linear evaluation and detection write their checkpoints and pick them up again the
same way. Each checkpoint holds the script's model and position, and this common part
(`run_state`):

    optimizer, scaler      the optimizer's state (momentum buffers), mixed precision's scale
    rng                    every process's generators, in rank order (selfsup.rng)
    world_size, num_threads, device_type
                           what a bit-for-bit continuation needs to match (docs/FAULT_TOLERANCE.md, "When resume
                           is bitwise"); a resume that differs says so (`warn_if_not_bitwise`)
    args                   the command line, as plain values

`read_checkpoint` reads a file once, on rank 0, for every process; `restore_run_state` puts the
common part back; `check_same_run` refuses a checkpoint of another run (`differences` lists
what differs); and a `Checkpointer` writes a run's checkpoints (rank 0, atomically, with every
process's RNG).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .checkpoint import CheckpointError, load_checkpoint, plain_args, save_atomic
from .errors import UsageError
from .methods import METHODS
from .data import fashion_mnist_root
from .distributed import DistInfo, broadcast_object
from .rng import MicroStreams, gather_rng_states, restore_rng_state

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# What a run is
# ----------------------------------------------------------------------------------------------

# What defines a pretraining run, whatever its method: the data and every common hyperparameter
# that changes the weights it trains; the method adds its own (Method.run_defining). A run folder
# records them (run.json and every checkpoint); resuming with other values is refused unless asked
# for (--accept-changes). --epochs is not among them: extending a run is allowed. Nor are what only
# changes speed or reporting (workers, devices, print and save rates).
RUN_DEFINING = ("data", "method", "arch", "small_stem", "zero_init_residual", "image_size", "aug", "batch_size", "lr",
                "optimizer", "momentum", "wd", "wd_exclude", "cos", "schedule", "warmup_epochs", "classic_momentum",
                "lars_eta", "sync_bn", "amp", "seed")


def run_keys(method: str | None) -> tuple[str, ...]:
    """RUN_DEFINING and `method`'s own run-defining flags (none for a method this project lacks)."""
    own = METHODS[method].run_defining if method in METHODS else ()
    return RUN_DEFINING + tuple(k for k in own if k not in RUN_DEFINING)


def run_definition(args: Mapping[str, Any]) -> dict[str, Any]:
    """The values of `run_keys(args["method"])` in `args` (a pretraining command's, or the plain
    args a checkpoint saved). The data is what the files are (`data_id`,
    selfsup.data.pipeline.files_id), not where they lie, so a copy on a job's local disk resumes the
    same run; a record without a fingerprint compares the absolute path ('demo' for the embedded
    demo)."""
    out = {k: args.get(k) for k in run_keys(args.get("method"))}
    if args.get("data_id"):
        out["data"] = args["data_id"]
    elif args.get("demo"):
        out["data"] = "demo"
    elif out["data"] is not None:
        out["data"] = str((fashion_mnist_root(out["data"]) or Path(out["data"])).resolve())
    return out


def is_data_id(data: object) -> bool:
    """Whether a recorded `data` is a fingerprint (selfsup.data.pipeline.files_id / arrays_id) rather
    than a path or 'demo', which records without a fingerprint hold."""
    return isinstance(data, str) and re.fullmatch(r"\d+ images, \d+ labels, (files|arrays) [0-9a-f]+", data) is not None


def default_run_folder(method: str, arch: str, data: str | None) -> str:
    """runs/<method>-<arch>-<name of the data folder> ('demo' for the embedded demo): a pretraining
    run's folder when --output-dir is not given, so that another dataset gets another folder
    instead of resuming the first one's run."""
    name = "demo" if data is None else "fashion-mnist" if fashion_mnist_root(data) else Path(data).resolve().name
    return str(Path("runs") / f"{method}-{arch}-{name}")


# ----------------------------------------------------------------------------------------------
# What continues a run
# ----------------------------------------------------------------------------------------------


def run_state(optimizer: torch.optim.Optimizer, args: argparse.Namespace | dict, dist: DistInfo,
              rng: list[dict] | None = None, scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """The part of a training checkpoint every script shares, in plain types. `rng`: every
    process's generators (gather_rng_states), for scripts whose randomness lives there."""
    state = {
        "optimizer": optimizer.state_dict(),
        "world_size": dist.world_size,
        "num_threads": torch.get_num_threads(),
        "device_type": dist.device.type,
        "args": plain_args(args),
    }
    if rng is not None:
        state["rng"] = rng
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def read_checkpoint(path: Path, required: bool, dist: DistInfo) -> dict | None:
    """The checkpoint at `path` (None when it does not exist and is not `required`).

    Rank 0 reads it and sends it to every process, so all resume from the same file (no shared
    filesystem needed) and all fail together, with the same CheckpointError, on a bad one."""
    payload: object = None
    if dist.is_main and (required or path.is_file()):
        try:
            payload = load_checkpoint(path)
        except CheckpointError as e:
            payload = str(e)
    payload = broadcast_object(payload, src=0)
    if isinstance(payload, str):
        raise CheckpointError(payload)
    return payload


def restore_run_state(ckpt: Mapping[str, Any], dist: DistInfo, optimizer: torch.optim.Optimizer | None = None,
                      scaler: torch.amp.GradScaler | None = None, streams: MicroStreams | None = None) -> None:
    """Put back what `run_state` saved: the optimizer and scaler (when given) and this process's
    random generators - with `streams`, its K micro-batches' (--accum-iter) - when the checkpoint
    comes from as many processes, real or virtual (W x K), as this run stands for."""
    if optimizer is not None and ckpt.get("optimizer"):
        # The command's hyperparameters win over the saved ones (the same unless changed on
        # purpose, --accept-changes); the learning rate is the schedule's, set at every step.
        chosen = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                  for g in optimizer.param_groups]
        optimizer.load_state_dict(without_stateless_extras(ckpt["optimizer"], optimizer))
        for group, values in zip(optimizer.param_groups, chosen):
            group.update(values)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng")
    k = streams.k if streams is not None else 1
    if rng and len(rng) == dist.world_size * k:
        mine = rng[dist.rank * k:(dist.rank + 1) * k]
        if streams is not None:
            streams.restore(mine)
        else:
            restore_rng_state(mine[0])
    elif rng:
        logger.warning("checkpoint from %d process(es), now %d%s: random streams restart (resume is not bitwise)",
                       len(rng), dist.world_size * k, f" ({dist.world_size} x {k} micro-batches)" if k > 1 else "")
    warn_if_not_bitwise(ckpt, dist)


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """`key 'theirs' (this command: 'mine')` for every key both sides set to different values."""
    out = []
    for key in keys:
        theirs, mine = saved.get(key), current.get(key)
        if theirs is None or mine is None or theirs == mine:
            continue
        if isinstance(theirs, float) and isinstance(mine, (int, float)) and math.isclose(theirs, mine, rel_tol=1e-9):
            continue  # e.g. a preset's lr 0.3 * 4096 / 256 against the same lr typed in
        out.append(f"{key} {theirs!r} (this command: {mine!r})")
    return out


def check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path, accept: bool,
                   explicit: bool = False) -> list[str]:
    """Refuse to continue the run in `path` with another definition (what defines a run: data,
    method, hyperparameters); returns the changes when `accept` lets them through.

    A second dataset or a changed learning rate given to the same output folder would otherwise
    silently resume - or finish - the first run. The message lists the differences and the ways
    out: another folder, or continuing on purpose. `explicit`: the path came from --resume."""
    changes = differences(saved, current, current.keys())
    if changes and not accept:
        start_afresh = ("leave out --resume" if explicit else
                        "give it its own folder (--output-dir DIR, or --no-resume for a new folder next to this one)")
        raise UsageError(
            f"'{path}' belongs to another run: {'; '.join(changes)}. To start a new run, {start_afresh}; to "
            "continue that run with the new values, pass --accept-changes.")
    if changes:
        logger.warning("continuing the run of %s with changes (--accept-changes): %s", path, "; ".join(changes))
    return changes


def claim_fresh_folder(folder: str | Path, dist: DistInfo) -> Path:
    """Create and return `folder` if nothing is there yet, else the first of folder-2, folder-3,
    ... that does not exist: where --no-resume starts afresh without touching another run.

    Rank 0 creates it (an atomic mkdir, so two launches never pick the same one) and every
    process gets its answer - or the same UsageError when it cannot be created. A job that
    restarts itself (torchrun --max-restarts, a SLURM requeue) must not pass --no-resume: each
    restart would start again in a new folder instead of resuming."""
    answer: str | None = None
    if dist.is_main:
        try:
            answer = str(_first_free_folder(Path(folder)))
        except OSError as e:
            answer = f"error: --no-resume could not create a folder for {folder}: {e}"
    answer = broadcast_object(answer, src=0)
    if answer.startswith("error: "):
        raise UsageError(answer.removeprefix("error: "))
    return Path(answer)


def _first_free_folder(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = folder, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if candidate.is_dir() and not any(candidate.iterdir()):
                return candidate  # an empty folder (e.g. one made by hand): nothing to overwrite
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")


def without_stateless_extras(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict fitted to `optimizer`, for checkpoints whose optimizer lists more
    parameters than the model trains.

    Checkpoints of versions that left the key/target network's BatchNorm parameters trainable
    under --bn-splits (they never received gradients) list them after the trained parameters,
    without any state. Dropping those trailing, stateless entries lets such a checkpoint resume
    exactly; anything else is left for load_state_dict to judge.
    """
    groups = saved.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        return saved
    fitted = []
    for theirs, ours in zip(groups, optimizer.param_groups):
        extra = theirs["params"][len(ours["params"]):]
        if extra and not any(i in saved.get("state", {}) for i in extra):
            theirs = {**theirs, "params": theirs["params"][: len(ours["params"])]}
        fitted.append(theirs)
    return {**saved, "param_groups": fitted}


def warn_if_not_bitwise(ckpt: Mapping[str, Any], dist: DistInfo) -> None:
    """Resume is bitwise only on the same kind of device with the same CPU thread count: on some
    CPUs (seen on AVX-512 machines) oneDNN picks other kernels, and so other summation orders, for
    another number of threads. Say so when either changed since the checkpoint was written."""
    threads, device = ckpt.get("num_threads"), ckpt.get("device_type")
    if threads is not None and threads != torch.get_num_threads():
        logger.warning("checkpoint written with %d CPU thread(s) per process, this run has %d: the run continues "
                       "correctly, but not bit for bit as an uninterrupted one would (OMP_NUM_THREADS=%d resumes bitwise)",
                       threads, torch.get_num_threads(), threads)
    if device is not None and device != dist.device.type:
        logger.warning("checkpoint written on %s, this run is on %s: the run continues correctly, but not bit "
                       "for bit as an uninterrupted one would", device, dist.device.type)


class Checkpointer:
    """Writes a run's checkpoints: OUTPUT_DIR/checkpoint.pth.tar (the latest) and named copies.

    `state(rng=..., **position)` builds the checkpoint (run_state inside). Every process calls
    `save` - their random states are gathered, a collective - and rank 0 writes, atomically.
    """

    def __init__(self, folder: Path, dist: DistInfo, state: Callable[..., dict], name: str = "checkpoint.pth.tar",
                 streams: MicroStreams | None = None):
        self.folder, self.dist, self.state, self.streams = Path(folder), dist, state, streams
        self.latest = self.folder / name

    def save(self, *copies: str, **position: Any) -> None:
        rng = gather_rng_states(self.streams)
        if not self.dist.is_main:
            return
        state = self.state(rng=rng, **position)
        save_atomic(state, self.latest)
        for name in copies:
            save_atomic(state, self.folder / name)
