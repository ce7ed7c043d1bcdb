#!/usr/bin/env python
r"""Linear classification on frozen features (the linear evaluation protocol), MoCo's command line.

    python main_lincls.py --pretrained runs/simclr-resnet18-demo/checkpoint.pth.tar    # the demo, one CPU process
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
This file holds the arguments and the building; the epochs are selfsup.lincls.train_probe.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import _bootstrap  # noqa: F401  (first: a plain clone finds selfsup in its ssl/)

from selfsup.backbones import ARCH_HELP, ARCHS
from selfsup.checkpoint import check_writable, load_checkpoint
from selfsup.cli import (add_moco_launcher_args, check_numbers, evaluation_folder, launch,
                         per_process_batch, write_args)
from selfsup.data import DEMO_ROOT
from selfsup.data.sampler import ResumableDistributedSampler
from selfsup.distributed import DistInfo, add_device_args, configure_kernels, run_in_process_group
from selfsup.errors import UsageError
from selfsup.knn import make_eval_loader
from selfsup.lincls import ProbeRun, classifier_state, image_batches, restore_classifier, train_probe, validate
from selfsup.meters import MetricsWriter, setup_logging
from selfsup.optim import build_optimizer, learning_rate
from selfsup.probe import (TRAIN_AUGS, LinearProbe, Pretrained, build_probe, eval_transform, linear_eval_datasets,
                           load_pretrained, readable, train_transform)
from selfsup.recipes import PROTOCOL_FLAGS, linear_protocol, protocols_by_method
from selfsup.resume import restore_run_state, run_holding_folder

logger = logging.getLogger("main_lincls")


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of facebookresearch/moco's main_lincls.py (same names, meanings and defaults) plus ours."""
    p = argparse.ArgumentParser("Linear classification on frozen features", add_help=False)
    by_method = protocols_by_method  # each method's protocol, for the help
    p.add_argument("data", nargs="?", default=None,
                   help="root with train/ and val/ class folders (ImageNet layout); omit it for the embedded "
                        "Fashion-MNIST demo")
    p.add_argument("--pretrained", default="", type=str, help="pretraining checkpoint whose backbone is evaluated")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="only evaluate the trained classifier (--resume, else OUTPUT_DIR/model_best.pth.tar)")
    g = p.add_argument_group("data and model")
    g.add_argument("-a", "--arch", default=None, choices=ARCHS, metavar="ARCH",
                   help=f"backbone; default: the checkpoint's (a different one is an error), resnet50 without one; "
                        f"names the ViT variant of a checkpoint that does not record it: {', '.join(ARCHS)}. {ARCH_HELP}")
    g.add_argument("-j", "--workers", default=None, type=int, help="data loading workers per process (default: CPUs per process - 1)")
    g.add_argument("--image-size", default=None, type=int,
                   help="input size (default: the pretraining crop size recorded in the checkpoint, else 224)")
    g.add_argument("--train-aug", default=None, choices=TRAIN_AUGS,
                   help="standard: RandomResizedCrop + flip (default); none: the validation transform, which trains "
                        "on cached features (the demo's default)")
    g.add_argument("--no-feature-cache", action="store_true",
                   help="with --train-aug none, still run the backbone on the images every step")
    g.add_argument("--feature-bn", action="store_true",
                   help="standardise the features before the classifier (BatchNorm without affine, MAE's linear probe)")
    g.add_argument("--save-features", action="store_true",
                   help="also keep the cached features in OUTPUT_DIR (features_train.pth, features_val.pth) for reruns")
    g = p.add_argument_group("optimisation (default: the checkpoint's method's protocol, docs/EVALUATION.md)")
    g.add_argument("--epochs", default=None, type=int, help=f"total epochs ({by_method('epochs')})")
    g.add_argument("-b", "--batch-size", default=256, type=int, help="GLOBAL batch size over all processes (default: 256)")
    g.add_argument("--lr", "--learning-rate", default=None, type=float, dest="lr",
                   help=f"initial learning rate, not scaled with the batch ({by_method('lr')})")
    g.add_argument("--optimizer", default=None, choices=["sgd", "lars"], help="sgd (the protocols') or lars")
    g.add_argument("--momentum", default=0.9, type=float, help="momentum (default: 0.9)")
    g.add_argument("--nesterov", default=None, action=argparse.BooleanOptionalAction,
                   help=f"Nesterov momentum ({by_method('nesterov')})")
    g.add_argument("--wd", "--weight-decay", default=None, type=float, dest="wd", help=f"weight decay ({by_method('wd')})")
    g.add_argument("--cos", default=None, action=argparse.BooleanOptionalAction,
                   help=f"cosine lr schedule instead of --schedule ({by_method('cos')})")
    g.add_argument("--schedule", default=None, nargs="*", type=int,
                   help=f"epochs at which to drop the lr by 10x when not --cos ({by_method('schedule')})")
    g.add_argument("--seed", default=0, type=int, help="seed of the classifier's init, data order and augmentation")
    g = p.add_argument_group("distributed (torchrun needs none of these)")
    add_device_args(g, moco_gpu=True)
    add_moco_launcher_args(g)
    g = p.add_argument_group("checkpoints and monitoring")
    g.add_argument("--output-dir", default=None,
                   help="where checkpoints and logs go (default: next to the pretrained checkpoint, in lincls/)")
    g.add_argument("--resume", default="", type=str,
                   help="classifier checkpoint to resume or evaluate (default: OUTPUT_DIR/checkpoint.pth.tar if present)")
    g.add_argument("--start-epoch", default=None, type=int, help="manual epoch number (useful on restarts)")
    g.add_argument("-p", "--print-freq", default=10, type=int, help="print every N steps (default: 10)")
    return p


