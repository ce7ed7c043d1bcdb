#!/usr/bin/env python
"""Fine-tune a pretrained ResNet as a Faster R-CNN detector with torchvision (no Detectron2 needed).

    # MoCo's VOC recipe (R50-C4, SyncBN, VOC07+12 trainval, 24k iterations, batch 16) on 8 GPUs:
    torchrun --nproc_per_node=8 detection/train_torchvision.py --recipe voc \\
        --pretrained runs/moco-resnet50-imagenet/checkpoint.pth.tar --output-dir runs/det-voc-moco
    # COCO, 1x schedule, the R50-FPN head instead of C4:
    torchrun --nproc_per_node=8 detection/train_torchvision.py --recipe coco_1x --head fpn \\
        --pretrained moco_v2_800ep_pretrain.pth.tar --output-dir runs/det-coco-fpn
    # The synthetic CPU demo (make the data first with detection/make_synthetic.py):
    python detection/train_torchvision.py --recipe demo --random-init --data-root data/shapes

Datasets use Detectron2's names under --data-root ($DETECTRON2_DATASETS, default ./datasets):
voc_2007_trainval, voc_2012_trainval, voc_2007_test, coco_2017_train, coco_2017_val; other folders
are given as voc:YEAR_DIR:SPLIT or coco:IMAGE_DIR:ANNOTATIONS.json. --batch-size is the global
batch over all processes. Running the same command again resumes from OUTPUT_DIR/checkpoint.pth.tar.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

from detection.models import HEADS, NORMS  # noqa: E402
from detection.recipes import DETECTION, fill_unset  # noqa: E402
from detection.trainer import Evaluation, detector_record, prepare, train  # noqa: E402
from selfsup.backbones.resnet import ARCHS  # noqa: E402  (detection transfer is for ResNets)
from selfsup.cli import agree_on_error, report, write_args  # noqa: E402
from selfsup.distributed import DistInfo, add_device_args, run_in_process_group  # noqa: E402
from selfsup.errors import INPUT_ERRORS, UsageError  # noqa: E402
from selfsup.meters import MetricsWriter, setup_logging  # noqa: E402
from selfsup.networks import unwrap  # noqa: E402
from selfsup.resume import Checkpointer, claim_fresh_folder, run_state  # noqa: E402
from selfsup.stopping import NonFiniteLossError  # noqa: E402

logger = logging.getLogger("train_torchvision")

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Detection fine-tuning (torchvision)", add_help=False)
    p.add_argument("--recipe", choices=list(DETECTION), default="voc",
                   help="defaults for everything below: MoCo's voc / coco_1x / coco_2x recipes, or the CPU demo")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--pretrained", metavar="PATH", help="pretraining checkpoint (this project, MoCo, torchvision)")
    init.add_argument("--supervised", action="store_true",
                      help="torchvision's supervised ImageNet weights (IMAGENET1K_V1; downloaded once)")
    init.add_argument("--random-init", action="store_true", help="train from random weights")
    p.add_argument("-a", "--arch", choices=ARCHS, default=None, metavar="ARCH",
                   help=f"backbone: {', '.join(ARCHS)} (default: the checkpoint's, else resnet50)")
    p.add_argument("--small-stem", default=None, action=argparse.BooleanOptionalAction,
                   help="3x3 stem without max-pool (default: as the checkpoint)")
    p.add_argument("--head", choices=HEADS, default=None, help="c4 (MoCo's R50-C4) or fpn")
    p.add_argument("--norm", choices=NORMS, default=None,
                   help="syncbn (the recipes; CUDA + DDP), bn (per process) or frozenbn")
    p.add_argument("--freeze-at", type=int, default=0, help="Detectron2's FREEZE_AT (default 0: train all stages)")
    p.add_argument("--data-root", default=None, help="Detectron2-style datasets folder (default: $DETECTRON2_DATASETS "
                                                     "or ./datasets)")
    p.add_argument("--train", nargs="+", default=None, help="training sets, concatenated (e.g. voc_2007_trainval "
                                                             "voc_2012_trainval)")
    p.add_argument("--test", nargs="*", default=None, help="evaluation sets (none: no evaluation)")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="GLOBAL images per iteration (recipes: 16)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (recipes: 0.02 for batch 16)")
    p.add_argument("--max-iter", type=int, default=None, help="training iterations")
    p.add_argument("--steps", type=int, nargs="*", default=None, help="iterations at which the lr drops 10x")
    p.add_argument("--warmup-iters", type=int, default=None, help="linear warmup iterations")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="wd",
                   help="weight decay (not on normalisation parameters)")
    p.add_argument("--min-size", type=int, nargs="+", default=None,
                   help="training shorter sides, one drawn per image (recipes: MoCo's multi-scale lists)")
    p.add_argument("--test-size", type=int, default=None, help="test shorter side (recipes: 800)")
    p.add_argument("--max-size", type=int, default=None, help="longer side cap (recipes: 1333)")
    p.add_argument("--roi-batch-size", type=int, default=None, help="RoIs sampled per image (recipes: 512)")
    p.add_argument("--fpn-channels", type=int, default=None, help="FPN width (recipes: 256)")
    p.add_argument("--box-head-dim", type=int, default=None, help="FPN box head width (recipes: 1024)")
    p.add_argument("--precise-bn-iters", type=int, default=None,
                   help="batches for precise BN statistics before each evaluation (recipes: 200; 0 = off)")
    p.add_argument("--eval-period", type=int, default=0, help="also evaluate every N iterations (default: only at the end)")
    p.add_argument("--checkpoint-period", type=int, default=None, help="write checkpoint.pth.tar every N iterations")
    p.add_argument("--eval-only", action="store_true", help="evaluate OUTPUT_DIR/checkpoint.pth.tar (or --resume)")
    p.add_argument("--resume", default="", help="checkpoint to resume from (default: OUTPUT_DIR/checkpoint.pth.tar if present)")
    p.add_argument("--output-dir", default=None,
                   help="default: runs/det-<recipe>-<head>-<backbone: random, supervised or the checkpoint's name>")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh: in OUTPUT_DIR-2 (-3, ...) when OUTPUT_DIR holds a run already")
    p.add_argument("--accept-changes", action="store_true",
                   help="continue the run in OUTPUT_DIR although its definition changed (refused otherwise)")
    p.add_argument("-j", "--workers", type=int, default=None, help="data loading workers per process")
    p.add_argument("-p", "--print-freq", type=int, default=20, help="log every N iterations (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new layers, data order and sampling (default: 0)")
    add_device_args(p)
    return p


def backbone_name(args: argparse.Namespace) -> str:
    """'random', 'supervised', or the pretrained checkpoint's name: its folder's for a
    checkpoint.pth.tar (runs/moco-resnet50-imagenet/checkpoint.pth.tar -> moco-resnet50-imagenet)."""
    if not args.pretrained:
        return "supervised" if args.supervised else "random"
    path = Path(args.pretrained)
    stem = path.name.removesuffix(".tar").removesuffix(".pth").removesuffix(".pkl")
    return path.resolve().parent.name if stem == "checkpoint" else stem


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the recipe (detection.recipes.DETECTION)."""
    if args.no_resume and args.resume:
        raise UsageError("--no-resume starts afresh, --resume continues a checkpoint: give one of them")
    out = fill_unset(args, DETECTION[args.recipe])
    if out.output_dir is None:
        out.output_dir = str(Path("runs") / f"det-{args.recipe}-{out.head}-{backbone_name(args)}")
    if out.steps and any(s >= out.max_iter for s in out.steps):
        logger.warning("--steps %s include iterations at or past --max-iter %d", out.steps, out.max_iter)
    return out


