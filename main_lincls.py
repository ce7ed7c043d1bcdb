#!/usr/bin/env python
r"""Linear classification on frozen features (the linear evaluation protocol), MoCo's command line.

    python main_lincls.py --pretrained runs/moco-resnet18-demo/checkpoint.pth.tar    # the demo, one CPU process
    python main_lincls.py --pretrained PRETRAINED.pth.tar /imagenet                  # one process
    torchrun --nproc_per_node=8 main_lincls.py --pretrained PRETRAINED.pth.tar /imagenet
    python main_lincls.py -a resnet50 --lr 30.0 --batch-size 256 --pretrained moco_v2_800ep_pretrain.pth.tar \
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 /imagenet  # MoCo's way
    python main_lincls.py -e --pretrained PRETRAINED.pth.tar /imagenet               # evaluate the trained classifier

The backbone (weights and BatchNorm statistics) is frozen; only a new linear fc trains. --pretrained
takes this project's checkpoints (MoCo, BYOL, SimCLR) and facebookresearch/moco's; the architecture
comes from the checkpoint. With --train-aug none the frozen features are computed once and cached
(the demo's default). Running the same command again resumes from OUTPUT_DIR/checkpoint.pth.tar.
--batch-size is the global batch over all processes. See docs/EVALUATION.md for each method's recipe.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from selfsup import launch
from selfsup.builder import ARCHS
from selfsup.checkpoint import CheckpointError, check_writable, load_checkpoint, save_atomic
from selfsup.data import DEMO_ROOT
from selfsup.distributed import DistInfo, add_device_args, run_in_process_group
from selfsup.engine import NonFiniteLossError
from selfsup.knn import make_eval_loader
from selfsup.lincls import (TRAIN_AUGS, LinearProbe, Pretrained, SanityCheckError, UsageError, agree_on_error,
                            build_linear_optimizer, build_probe, cached_train_batches, changed_backbone_keys,
                            check_global_batch, default_output_dir, eval_transform, features_fingerprint,
                            image_batches, linear_eval_datasets, load_or_extract_features, load_pretrained,
                            row_batches, sanity_check, train_linear_epoch, train_transform, validate)
from selfsup.meters import MetricsWriter, setup_logging
from selfsup.optim import cosine_lr, step_lr
from selfsup.sampler import ResumableDistributedSampler

logger = logging.getLogger("main_lincls")

CHECKPOINT_KIND = "linear_classifier"


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of facebookresearch/moco's main_lincls.py (same names, meanings and defaults) plus ours."""
    p = argparse.ArgumentParser("Linear classification on frozen features", add_help=False)
    p.add_argument("data", nargs="?", default=None,
                   help="root with train/ and val/ class folders (ImageNet layout); omit it for the embedded "
                        "Fashion-MNIST demo")
    p.add_argument("-a", "--arch", default=None, choices=ARCHS,
                   help="backbone; default: the checkpoint's (a different one is an error), resnet50 without one")
    p.add_argument("-j", "--workers", default=None, type=int, help="data loading workers per process (default: 8; demo 1)")
    p.add_argument("--epochs", default=100, type=int, help="total epochs (default: 100)")
    p.add_argument("--start-epoch", default=None, type=int, help="manual epoch number (useful on restarts)")
    p.add_argument("-b", "--batch-size", default=256, type=int, help="GLOBAL batch size over all processes (default: 256)")
    p.add_argument("--lr", "--learning-rate", default=30.0, type=float, dest="lr",
                   help="initial learning rate, not scaled with the batch (default: 30, MoCo's; see docs/EVALUATION.md)")
    p.add_argument("--schedule", default=[60, 80], nargs="*", type=int,
                   help="epochs at which to drop the lr by 10x when not --cos (default: 60 80)")
    p.add_argument("--momentum", default=0.9, type=float, help="momentum (default: 0.9)")
    p.add_argument("--wd", "--weight-decay", default=0.0, type=float, dest="wd", help="weight decay (default: 0)")
    p.add_argument("-p", "--print-freq", default=10, type=int, help="print every N steps (default: 10)")
    p.add_argument("--resume", default="", type=str,
                   help="classifier checkpoint to resume or evaluate (default: OUTPUT_DIR/checkpoint.pth.tar if present)")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="only evaluate the trained classifier (--resume, else OUTPUT_DIR/model_best.pth.tar)")
    p.add_argument("--pretrained", default="", type=str, help="pretraining checkpoint whose backbone is evaluated")
    p.add_argument("--seed", default=0, type=int, help="seed of the classifier's init, data order and augmentation")
    # Ours.
    p.add_argument("--cos", action="store_true", help="cosine lr schedule instead of --schedule")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"], help="sgd (default) or lars")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SimCLR's and BYOL's protocols)")
    p.add_argument("--train-aug", default=None, choices=TRAIN_AUGS,
                   help="standard: RandomResizedCrop + flip (default); none: the validation transform, which trains "
                        "on cached features (the demo's default)")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="with --train-aug none, still run the backbone on the images every step")
    p.add_argument("--save-features", action="store_true",
                   help="also keep the cached features in OUTPUT_DIR (features_train.pth, features_val.pth) for reruns")
    p.add_argument("--image-size", default=None, type=int,
                   help="input size (default: the pretraining crop size recorded in the checkpoint, else 224)")
    p.add_argument("--output-dir", default=None,
                   help="where checkpoints and logs go (default: next to the pretrained checkpoint, in lincls/)")
    add_device_args(p, moco_gpu=True)
    launch.add_moco_launcher_args(p)
    return p


