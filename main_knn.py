#!/usr/bin/env python
"""Weighted k-NN evaluation of a pretrained backbone: the fast way to check a checkpoint.

    python main_knn.py --pretrained runs/simclr-resnet18-demo/checkpoint.pth.tar     # the demo, one CPU process
    python main_knn.py --pretrained PRETRAINED.pth.tar /imagenet
    torchrun --nproc_per_node=8 main_knn.py --pretrained PRETRAINED.pth.tar --k 10 20 100 200 /imagenet

Features of ROOT/train and ROOT/val come from the frozen backbone (eval mode, the validation
transform), each image computed once by one process; every val image is classified by the
L2-normalised cosine similarity to its k nearest training images, each voting exp(sim / T) for
its class (InstDisc, DINO). Top-1/top-5 over the whole val set equal the single-process figures
for any number of processes. Results go to OUTPUT_DIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a plain clone finds selfsup in its ssl/)

from selfsup.backbones import ARCH_HELP, ARCHS
from selfsup.checkpoint import check_writable
from selfsup.cli import agree_on_error, check_numbers, default_workers, evaluation_folder, per_process_batch, report
from selfsup.data import DEMO_ROOT
from selfsup.distributed import DistInfo, add_device_args, run_in_process_group
from selfsup.errors import INPUT_ERRORS, UsageError
from selfsup.knn import extract_features, knn_evaluate, make_eval_loader
from selfsup.meters import MetricsWriter, setup_logging
from selfsup.probe import build_probe, eval_transform, linear_eval_datasets, load_pretrained, readable

logger = logging.getLogger("main_knn")


# The neighbours reported by default: InstDisc's and MoCo's 200; DINO's eval_knn.py --nb_knn list.
DEFAULT_K = {None: (200,), "dino": (10, 20, 100, 200)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Weighted k-NN evaluation", add_help=False)
    p.add_argument("data", nargs="?", default=None,
                   help="root with train/ and val/ class folders; omit it for the embedded Fashion-MNIST demo")
    p.add_argument("--pretrained", required=True, help="pretraining checkpoint whose backbone is evaluated")
    p.add_argument("-a", "--arch", default=None, choices=ARCHS, metavar="ARCH",
                   help=f"backbone (default: the checkpoint's): {', '.join(ARCHS)}. {ARCH_HELP}")
    p.add_argument("-j", "--workers", default=None, type=int,
                   help="data loading workers per process (default: CPUs per process - 1)")
    p.add_argument("-b", "--batch-size", default=256, type=int, help="GLOBAL batch of the feature extraction (default: 256)")
    p.add_argument("--k", "--nb-knn", default=None, nargs="+", type=int, dest="k",
                   help="numbers of neighbours to report (default: 200; a DINO checkpoint: 10 20 100 200, as "
                        "DINO's eval_knn.py, whose README reports 20-NN)")
    p.add_argument("-t", "--temperature", default=0.07, type=float, help="temperature of the vote weights (default: 0.07)")
    p.add_argument("--image-size", default=None, type=int,
                   help="input size (default: the pretraining crop size recorded in the checkpoint, else 224)")
    p.add_argument("--output-dir", default=None, help="where the log and metrics go (default: next to the checkpoint, in knn/)")
    add_device_args(p)
    return p


def run(args: argparse.Namespace, dist_info: DistInfo) -> int:
    setup_logging(dist_info.rank)
    error = None
    try:
        local_batch = per_process_batch(args.batch_size, dist_info.world_size)
        if dist_info.is_main:
            check_writable(args.output_dir)
        pretrained = load_pretrained(args.pretrained, args.arch)
        image_size = args.image_size or pretrained.image_size or 224
        transform = eval_transform(image_size)
        train_ds, val_ds, classes = linear_eval_datasets(args.data, transform, transform)
        # The default features, whatever a linear protocol reads: DINO's eval_knn.py takes `model(inp)`,
        # a ViT's cls token after the final norm, not eval_linear.py's last blocks.
        probe = build_probe(pretrained.arch, pretrained.small_stem, len(classes), pretrained.weights)
        args.k = args.k or list(DEFAULT_K.get(pretrained.method, DEFAULT_K[None]))
    except INPUT_ERRORS as e:
        error = e
    if agree_on_error(error, dist_info):
        return 2
    setup_logging(dist_info.rank, args.output_dir)
    val_ds = readable(val_ds, "the validation set", dist_info, args.workers)  # the bank: left out at extraction
    device = dist_info.device
    backbone = probe.to(device).trunk()
    logger.info("%s %s at %dpx from %s; %d classes, %d train / %d val images from %s; %d process(es) on %s",
                pretrained.arch, "small stem" if pretrained.small_stem else "standard stem", image_size,
                args.pretrained, len(classes), len(train_ds), len(val_ds), args.data, dist_info.world_size, device)
    t0 = time.perf_counter()
    pin = device.type == "cuda"
    train_feats, train_labels = extract_features(backbone, make_eval_loader(train_ds, local_batch, args.workers, pin),
                                                 device)
    val_feats, val_labels = extract_features(backbone, make_eval_loader(val_ds, local_batch, args.workers, pin), device)
    extract_s = time.perf_counter() - t0
    logger.info("features: %d + %d images, %d dims, %.1fs", len(train_feats), len(val_feats), train_feats.shape[1],
                extract_s)
    t0 = time.perf_counter()
    results = knn_evaluate(train_feats, train_labels, val_feats, val_labels, len(classes), args.k, args.temperature)
    knn_s = time.perf_counter() - t0
    metrics = MetricsWriter(args.output_dir, enabled=dist_info.is_main, tensorboard=False)
    for k, r in results.items():
        logger.info("%d-NN (T=%g): top-1 %.2f  top-5 %.2f  (%d / %d val images)", k, args.temperature, r["top1"],
                    r["top5"], r["correct1"], r["n"])
        metrics.write({"k": k, "T": args.temperature, **r, "pretrained": args.pretrained, "train_n": len(train_feats),
                       "extract_time_s": extract_s, "knn_time_s": knn_s})
    metrics.close()
    return 0


def main(args: argparse.Namespace) -> int:
    """Set up this process (and its process group), run, and return the exit status."""
    return run_in_process_group(run, args, args.device)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("main_knn.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    try:
        check_numbers(args, positive=("batch_size", "k", "temperature", "image_size"), non_negative=("workers",))
    except UsageError as e:
        return report(e)
    args.k = list(dict.fromkeys(args.k)) if args.k else None  # --k 200 200: one row
    args.demo = args.data is None
    if args.demo:
        args.data = str(DEMO_ROOT)
    if args.workers is None:
        args.workers = default_workers()
    args.output_dir = Path(args.output_dir or evaluation_folder(args.pretrained, "knn"))
    return main(args)


if __name__ == "__main__":
    sys.exit(cli())