def main(args: argparse.Namespace) -> int:
    """Set up this process (and its process group), run, and return the exit status."""
    return run_in_process_group(run, args, args.device)


def run(args: argparse.Namespace, dist_info: DistInfo) -> int:
    setup_logging(dist_info.rank)
    p = error = None
    try:
        if args.no_resume:  # one folder for every process, claimed by rank 0
            args.output_dir = str(claim_fresh_folder(args.output_dir, dist_info))
        p = prepare(args, dist_info)
    except INPUT_ERRORS as e:
        error = e
    if agree_on_error(error, dist_info):
        return 2
    setup_logging(dist_info.rank, p.output_dir)
    metrics = MetricsWriter(p.output_dir, enabled=dist_info.is_main)
    write_args(p.output_dir, args, dist_info)

    def state(rng: list, iters_done: int) -> dict:
        return {"iter": iters_done, "model": unwrap(p.model).state_dict(), "run": p.definition,
                "detector": detector_record(p.cfg), "class_names": list(p.class_names),
                **run_state(p.optimizer, args, dist_info, rng)}

    checkpointer = Checkpointer(p.output_dir, dist_info, state)
    evaluate_all = Evaluation(args, p, dist_info, metrics)
    try:
        if args.eval_only:
            evaluate_all(p.start_iter)
        elif p.start_iter >= args.max_iter:
            logger.info("%s already holds a finished run of %d iterations; evaluating it (raise --max-iter to train "
                        "more, or use another --output-dir)", checkpointer.latest, args.max_iter)
            evaluate_all(p.start_iter)
        else:
            train(args, p, dist_info, checkpointer, evaluate_all, metrics)
    except NonFiniteLossError as e:
        latest = checkpointer.latest
        logging.getLogger().error("error: %s Last good checkpoint: %s", e, latest if latest.exists() else "none yet")
        return 1
    finally:
        metrics.close()
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("train_torchvision.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        args = resolve_args(parser.parse_args(argv))
    except UsageError as e:
        return report(e)
    return main(args)


if __name__ == "__main__":
    sys.exit(cli())