def resolve_config(args: argparse.Namespace) -> argparse.Namespace:
    out = argparse.Namespace(**vars(args))
    out.demo = args.data is None
    if out.demo:
        out.data = str(DEMO_ROOT)
    # The demo trains on cached features: the whole MoCo schedule (100 epochs) in seconds.
    out.train_aug = args.train_aug or ("none" if out.demo else "standard")
    out.workers = args.workers if args.workers is not None else (1 if out.demo else 8)
    if out.output_dir is None:
        if out.pretrained:
            out.output_dir = str(default_output_dir(out.pretrained, "lincls"))
        else:
            arch = out.arch or ("resnet18" if out.demo else "resnet50")
            out.output_dir = os.path.join("runs", f"lincls-{arch}-random-init" + ("-demo" if out.demo else ""))
    out.cached = out.train_aug == "none" and not out.no_feature_cache
    return out


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Setup:
    probe: LinearProbe
    pretrained: Pretrained | None
    train_ds: object
    val_ds: object
    classes: list[str]
    optimizer: torch.optim.Optimizer
    sampler: ResumableDistributedSampler | None  # None with --evaluate
    local_batch: int
    arch: str
    small_stem: bool
    image_size: int
    start_epoch: int
    best_acc1: float
    output_dir: Path
    resumed_from: Path | None


def classifier_checkpoint_path(args: argparse.Namespace, output_dir: Path) -> Path | None:
    """The classifier checkpoint to resume (training) or to evaluate (-e), if any."""
    if args.resume:
        return Path(args.resume)
    names = ("model_best.pth.tar", "checkpoint.pth.tar") if args.evaluate else ("checkpoint.pth.tar",)
    return next((output_dir / n for n in names if (output_dir / n).is_file()), None)


def _peek(path: Path) -> dict:
    """arch, small_stem and image_size recorded in a classifier checkpoint."""
    ckpt = load_checkpoint(path)
    return {k: ckpt.get(k) for k in ("arch", "small_stem", "image_size")}


