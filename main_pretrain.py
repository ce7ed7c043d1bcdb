#!/usr/bin/env python
r"""Self-supervised pretraining: MoCo v1/v2, BYOL or SimCLR, one DDP process per GPU.

    python main_pretrain.py                                   # the embedded demo, one CPU process
    python main_pretrain.py --method byol /path/to/folder     # one process (a GPU if there is one)
    torchrun --nproc_per_node=8 main_pretrain.py --preset mocov2 /imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \
        main_pretrain.py --preset byol /imagenet
    python main_pretrain.py --multiprocessing-distributed --world-size 1 --rank 0 \
        --dist-url tcp://localhost:10001 --mlp --moco-t 0.2 --aug-plus --cos /imagenet   # MoCo's way

Running the same command again resumes from OUTPUT_DIR/checkpoint.pth.tar (what torchrun's
restarts need). --batch-size is the global batch over all processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from selfsup import launch, recipes
from selfsup.builder import ARCHS, METHODS, build_model, compile_networks
from selfsup.checkpoint import CheckpointError, check_writable, load_checkpoint, save_atomic
from selfsup.data import DEMO_ROOT, resolve_split_dir, verify_images, find_samples
from selfsup.distributed import (DistInfo, add_device_args, all_reduce_sum, broadcast_buffers_, broadcast_object,
                                 run_in_process_group)
from selfsup.engine import AMP_DTYPES, NonFiniteLossError, StepContext, StopRequest, train_one_epoch, unwrap
from selfsup.loader import PRESETS as AUG_PRESETS
from selfsup.meters import MetricsWriter, setup_logging
from selfsup.monitor import check_collapse, folder_monitor
from selfsup.optim import build_optimizer
from selfsup.pipeline import BACKENDS, build_pretrain_pipeline
from selfsup.sampler import gather_rng_states, restore_rng_state

logger = logging.getLogger("main_pretrain")


class UsageError(Exception):
    """Bad input found before training: printed as one message, exit status 2."""


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of facebookresearch/moco's main_moco.py (same names and meanings) plus ours.

    Hyperparameters default to None: the value then comes from --preset, the method's defaults
    or the demo recipe (see selfsup/recipes.py); a flag given on the command line always wins.
    """
    p = argparse.ArgumentParser("Self-supervised pretraining", add_help=False)
    p.add_argument("data", nargs="?", default=None,
                   help="ImageFolder root (ROOT/train/<class>/..., class folders, or a folder of images); "
                        "omit it to train on the embedded Fashion-MNIST demo")
    p.add_argument("--method", choices=METHODS, default=None, help="moco (default), byol or simclr")
    p.add_argument("--preset", choices=list(recipes.PRESETS), default=None,
                   help="a paper's ImageNet recipe in one word (see README); explicit flags override it")
    p.add_argument("-a", "--arch", default=None, choices=ARCHS, help="backbone (default: resnet50)")
    p.add_argument("-j", "--workers", default=None, type=int, help="data loading workers per process (default: 8)")
    p.add_argument("--epochs", default=None, type=int, help="total epochs (default: 200)")
    p.add_argument("--start-epoch", default=None, type=int, help="manual epoch number (useful on restarts)")
    p.add_argument("-b", "--batch-size", default=None, type=int,
                   help="GLOBAL batch size over all processes (default: 256)")
    p.add_argument("--lr", "--learning-rate", default=None, type=float, dest="lr",
                   help="initial learning rate (default: 0.03; BYOL/SimCLR presets scale it with the batch)")
    p.add_argument("--schedule", default=None, nargs="*", type=int,
                   help="epochs at which to drop the lr by 10x when not --cos (default: 120 160)")
    p.add_argument("--momentum", default=None, type=float, help="optimizer momentum (default: 0.9)")
    p.add_argument("--wd", "--weight-decay", default=None, type=float, dest="wd", help="weight decay (default: 1e-4)")
    p.add_argument("-p", "--print-freq", default=10, type=int, help="print every N steps (default: 10)")
    p.add_argument("--resume", default="", type=str, help="checkpoint to resume from (default: OUTPUT_DIR/checkpoint.pth.tar if present)")
    p.add_argument("--seed", default=0, type=int, help="seed of initialisation, data order and augmentation (default: 0)")
    # MoCo's model flags; dim/m/t also serve BYOL and SimCLR.
    p.add_argument("--moco-dim", default=None, type=int, help="output dim (MoCo/SimCLR 128, BYOL 256)")
    p.add_argument("--moco-k", default=None, type=int, help="MoCo queue size (default: 65536)")
    p.add_argument("--moco-m", default=None, type=float, help="key/target encoder momentum (MoCo 0.999, BYOL 0.996)")
    p.add_argument("--moco-t", default=None, type=float, help="softmax temperature (MoCo 0.07, SimCLR 0.1)")
    p.add_argument("--mlp", default=None, action=argparse.BooleanOptionalAction, help="MoCo v2 projection head")
    p.add_argument("--aug-plus", action="store_true", help="MoCo v2's augmentation (same as --aug moco_v2)")
    p.add_argument("--cos", default=None, action=argparse.BooleanOptionalAction, help="cosine lr schedule")
    p.add_argument("--mlp-dim", default=None, type=int, help="hidden dim of BYOL/SimCLR heads (4096 / 2048)")
    p.add_argument("--moco-m-cos", default=None, action=argparse.BooleanOptionalAction,
                   help="raise the momentum to 1 along a cosine (BYOL's schedule; default on for BYOL)")
    p.add_argument("--aug", default=None, choices=list(AUG_PRESETS), help="augmentation preset (default: the method's)")
    p.add_argument("--bn-splits", default=None, type=int,
                   help="emulate shuffle BN on one process over this many sub-batches (default: 1 = off)")
    p.add_argument("--no-shuffle-bn", dest="shuffle_bn", action="store_false", help="MoCo without shuffle BN")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    # Ours.
    p.add_argument("--output-dir", default=None, help="where checkpoints and logs go (default: runs/<method>-<arch>[-demo])")
    p.add_argument("--optimizer", default=None, choices=["sgd", "lars"], help="sgd (default) or lars")
    p.add_argument("--warmup-epochs", default=None, type=float, help="linear lr warmup epochs (default: 0)")
    p.add_argument("--image-size", default=None, type=int, help="crop size (default: 224)")
    p.add_argument("--small-stem", default=None, action=argparse.BooleanOptionalAction,
                   help="3x3 stride-1 stem without max-pool, for 28-64 pixel images")
    p.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="mixed precision (default: none)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    add_device_args(p, moco_gpu=True)
    p.add_argument("--aug-backend", default="auto", choices=BACKENDS,
                   help="where augmentation runs (docs/PERFORMANCE.md): batched = decode + crops in the workers, "
                        "colour on the device; memory = the whole dataset in memory, everything batched on the "
                        "device; reference = per-image PIL in the workers (as facebookresearch/moco); auto "
                        "(default) = memory for images of at most 64 pixels, else batched")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks (skipped with a warning where unsupported)")
    p.add_argument("--save-freq", default=10, type=int, help="keep checkpoint_%%04d.pth.tar every N epochs")
    p.add_argument("--save-every-steps", default=0, type=int,
                   help="also checkpoint every N optimizer steps (global count; 0: only at epoch ends)")
    p.add_argument("--verify-images", action="store_true", help="decode every image first and list unreadable ones")
    p.add_argument("--knn-every", default=None, type=int,
                   help="online kNN accuracy every N epochs on --knn-data (0: off; default: 0, demo: 1)")
    p.add_argument("--knn-data", default=None,
                   help="labelled root with train/ and val/ class folders for --knn-every (default: the data root)")
    p.add_argument("--knn-k", default=200, type=int, help="neighbours of the online kNN (default: 200)")
    p.add_argument("--knn-t", default=0.07, type=float, help="temperature of the online kNN (default: 0.07)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (cuDNN); on CPU runs are deterministic already")
    launch.add_moco_launcher_args(p)  # --multiprocessing-distributed & co., MoCo's way to start
    return p


