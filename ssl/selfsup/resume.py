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
import json
import logging
import math
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .backbones import vit
from .checkpoint import CheckpointError, load_checkpoint, plain_args, save_atomic
from .cli import agree_on_error
from .errors import INPUT_ERRORS, UsageError
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
RUN_DEFINING = ("data", "method", "arch", "small_stem", "zero_init_residual", "vit_init", "drop_path_rate",
                "image_size", "aug", "batch_size", "lr", "optimizer", "momentum", "wd", "wd_exclude", "weight_decay_end",
                "cos", "schedule", "warmup_epochs", "min_lr", "classic_momentum", "lars_eta", "sync_bn", "amp", "seed")


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


def legacy_run_definition(saved: Mapping[str, Any], ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A run definition recorded before a value became part of it, in today's terms: AdamW then
    left biases, norms and tokens undecayed (--wd-exclude bias-norm-tokens, one more parameter
    group than today's default), and a ViT-S without a recorded head count had 6 heads (today's
    deit_small names). (Its ResNets' init, before --zero-init-residual, no longer matters once
    weights are saved.)"""
    out = dict(saved)
    if "wd_exclude" not in out and out.get("optimizer"):
        out["wd_exclude"] = "bias-norm-tokens" if out["optimizer"] == "adamw" else "none"
    if ckpt.get("backbone_variant") is None and out.get("arch") in vit.LEGACY_NAMES:
        out["arch"] = vit.LEGACY_NAMES[out["arch"]]
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
        theirs = " ".join(_as_flag(key, saved[key]) for key in current
                          if saved.get(key) is not None and current.get(key) is not None and key not in ("data", "method")
                          and differences(saved, current, [key]))
        raise UsageError(
            f"'{path}' belongs to another run: {'; '.join(changes)}. To start a new run, {start_afresh}; to "
            + (f"continue that run as it was, give its values ({theirs}); " if theirs else "")
            + "to continue it with the new values, pass --accept-changes.")
    if changes:
        logger.warning("continuing the run of %s with changes (--accept-changes): %s", path, "; ".join(changes))
    return changes


def _as_flag(key: str, value: Any) -> str:
    """main_pretrain.py's flag that gives `key` the value `value`: '--wd-exclude bias-norm-tokens'."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if isinstance(value, list):
        return " ".join([flag, *map(str, value)])
    return f"{flag} {value}"


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


def existing_ancestor(folder: str | Path) -> Path:
    """The nearest of `folder` and its parents that exists."""
    folder = Path(folder).absolute()
    return next(p for p in (folder, *folder.parents) if p.exists())


def remove_if_empty(folder: str | Path, keep: str | Path | None = None) -> None:
    """Remove `folder` when nothing is in it, and its parents as they become empty, up to `keep`
    (what existed before): the folders made for a run that was then refused."""
    folder = Path(folder).absolute()
    keep = Path(keep).absolute() if keep is not None else folder.parent
    while folder != keep and keep in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


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


# ----------------------------------------------------------------------------------------------
# One run per folder
# ----------------------------------------------------------------------------------------------

LOCK_NAME = ".run.lock"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat's field 22), None when
    no such process exists: with the boot id, what tells a live run from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


class RunLock:
    """One run per output folder: FOLDER/.run.lock, created atomically (O_EXCL) by rank 0 before
    the run writes anything there, holding who runs (host, pid, since, SLURM job), and removed when
    the run ends. A second run into a busy folder is refused in one line naming the first.

    A lock left by a run that died without removing it (killed, out of memory, a machine that
    restarted) is taken over: same host and that process gone (its pid unused, or reused by a
    process that started later, or another boot), or the same SLURM job (a requeued job's
    previous run, which SLURM ended). A lock from another host cannot be checked from here: the
    message says to delete it when that run is known to be gone. A folder the lock created is
    removed again on release when the run left nothing in it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.created_folder = False
        self.held = False

    def _mine(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "start": _process_start(pid), "boot": _boot_id(), "slurm_job": os.environ.get("SLURM_JOB_ID")}

    def _stale(self, other: dict[str, Any]) -> bool:
        mine = self._mine()
        if mine["slurm_job"] and other.get("slurm_job") == mine["slurm_job"]:
            return True  # this job's previous run: SLURM requeued it, so it ended
        if other.get("host") != mine["host"]:
            return False
        if other.get("boot") and mine["boot"] and other["boot"] != mine["boot"]:
            return True  # the machine restarted since
        start = _process_start(int(other.get("pid", -1)))
        return start is None or (other.get("start") is not None and start != other["start"])

    def acquire(self) -> "RunLock":
        """Take the lock (creating the folder if needed); a UsageError naming the run that holds it."""
        if not self.folder.exists():
            self.existed = existing_ancestor(self.folder)
            self.folder.mkdir(parents=True)
            self.created_folder = True
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):  # being written, or gone: look again
                    time.sleep(0.2)
                    continue
                if not self._stale(other):
                    self.release()
                    raise UsageError(
                        f"'{self.folder}' is in use by another run (pid {other.get('pid')} on {other.get('host')}, "
                        f"since {other.get('since')}): wait for it to end or give this run another --output-dir"
                        + ("" if other.get("host") == socket.gethostname() else
                           f"; if that run is gone, delete {self.path}"))
                logger.warning("'%s' was locked by a run that ended without unlocking it (pid %s on %s, since %s): "
                               "taking it over", self.folder, other.get("pid"), other.get("host"), other.get("since"))
                self._take_over(other)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._mine(), f)
            self.held = True
            return self
        raise UsageError(f"could not take the lock {self.path}; delete it if no run uses '{self.folder}'")

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Move the stale lock aside - atomically, and only that one: a lock that changed since it
        was read (another run took it over first) is put back."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != stale:  # not the lock we judged: another run's fresh one
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process holds it, and the folder if the lock created it and the
        run left nothing in it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created_folder:
            remove_if_empty(self.folder, self.existed)
            self.created_folder = False


def run_holding_folder(args: argparse.Namespace, dist: DistInfo, setup: Callable[[], Any],
                       work: Callable[[Any], int]) -> int:
    """An entry script's run in its folder (args.output_dir): `setup()` checks every input and
    builds, writing nothing and running no collective; every process agrees whether it failed (one
    line, exit status 2, and no folder left for the refused run); then, holding the folder
    (RunLock, one run per folder), `work(built)` runs and its exit status is returned. With
    `args.no_resume` the folder is first claimed afresh next to the given one."""
    existed = existing_ancestor(args.output_dir)
    built = error = lock = None
    try:
        if getattr(args, "no_resume", False):  # one folder for every process, claimed by rank 0
            args.output_dir = str(claim_fresh_folder(args.output_dir, dist))
        built = setup()
        if dist.is_main:  # after every check, before anything is written
            lock = RunLock(args.output_dir).acquire()
    except INPUT_ERRORS as e:
        error = e
    if agree_on_error(error, dist):
        if getattr(args, "no_resume", False) and dist.is_main:
            remove_if_empty(args.output_dir, existed)  # the folder claimed for this run
        return 2
    try:
        return work(built)
    finally:
        if lock is not None:
            lock.release()


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