def restore_classifier(path: Path, setup: Setup) -> dict:
    """Load a classifier checkpoint of this script into the probe; check it fits this run."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != CHECKPOINT_KIND and "best_acc1" not in ckpt:
        raise UsageError(f"'{path}' is not a linear-classifier checkpoint (a pretraining one? pass it as --pretrained)")
    problems = []
    if ckpt.get("arch") not in (None, setup.arch):
        problems.append(f"arch {ckpt['arch']!r} (this run: {setup.arch!r})")
    if "classes" in ckpt and list(ckpt["classes"]) != setup.classes:
        problems.append(f"{len(ckpt['classes'])} classes {list(ckpt['classes'])[:5]}... (this data: {len(setup.classes)})")
    if problems:
        raise UsageError(f"'{path}' was trained in another setting: {', '.join(problems)}. Use a new --output-dir.")
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    try:
        setup.probe.load_resnet_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"'{path}' does not fit this model: {str(e).splitlines()[0]}") from e
    if setup.pretrained is not None:
        changed = changed_backbone_keys(setup.probe, setup.pretrained.weights)
        if changed:
            raise UsageError(
                f"'{path}' holds a classifier trained on another backbone than {setup.pretrained.path} "
                f"({len(changed)} backbone entries differ, e.g. {changed[0]}): the pretrained checkpoint changed "
                "since. Use a new --output-dir (or delete this one) to evaluate it afresh."
            )
    return ckpt


def prepare(args: argparse.Namespace, dist_info: DistInfo) -> Setup:
    """Validate every input and build everything, without any collective (see agree_on_error)."""
    local_batch = check_global_batch(args.batch_size, dist_info.world_size)
    output_dir = Path(args.output_dir)
    if dist_info.is_main:
        check_writable(output_dir)
    pretrained = load_pretrained(args.pretrained, args.arch) if args.pretrained else None
    path = classifier_checkpoint_path(args, output_dir)
    if args.evaluate and path is None:
        raise UsageError(f"--evaluate needs a trained classifier: none in {output_dir}; pass --resume PATH")
    # The backbone's description: the pretrained checkpoint's, else the classifier's (-e --resume
    # alone), else the flags (a randomly initialised baseline).
    described = (vars(pretrained) if pretrained else None) or (_peek(path) if path is not None else {})
    arch = described.get("arch") or args.arch or ("resnet18" if args.demo else "resnet50")
    if args.arch and arch != args.arch:
        raise UsageError(f"'{path}' holds a {arch} classifier but -a {args.arch} was given; leave -a out")
    small_stem = bool(described.get("small_stem", False))
    image_size = args.image_size or described.get("image_size") or (32 if args.demo else 224)

    train_ds, val_ds, classes = linear_eval_datasets(args.data, train_transform(image_size, args.train_aug),
                                                     eval_transform(image_size))
    sampler = None if args.evaluate else ResumableDistributedSampler(
        len(train_ds), local_batch, dist_info.world_size, dist_info.rank, seed=args.seed)  # checks the batch fits
    torch.manual_seed(args.seed)
    probe = build_probe(arch, small_stem, len(classes), pretrained.weights if pretrained else None)
    probe.to(dist_info.device)
    optimizer = build_linear_optimizer(args.optimizer, probe.fc.parameters(), args.lr, args.momentum, args.wd,
                                       args.nesterov)
    setup = Setup(probe, pretrained, train_ds, val_ds, classes, optimizer, sampler, local_batch, arch, small_stem,
                  image_size, args.start_epoch or 0, -1.0, output_dir, None)

    if path is not None:
        ckpt = restore_classifier(path, setup)
        setup.start_epoch = int(ckpt.get("epoch", 0))
        if not args.evaluate:
            optimizer.load_state_dict(ckpt["optimizer"])
        setup.best_acc1 = float(ckpt.get("best_acc1", -1.0))
        setup.resumed_from = path
    return setup


# ---------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    """Set up this process (and its process group), run, and return the exit status."""
    return run_in_process_group(run, args, args.device)


def lr_schedule(args: argparse.Namespace):
    if args.cos:
        return lambda epoch: cosine_lr(args.lr, epoch, args.epochs)
    return lambda epoch: step_lr(args.lr, epoch, args.schedule)


def classifier_state(setup: Setup, args: argparse.Namespace, epoch: int, best_acc1: float, val: dict) -> dict:
    """Plain types only (loads with weights_only=True). state_dict keys are torchvision names with
    the DDP prefix, as MoCo's classifier checkpoints; its backbone part feeds --pretrained too."""
    return {
        "kind": CHECKPOINT_KIND,
        "epoch": epoch,  # the next epoch to train
        "arch": setup.arch,
        "small_stem": setup.small_stem,
        "image_size": setup.image_size,
        "num_classes": len(setup.classes),
        "classes": list(setup.classes),
        "state_dict": {f"module.{k}": v for k, v in setup.probe.resnet_state_dict().items()},
        "best_acc1": best_acc1,
        "val": dict(val),
        "optimizer": setup.optimizer.state_dict(),
        "pretrained": setup.pretrained.path if setup.pretrained else None,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
    }