# Flags whose value falls back to a recipe when not given (argparse default None).
_CONFIG_KEYS = ("arch", "workers", "knn_every", "epochs", "batch_size", "lr", "schedule", "momentum", "wd", "moco_dim",
                "moco_k", "moco_m", "moco_t", "mlp", "cos", "mlp_dim", "moco_m_cos", "aug", "bn_splits",
                "optimizer", "warmup_epochs", "image_size", "small_stem")


def resolve_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset hyperparameters from the preset/method/demo recipes; check the combination."""
    explicit = {k: getattr(args, k) for k in _CONFIG_KEYS if getattr(args, k) is not None}
    if args.aug_plus:
        explicit.setdefault("aug", "moco_v2")
    demo = args.data is None
    try:
        cfg = recipes.resolve(args.method, args.preset, demo, explicit)
    except ValueError as e:
        raise UsageError(str(e)) from e
    cfg.setdefault("workers", 8)
    cfg.setdefault("bn_splits", 1)
    cfg.setdefault("knn_every", 0)
    out = argparse.Namespace(**{**vars(args), **cfg})
    out.demo = demo
    if demo:
        out.data = str(DEMO_ROOT)
    if out.output_dir is None:
        out.output_dir = os.path.join("runs", f"{out.method}-{out.arch}" + ("-demo" if demo else ""))
    return out


def check_batch(global_batch: int, world_size: int) -> int:
    if global_batch <= 0 or global_batch % world_size:
        raise UsageError(
            f"--batch-size {global_batch} is the global batch and must divide by the {world_size} processes; "
            f"use e.g. --batch-size {max(world_size, global_batch // world_size * world_size)}"
        )
    return global_batch // world_size


def model_options(args: argparse.Namespace, global_batch: int) -> dict:
    opts = {"dim": args.moco_dim, "bn_splits": args.bn_splits}
    if args.method == "moco":
        opts.update(K=args.moco_k, m=args.moco_m, T=args.moco_t, mlp=args.mlp, shuffle_bn=args.shuffle_bn,
                    global_batch_size=global_batch)
    elif args.method == "byol":
        opts.update(hidden_dim=args.mlp_dim, m=args.moco_m)
    else:
        opts.update(hidden_dim=args.mlp_dim, T=args.moco_t)
    return opts


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_state(model, optimizer, scaler, args, epoch: int, step: int, steps_per_epoch: int,
                     rng: list, meters: dict | None) -> dict:
    """Everything an exact continuation needs, in plain types. Keys of `state_dict` are those of the
    DDP-wrapped model (`module.encoder_q.*`, `module.queue`, ...) whatever the world size, as
    facebookresearch/moco's tools expect."""
    core = unwrap(model)
    return {
        "epoch": epoch,  # the epoch to continue with
        "step": step,  # steps of `epoch` already done
        "global_step": epoch * steps_per_epoch + step,
        "arch": args.arch,
        "method": args.method,
        "state_dict": {f"module.{k}": v for k, v in core.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        "world_size": len(rng),
        # What else a bitwise continuation needs to match (see resume()).
        "num_threads": torch.get_num_threads(),
        "device_type": next(core.parameters()).device.type,
        "rng": rng,
        "meters": {k: float(v) for k, v in (meters or {}).items()},  # plain numbers (loss_sum is on the device)
    }


def check_compatible(ckpt: dict, args: argparse.Namespace, path: Path) -> None:
    """A checkpoint of another method/arch/stem cannot continue this run."""
    saved = ckpt.get("args", {})
    problems = []
    for key, mine in (("method", args.method), ("arch", args.arch)):
        theirs = ckpt.get(key, saved.get(key)) if key != "method" else ckpt.get("method", saved.get("method", "moco"))
        if theirs is not None and theirs != mine:
            problems.append(f"{key} {theirs!r} (this command: {mine!r})")
    if "small_stem" in saved and bool(saved["small_stem"]) != bool(args.small_stem):
        problems.append(f"small_stem {saved['small_stem']} (this command: {args.small_stem})")
    if problems:
        raise UsageError(
            f"checkpoint '{path}' was written by another kind of run: " + ", ".join(problems)
            + ". Use the same flags as that run, or a new --output-dir to start afresh."
        )


# ---------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    """Set up this process (and its process group), train, and return the exit status."""
    return run_in_process_group(train, args, args.device)


# Bad input, reported as one message and exit status 2.
_INPUT_ERRORS = (UsageError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError)


def prepare(args: argparse.Namespace, dist_info: DistInfo):
    """Validate inputs and build data, model and optimizer. Raises one of _INPUT_ERRORS on bad input."""
    local_batch = check_batch(args.batch_size, dist_info.world_size)
    if args.sync_bn and (dist_info.device.type != "cuda" or dist_info.backend == "gloo"):
        raise UsageError("--sync-bn needs CUDA devices and NCCL (SyncBatchNorm has no CPU kernel); use --bn-splits on "
                         "a CPU or with --dist-backend gloo")
    output_dir = Path(args.output_dir)
    if dist_info.is_main:
        check_writable(output_dir)
    data_dir = resolve_split_dir(args.data, "train")
    if args.verify_images and dist_info.is_main:
        bad = verify_images(find_samples(data_dir)[0])
        for path, reason in bad:
            logger.warning("unreadable image: %s (%s)", path, reason)
        logger.info("--verify-images: %d unreadable file(s) in %s; they will be skipped", len(bad), data_dir)
    pipeline = build_pretrain_pipeline(str(data_dir), args.aug, args.image_size, local_batch, args.workers,
                                       dist_info, args.seed, args.aug_backend, args.channels_last,
                                       out_dtype=AMP_DTYPES[args.amp] or torch.float32)
    if args.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    model = build_model(args.method, args.arch, small_stem=args.small_stem, sync_bn=args.sync_bn,
                        **model_options(args, args.batch_size))
    model.to(dist_info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        reason = compile_networks(model, dist_info.device)
        if reason:
            logger.warning("--compile skipped, training uncompiled: %s", reason)
        else:
            logger.info("--compile: networks compiled with torch.compile (the first steps include compilation)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, params, args.lr, args.momentum, args.wd)
    scaler = torch.amp.GradScaler(dist_info.device.type, enabled=args.amp == "fp16")
    monitor = None
    if args.knn_every > 0:
        monitor = folder_monitor(args.knn_data or args.data, args.image_size, local_batch, dist_info.device,
                                 min(args.workers, 4), args.knn_k, args.knn_t)
    return model, optimizer, scaler, pipeline, monitor, output_dir


def read_resume_checkpoint(path: Path, required: bool, dist_info: DistInfo) -> dict | None:
    """Rank 0 reads the checkpoint and sends it to every process, so all resume from the same
    file (no shared filesystem needed) and all fail together on a bad one."""
    payload: object = None
    if dist_info.is_main and (required or path.is_file()):
        try:
            payload = load_checkpoint(path)
        except CheckpointError as e:
            payload = str(e)
    payload = broadcast_object(payload, src=0)
    if isinstance(payload, str):
        raise CheckpointError(payload)
    return payload


def resume(args, dist_info, model, optimizer, scaler, steps_per_epoch: int, output_dir: Path) -> dict:
    """Restore model (queue and target network included), optimizer, scaler, position and random
    streams from --resume or OUTPUT_DIR/checkpoint.pth.tar; returns where to continue."""
    start = {"epoch": args.start_epoch or 0, "step": 0, "meters": None}
    path = Path(args.resume) if args.resume else output_dir / "checkpoint.pth.tar"
    ckpt = read_resume_checkpoint(path, bool(args.resume), dist_info)
    if ckpt is None:
        return start
    check_compatible(ckpt, args, path)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"checkpoint '{path}' does not fit this model (other --moco-dim/--moco-k/--mlp/"
                         f"--mlp-dim?): {str(e).splitlines()[0]} ...") from e
    if "optimizer" in ckpt:
        optimizer.load_state_dict(without_stateless_extras(ckpt["optimizer"], optimizer))
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    start = {"epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0), "meters": ckpt.get("meters")}
    if start["step"] >= steps_per_epoch:  # a step checkpoint at an epoch's end
        start = {"epoch": start["epoch"] + 1, "step": 0, "meters": None}
    rng = ckpt.get("rng")
    if rng and len(rng) == dist_info.world_size:
        restore_rng_state(rng[dist_info.rank])
    elif rng:
        logger.warning("checkpoint from %d process(es), now %d: random streams restart (resume is not bitwise)",
                       len(rng), dist_info.world_size)
    warn_if_not_bitwise(ckpt, dist_info)
    logger.info("resumed from %s: epoch %d, step %d (global step %d)", path, start["epoch"], start["step"],
                ckpt.get("global_step", start["epoch"] * steps_per_epoch + start["step"]))
    return start


def without_stateless_extras(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict of an older version, fitted to `optimizer`.

    Before 2026-11-30 the key/target network's BatchNorm parameters under --bn-splits were left
    trainable (they never received gradients), so the optimizer listed them after the trained
    parameters, without any state. Dropping those trailing, stateless entries lets such a
    checkpoint resume exactly; anything else is left for load_state_dict to judge.
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


def warn_if_not_bitwise(ckpt: dict, dist_info: DistInfo) -> None:
    """Resume is bitwise only on the same kind of device with the same CPU thread count: on some
    CPUs (seen on AVX-512 machines) oneDNN picks other kernels, and so other summation orders, for
    another number of threads. Say so when either changed since the checkpoint was written."""
    threads, device = ckpt.get("num_threads"), ckpt.get("device_type")
    if threads is not None and threads != torch.get_num_threads():
        logger.warning("checkpoint written with %d CPU thread(s) per process, this run has %d: the run continues "
                       "correctly, but not bit for bit as an uninterrupted one would (OMP_NUM_THREADS=%d resumes bitwise)",
                       threads, torch.get_num_threads(), threads)
    if device is not None and device != dist_info.device.type:
        logger.warning("checkpoint written on %s, this run is on %s: the run continues correctly, but not bit "
                       "for bit as an uninterrupted one would", device, dist_info.device.type)


def _no_buffer_sync() -> dict:
    """DDP keyword that stops the per-step buffer broadcast (renamed in recent PyTorch)."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _all_ok(ok: bool, dist_info: DistInfo) -> bool:
    """True when every process is ok: a process that found bad input stops all of them, never
    leaving the others waiting in a collective."""
    return all_reduce_sum(torch.tensor([0.0 if ok else 1.0])).item() == 0


def train(args: argparse.Namespace, dist_info: DistInfo) -> int:
    setup_logging(dist_info.rank)
    error = None
    try:
        model, optimizer, scaler, pipeline, monitor, output_dir = prepare(args, dist_info)
    except _INPUT_ERRORS as e:
        error = e
    if not _all_ok(error is None, dist_info):
        logging.getLogger().error("error: %s", error or "another process found bad input (see rank 0's message)")
        return 2
    setup_logging(dist_info.rank, output_dir)
    steps_per_epoch = pipeline.sampler.steps_per_epoch
    try:
        start = resume(args, dist_info, model, optimizer, scaler, steps_per_epoch, output_dir)
    except _INPUT_ERRORS as e:
        logging.getLogger().error("error: %s", e)
        return 2
    if dist_info.is_main:
        with open(output_dir / "args.json", "w") as f:
            json.dump({k: v for k, v in vars(args).items()}, f, indent=1, default=str)
    if args.demo:
        logger.info("No data folder given: training on the embedded demo (%s).", pipeline.description)
    else:
        logger.info("Data: %s", pipeline.description)
    logger.info("%s %s, %d process(es) on %s%s, global batch %d, lr %.4g (%s), %d epochs -> %s", args.method,
                args.arch, dist_info.world_size, dist_info.device, f" ({dist_info.backend})" if dist_info.backend else "",
                args.batch_size, args.lr, args.optimizer, args.epochs, output_dir)
    if start["epoch"] >= args.epochs:
        logger.info("%s already holds a finished run of %d epochs; nothing to do (raise --epochs to train more, "
                    "or use another --output-dir).", output_dir, args.epochs)
        return 0

    ddp_model = model
    if dist_info.distributed:
        # The key/target network has requires_grad=False, so DDP ignores it: no unused parameters.
        # Buffers are not broadcast: every process enqueues the same gathered keys already.
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
            **_no_buffer_sync())

    stop = StopRequest().install()
    ctx = StepContext(
        method=args.method, epochs=args.epochs, steps_per_epoch=steps_per_epoch, base_lr=args.lr, cos=args.cos,
        schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        base_m=args.moco_m if args.method in ("moco", "byol") else None, m_cos=bool(args.moco_m_cos),
        amp=args.amp, print_freq=args.print_freq, global_batch=args.batch_size, dist=dist_info, stop=stop)
    metrics = MetricsWriter(output_dir, enabled=dist_info.is_main)
    latest = output_dir / "checkpoint.pth.tar"

    def save(epoch: int, step: int, meters: dict | None, also_as: str | None = None) -> None:
        rng = gather_rng_states()  # a collective: every process takes part
        if dist_info.is_main:
            state = checkpoint_state(model, optimizer, scaler, args, epoch, step, steps_per_epoch, rng, meters)
            save_atomic(state, latest)
            if also_as:
                save_atomic(state, output_dir / also_as)

    epoch = start["epoch"]
    try:
        for epoch in range(start["epoch"], args.epochs):
            start_step = start["step"] if epoch == start["epoch"] else 0
            pipeline.sampler.set_epoch(epoch, start_step)
            t0 = time.time()

            def after_step(steps_done: int, meters: dict, epoch=epoch) -> None:
                global_step = epoch * steps_per_epoch + steps_done
                if args.save_every_steps and global_step % args.save_every_steps == 0 and steps_done < steps_per_epoch:
                    save(epoch, steps_done, meters)  # epoch ends are saved below anyway

            stats = train_one_epoch(ddp_model, pipeline.loader, pipeline.to_device, optimizer, scaler, epoch,
                                    start_step, ctx, after_step,
                                    start["meters"] if epoch == start["epoch"] else None)
            # One model on every process before it is saved and evaluated: the BatchNorm running
            # statistics of each process followed its own batches (see broadcast_buffers_).
            broadcast_buffers_(model)
            if stats["stopped_at"] is not None and stats["stopped_at"] < steps_per_epoch:
                save(epoch, stats["stopped_at"], None)
                logger.info("stop signal %s: checkpoint written at epoch %d step %d; rerun the same command to resume",
                            stop.signum, epoch, stats["stopped_at"])
                return 0
            periodic = (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs
            save(epoch + 1, 0, None, also_as=f"checkpoint_{epoch:04d}.pth.tar" if periodic else None)
            record = {"epoch": epoch, **{k: v for k, v in stats.items() if k != "stopped_at"},
                      "epoch_time_s": time.time() - t0}
            if monitor is not None and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                t1 = time.time()
                record.update(monitor(unwrap(model).encoder_q), knn_time_s=time.time() - t1)
            record["collapse_warning"] = check_collapse(stats["embed_std"], args.moco_dim, epoch)
            metrics.write(record, step=epoch, prefix="pretrain/")
            logger.info("Epoch %d done: loss %.4f  lr %.4g  %s%sstd %.4f (1/sqrt(d) %.4f)  %.1f img/s  %.0fs%s",
                        epoch, stats["loss"], stats["lr"],
                        f"m {stats['momentum']:.4f}  " if stats["momentum"] is not None else "",
                        f"kNN top-1 {record['knn_top1']:.2f}  " if "knn_top1" in record else "",
                        stats["embed_std"] or 0, args.moco_dim ** -0.5, stats["images_per_s"] or 0,
                        record["epoch_time_s"],
                        f"  skipped {stats['skipped_images']} unreadable image(s)" if stats["skipped_images"] else "")
            if stats["stopped_at"] is not None:
                logger.info("stop signal %s at the end of epoch %d: checkpoint written; rerun to resume",
                            stop.signum, epoch)
                return 0
    except NonFiniteLossError as e:
        logging.getLogger().error("error: %s Last good checkpoint: %s", e,
                                  latest if latest.exists() else "none written yet")
        return 1
    except CheckpointError as e:
        logging.getLogger().error("error: %s Training stopped; rerun the same command once the problem is fixed "
                                  "to resume from the last checkpoint.", e)
        return 1
    finally:
        stop.uninstall()
        metrics.close()
    logger.info("Done: %d epochs. Latest checkpoint: %s", args.epochs, latest)
    return 0


# ---------------------------------------------------------------------------------------------- launch


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("main_pretrain.py", parents=[get_args_parser()],
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    try:
        args = resolve_config(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.multiprocessing_distributed:
        try:
            check_batch(args.batch_size, launch.spawned_world_size(args))  # before any process starts
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return launch.spawn(main, args)
    return main(args)


if __name__ == "__main__":
    sys.exit(cli())