def resolve_config(args: argparse.Namespace) -> argparse.Namespace:
    out = argparse.Namespace(**vars(args))
    out.demo = args.data is None
    if out.demo:
        out.data = str(DEMO_ROOT)
    # The demo trains on cached features: the whole MoCo schedule (100 epochs) in seconds.
    out.train_aug = args.train_aug or ("none" if out.demo else "standard")
    if out.output_dir is None:
        if out.pretrained:
            out.output_dir = str(evaluation_folder(out.pretrained, "lincls"))
        else:
            arch = out.arch or ("resnet18" if out.demo else "resnet50")
            out.output_dir = os.path.join("runs", f"lincls-{arch}-random-init" + ("-demo" if out.demo else ""))
    out.cached = out.train_aug == "none" and not out.no_feature_cache
    return out


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
    resumed_from: Path | None


def classifier_checkpoint_path(args: argparse.Namespace) -> Path | None:
    """The classifier checkpoint to resume (training) or to evaluate (-e), if any."""
    if args.resume:
        return Path(args.resume)
    names = ("model_best.pth.tar", "checkpoint.pth.tar") if args.evaluate else ("checkpoint.pth.tar",)
    return next((Path(args.output_dir) / n for n in names if (Path(args.output_dir) / n).is_file()), None)


def prepare(args: argparse.Namespace, dist_info: DistInfo) -> Setup:
    """Validate every input and build everything, without any collective (see agree_on_error)."""
    local_batch = per_process_batch(args.batch_size, dist_info.world_size)
    if dist_info.is_main:
        check_writable(args.output_dir, create=False)  # created when the run takes it (RunLock)
    pretrained = load_pretrained(args.pretrained, args.arch) if args.pretrained else None
    path = classifier_checkpoint_path(args)
    if args.evaluate and path is None:
        raise UsageError(f"--evaluate needs a trained classifier: none in {args.output_dir}; pass --resume PATH")
    ckpt = load_checkpoint(path) if path is not None else None
    if ckpt is not None and not args.evaluate:  # a resumed run keeps its schedule unless a flag changes it
        for key in PROTOCOL_FLAGS:
            if getattr(args, key) is None and (ckpt.get("args") or {}).get(key) is not None:
                setattr(args, key, ckpt["args"][key])
    args.features = ckpt.get("features", {}) if ckpt is not None else None  # the classifier's, else the protocol's
    args.protocol = linear_protocol(args, pretrained.method if pretrained else None, pretrained.arch if pretrained else None)
    check_numbers(args, positive=("epochs", "batch_size", "lr", "image_size"),
                  non_negative=("workers", "wd", "momentum", "schedule", "print_freq"))
    # The backbone's description: the pretrained checkpoint's, else the classifier's (-e --resume
    # alone), else the flags (a randomly initialised baseline).
    described = (vars(pretrained) if pretrained else None) or ckpt or {}
    arch = described.get("arch") or args.arch or ("resnet18" if args.demo else "resnet50")
    if args.arch and arch != args.arch:
        raise UsageError(f"'{path}' holds a {arch} classifier but -a {args.arch} was given; leave -a out")
    small_stem = bool(described.get("small_stem", False))
    image_size = args.image_size or described.get("image_size") or (32 if args.demo else 224)

    train_ds, val_ds, classes = linear_eval_datasets(args.data, train_transform(image_size, args.train_aug),
                                                     eval_transform(image_size))
    sampler = None if args.evaluate else ResumableDistributedSampler(
        len(train_ds), local_batch, dist_info.world_size, dist_info.rank, seed=args.seed)  # checks the batch fits
    configure_kernels(deterministic=False)  # fixed-size batches: cuDNN's autotuner
    torch.manual_seed(args.seed)
    feature_bn = args.feature_bn or bool((ckpt or {}).get("feature_bn"))
    probe = build_probe(arch, small_stem, len(classes), pretrained.weights if pretrained else None, feature_bn,
                        args.features)
    probe.to(dist_info.device)
    optimizer = build_optimizer(args.optimizer, probe.fc.parameters(), args.lr, args.momentum, args.wd, args.nesterov)
    setup = Setup(probe, pretrained, train_ds, val_ds, classes, optimizer, sampler, local_batch, arch, small_stem,
                  image_size, args.start_epoch or 0, -1.0, None)
    if ckpt is not None:
        restore_classifier(path, ckpt, probe, arch=arch, classes=classes, pretrained=pretrained)
        if not args.evaluate:
            restore_run_state(ckpt, dist_info, optimizer)
        setup.start_epoch, setup.best_acc1 = int(ckpt.get("epoch", 0)), float(ckpt.get("best_acc1", -1.0))
        setup.resumed_from = path
    return setup