def run(args: argparse.Namespace, dist_info: DistInfo) -> int:
    setup_logging(dist_info.rank)
    setup, error = None, None
    try:
        setup = prepare(args, dist_info)
    except (UsageError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        error = e
    if agree_on_error(error, dist_info):
        return 2
    output_dir, device, probe = setup.output_dir, dist_info.device, setup.probe
    setup_logging(dist_info.rank, output_dir)
    if dist_info.is_main:
        with open(output_dir / "args.json", "w") as f:
            json.dump(vars(args), f, indent=1, default=str)
    logger.info("%s%s %s (%s) at %dpx, %d classes, %d train / %d val images from %s",
                "Demo: " if args.demo else "", setup.arch, "small stem" if setup.small_stem else "standard stem",
                f"pretrained {args.pretrained}" if setup.pretrained else (
                    f"backbone of {setup.resumed_from}" if args.evaluate else "RANDOM INIT: a baseline, not an evaluation"),
                setup.image_size, len(setup.classes), len(setup.train_ds), len(setup.val_ds), args.data)
    if setup.resumed_from:
        logger.info("classifier restored from %s (%d epochs trained, best acc@1 %.2f)", setup.resumed_from,
                    setup.start_epoch, setup.best_acc1)
    metrics = MetricsWriter(output_dir, enabled=dist_info.is_main)
    pin = device.type == "cuda"
    val_loader = make_eval_loader(setup.val_ds, setup.local_batch, args.workers, pin)
    try:
        if args.evaluate:
            val = validate(probe, image_batches(val_loader, device), device)
            logger.info(" * Acc@1 %.3f Acc@5 %.3f (%d images, loss %.4f)", val["val_acc1"], val["val_acc5"],
                        val["val_n"], val["val_loss"])
            metrics.write({"evaluate": str(setup.resumed_from), **val})
            return 0
        return train(args, dist_info, setup, val_loader, metrics)
    finally:
        metrics.close()


def train(args: argparse.Namespace, dist_info: DistInfo, setup: Setup, val_loader: DataLoader,
          metrics: MetricsWriter) -> int:
    """Extract features when cached, then the epochs: train, validate, checkpoint, sanity check."""
    output_dir, device, probe = setup.output_dir, dist_info.device, setup.probe
    logger.info("%s: global batch %d on %d process(es) (%s), %s lr %.4g (%s), wd %g, %d epochs -> %s",
                "cached features" if args.cached else f"images, train aug {args.train_aug}", args.batch_size,
                dist_info.world_size, device, args.optimizer + (" nesterov" if args.nesterov else ""), args.lr,
                "cosine" if args.cos else f"x0.1 at {args.schedule}", args.wd, args.epochs, output_dir)
    if setup.start_epoch >= args.epochs:
        logger.info("%s already holds a finished run of %d epochs (best acc@1 %.2f); nothing to do.", output_dir,
                    args.epochs, setup.best_acc1)
        return 0

    if args.cached:
        t0 = time.perf_counter()
        train_loader = make_eval_loader(setup.train_ds, setup.local_batch, args.workers, device.type == "cuda")
        fingerprint = {}
        if args.save_features:
            weights = probe.backbone.state_dict()
            fingerprint = {name: features_fingerprint(weights, ds.transform, ds.samples)
                           for name, ds in (("train", setup.train_ds), ("val", setup.val_ds))}
        cache = {name: output_dir / f"features_{name}.pth" for name in fingerprint}  # empty without --save-features
        train_feats, train_labels = load_or_extract_features(probe.backbone, train_loader, device, cache.get("train"),
                                                             fingerprint.get("train", ""))
        val_feats, val_labels = load_or_extract_features(probe.backbone, val_loader, device, cache.get("val"),
                                                         fingerprint.get("val", ""))
        extract_s = time.perf_counter() - t0
        logger.info("features of %d + %d images (%d dims) ready in %.1fs", train_feats.shape[0], val_feats.shape[0],
                    train_feats.shape[1], extract_s)
        metrics.write({"event": "features", "train_n": train_feats.shape[0], "val_n": val_feats.shape[0],
                       "dim": train_feats.shape[1], "time_s": extract_s})
    else:
        train_loader = DataLoader(setup.train_ds, batch_size=setup.local_batch, sampler=setup.sampler,
                                  num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
                                  persistent_workers=args.workers > 0,
                                  generator=torch.Generator().manual_seed(args.seed))

    # Cached features: the global batches of the image path (same permutation, see
    # ResumableDistributedSampler), all on this process; the head is tiny, so rather than
    # splitting them and averaging gradients, every process computes them all, identically.
    replica_sampler = ResumableDistributedSampler(len(setup.train_ds), args.batch_size, 1, 0, seed=args.seed)
    fc = probe.fc
    if dist_info.distributed and not args.cached:  # only the classifier has gradients to average
        fc = torch.nn.parallel.DistributedDataParallel(
            probe.fc, device_ids=[device.index] if device.type == "cuda" else None)
    lr_at = lr_schedule(args)
    best_acc1 = setup.best_acc1
    steps = setup.sampler.steps_per_epoch
    t_start = last_save = time.perf_counter()
    best_state = None  # the best epoch's checkpoint, until written
    try:
        for epoch in range(setup.start_epoch, args.epochs):
            t0 = time.perf_counter()
            setup.sampler.set_epoch(epoch)
            probe.train()  # the backbone stays in eval mode (LinearProbe.train)
            if args.cached:  # every process trains the same classifier on whole global batches
                replica_sampler.set_epoch(epoch)
                batches = cached_train_batches(train_feats, train_labels, replica_sampler)
                stats = train_linear_epoch(probe.fc, batches, setup.optimizer, lr_at, epoch, steps, device, reduce=False)
                val = validate(probe.fc, row_batches(val_feats, val_labels, args.batch_size), device, reduce=False)
            else:
                batches = ((probe.features(x), y) for x, y in image_batches(train_loader, device))
                stats = train_linear_epoch(fc, batches, setup.optimizer, lr_at, epoch, steps, device, args.print_freq)
                val = validate(probe, image_batches(val_loader, device), device)
            is_best = val["val_acc1"] > best_acc1
            best_acc1 = max(best_acc1, val["val_acc1"])
            if dist_info.is_main:
                state = classifier_state(setup, args, epoch + 1, best_acc1, val)
                if is_best:  # a snapshot: the live fc and optimizer keep changing
                    best_state = {**state, "state_dict": {k: v.clone() for k, v in state["state_dict"].items()},
                                  "optimizer": copy.deepcopy(state["optimizer"])}
                # An epoch on cached features takes milliseconds: checkpoint once a minute and at the end
                # rather than rewriting the whole backbone every epoch.
                if not args.cached or epoch + 1 == args.epochs or time.perf_counter() - last_save >= 60:
                    save_atomic(state, output_dir / "checkpoint.pth.tar")
                    if best_state is not None:
                        save_atomic(best_state, output_dir / "model_best.pth.tar")
                        best_state = None
                    last_save = time.perf_counter()
            if epoch == setup.start_epoch and setup.pretrained is not None:
                sanity_check(probe, setup.pretrained.path)  # every process checks its own copy
            record = {"epoch": epoch, **stats, **val, "best_acc1": best_acc1, "epoch_time_s": time.perf_counter() - t0}
            metrics.write(record, step=epoch, prefix="lincls/")
            logger.info("Epoch %d: train loss %.4f acc@1 %.2f | val loss %.4f acc@1 %.2f acc@5 %.2f (best %.2f) | "
                        "lr %.4g | %.1fs", epoch, stats["train_loss"], stats["train_acc1"], val["val_loss"],
                        val["val_acc1"], val["val_acc5"], best_acc1, stats["lr"], record["epoch_time_s"])
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except SanityCheckError as e:
        print(f"error: sanity check failed: {e}", file=sys.stderr, flush=True)
        return 1
    logger.info("Done: %d epochs in %.1fs. Last: acc@1 %.2f acc@5 %.2f; best acc@1 %.2f. Classifier: %s",
                args.epochs - setup.start_epoch, time.perf_counter() - t_start, val["val_acc1"], val["val_acc5"],
                best_acc1, output_dir / "checkpoint.pth.tar")
    return 0


# ---------------------------------------------------------------------------------------------- launch


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("main_lincls.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = resolve_config(parser.parse_args(argv))
    if args.multiprocessing_distributed:
        try:
            check_global_batch(args.batch_size, launch.spawned_world_size(args))
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return launch.spawn(main, args)
    return main(args)


if __name__ == "__main__":
    sys.exit(cli())