def run(args: argparse.Namespace, dist_info: DistInfo) -> int:
    setup_logging(dist_info.rank)
    return run_holding_folder(args, dist_info, lambda: prepare(args, dist_info),
                              lambda setup: evaluate(args, dist_info, setup))


def evaluate(args: argparse.Namespace, dist_info: DistInfo, setup: Setup) -> int:
    """Train the classifier of `setup` in its folder (or evaluate it, -e); the exit status."""
    output_dir, device, probe = Path(args.output_dir), dist_info.device, setup.probe
    setup_logging(dist_info.rank, output_dir)
    setup.val_ds = readable(setup.val_ds, "the validation set", dist_info, args.workers)
    write_args(output_dir, args, dist_info)
    logger.info("%s%s %s (%s) at %dpx, %d classes, %d train / %d val images from %s",
                "Demo: " if args.demo else "", setup.arch, "small stem" if setup.small_stem else "standard stem",
                f"pretrained {args.pretrained}" if setup.pretrained else (
                    f"backbone of {setup.resumed_from}" if args.evaluate else "RANDOM INIT: a baseline, not an evaluation"),
                setup.image_size, len(setup.classes), len(setup.train_ds), len(setup.val_ds), args.data)
    logger.info(args.protocol)
    if setup.resumed_from:
        logger.info("classifier restored from %s (%d epochs trained, best acc@1 %.2f)", setup.resumed_from,
                    setup.start_epoch, setup.best_acc1)
    metrics = MetricsWriter(output_dir, enabled=dist_info.is_main)
    try:
        if args.evaluate:
            val_loader = make_eval_loader(setup.val_ds, setup.local_batch, args.workers, device.type == "cuda")
            probe.eval()  # the feature standardisation, if any, with its saved statistics
            val = validate(probe, image_batches(val_loader, device, readable_only=True), device)
            logger.info(" * Acc@1 %.3f Acc@5 %.3f (%d images, loss %.4f)", val["val_acc1"], val["val_acc5"],
                        val["val_n"], val["val_loss"])
            metrics.write({"evaluate": str(setup.resumed_from), **val})
            return 0
        logger.info("%s: global batch %d on %d process(es) (%s), %s lr %.4g (%s), wd %g, %d epochs -> %s",
                    "cached features" if args.cached else f"images, train aug {args.train_aug}", args.batch_size,
                    dist_info.world_size, device, args.optimizer + (" nesterov" if args.nesterov else ""), args.lr,
                    "cosine" if args.cos else f"x0.1 at {args.schedule}", args.wd, args.epochs, output_dir)
        if setup.start_epoch >= args.epochs:
            logger.info("%s already holds a finished run of %d epochs (best acc@1 %.2f); nothing to do.", output_dir,
                        args.epochs, setup.best_acc1)
            return 0

        def state(epoch: int, best_acc1: float, val: dict) -> dict:
            return classifier_state(probe, setup.optimizer, args, dist_info, epoch=epoch, best_acc1=best_acc1,
                                    val=val, arch=setup.arch, small_stem=setup.small_stem, image_size=setup.image_size,
                                    classes=setup.classes, pretrained=setup.pretrained.path if setup.pretrained else None)

        def lr_at(epoch: float) -> float:
            return learning_rate(args.lr, epoch, args.epochs, args.cos, args.schedule)

        training = ProbeRun(dist=dist_info, epochs=args.epochs, lr_at=lr_at, global_batch=args.batch_size,
                            workers=args.workers, seed=args.seed, cached=args.cached, output_dir=output_dir,
                            state=state, metrics=metrics, save_features=args.save_features,
                            print_freq=args.print_freq,
                            pretrained_path=setup.pretrained.path if setup.pretrained else None)
        return train_probe(probe, setup.optimizer, setup.train_ds, setup.val_ds, setup.sampler, training,
                           setup.start_epoch, setup.best_acc1)
    finally:
        metrics.close()


def main(args: argparse.Namespace) -> int:
    """Set up this process (and its process group), run, and return the exit status."""
    return run_in_process_group(run, args, args.device)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("main_lincls.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return launch(main, resolve_config(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
