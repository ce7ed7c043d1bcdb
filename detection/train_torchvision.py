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
import hashlib
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)
import torch  # noqa: E402

from detection import datasets as det_data  # noqa: E402
from detection.engine import Schedule, batch_stream, precise_bn, train_iterations  # noqa: E402
from detection.evaluation import evaluate, run_inference, summary  # noqa: E402
from detection.models import HEADS, NORMS, DetectorConfig, build_detector, build_resnet, check_norm, norm_parameters  # noqa: E402
from detection.recipes import DETECTION, fill_unset  # noqa: E402
from selfsup.backbones.resnet import ARCHS  # noqa: E402  (detection transfer is for ResNets)
from selfsup.checkpoint import check_writable, load_checkpoint, plain_args, save_atomic  # noqa: E402
from selfsup.cli import agree_on_error, per_process_batch, report, write_args  # noqa: E402
from selfsup.data import training_loader  # noqa: E402
from selfsup.distributed import DistInfo, add_device_args, barrier, run_in_process_group, wrap_ddp  # noqa: E402
from selfsup.errors import INPUT_ERRORS, UsageError  # noqa: E402
from selfsup.meters import MetricsWriter, setup_logging  # noqa: E402
from selfsup.networks import unwrap  # noqa: E402
from selfsup.optim import build_optimizer  # noqa: E402
from selfsup.resume import Checkpointer, check_same_run, claim_fresh_folder, differences, restore_run_state, run_state  # noqa: E402
from selfsup.sampler import ResumableDistributedSampler  # noqa: E402
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


# What defines a detection run besides the starting weights: what changes the detector it trains.
# --max-iter is not among them (extending a run is allowed).
RUN_DEFINING = ("recipe", "arch", "head", "norm", "small_stem", "freeze_at", "train", "min_size", "max_size",
                "batch_size", "lr", "steps", "warmup_iters", "momentum", "wd", "roi_batch_size", "fpn_channels",
                "box_head_dim", "seed")


def run_definition(args: argparse.Namespace) -> dict:
    """RUN_DEFINING's values, and the starting weights: 'random', 'supervised', or the SHA-256 of the
    checkpoint's content - what the file is, not where it lies (a copy elsewhere is the same start,
    a file replaced under the same name is not)."""
    out = {k: getattr(args, k, None) for k in RUN_DEFINING}
    if args.pretrained:
        digest = hashlib.sha256()
        with open(args.pretrained, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out["init"] = f"sha256:{digest.hexdigest()}"
    elif args.supervised or args.random_init:
        out["init"] = "supervised" if args.supervised else "random"
    return out


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


def detector_config(args: argparse.Namespace, arch: str, small_stem: bool, num_classes: int) -> DetectorConfig:
    return DetectorConfig(arch=arch, head=args.head, num_classes=num_classes, norm=args.norm, small_stem=small_stem,
                          freeze_at=args.freeze_at, train_sizes=tuple(args.min_size), test_size=args.test_size,
                          max_size=args.max_size, roi_batch_size=args.roi_batch_size, fpn_channels=args.fpn_channels,
                          box_head_dim=args.box_head_dim)


def detector_optimizer(model: torch.nn.Module, lr: float, momentum: float, wd: float) -> torch.optim.Optimizer:
    """SGD without weight decay on the normalisation layers' parameters (Detectron2's default)."""
    no_decay = norm_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": wd},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    return build_optimizer("sgd", groups, lr, momentum, wd)


def main(args: argparse.Namespace) -> int:
    """Set up this process (and its process group), run, and return the exit status."""
    return run_in_process_group(run, args, args.device)


def prepare(args: argparse.Namespace, dist_info: DistInfo):
    """Validate inputs, read the data, build the model; raises on bad input."""
    local_batch = per_process_batch(args.batch_size, dist_info.world_size)
    check_norm(args.norm, dist_info.device, dist_info.world_size)
    output_dir = Path(args.output_dir)
    if dist_info.is_main:
        check_writable(output_dir)
    ckpt_path = Path(args.resume) if args.resume else output_dir / "checkpoint.pth.tar"
    resume = load_checkpoint(ckpt_path) if (args.resume or ckpt_path.is_file()) else None
    if args.eval_only and resume is None:
        raise UsageError(f"--eval-only needs a detector checkpoint: {ckpt_path} does not exist (use --resume PATH)")

    test_sets = [det_data.build_dataset(name, args.data_root) for name in args.test or []]
    train_set = None
    if not args.eval_only:
        parts = [det_data.build_dataset(name, args.data_root, train=True) for name in args.train]
        train_set = det_data.concat(parts)
        n_all = len(train_set)
        train_set = train_set.without_empty()
        if len(train_set) < args.batch_size:
            raise UsageError(f"{train_set.info.name} has {len(train_set)} images with objects, fewer than one batch "
                             f"of {args.batch_size}; use a smaller --batch-size")
        logger.info("training on %s: %d images (%d without objects left out), %d classes", train_set.info.name,
                    len(train_set), n_all - len(train_set), len(train_set.class_names))
    class_names = train_set.class_names if train_set is not None else tuple(resume["class_names"])
    for t in test_sets:
        if t.class_names != class_names:
            raise UsageError(f"test set {t.info.name} has classes {list(t.class_names)}, the model "
                             f"{list(class_names)}")

    torch.manual_seed(args.seed)  # the same new layers on every process (DDP also broadcasts them)
    definition = run_definition(args) if args.pretrained is None or Path(args.pretrained).is_file() else {}
    if resume is not None and not args.eval_only and "run" in resume:  # checkpoints before run records: below
        saved_run = dict(resume["run"])
        if "init_sha256" in saved_run:  # recorded as path + digest before: compare the digest only
            saved_run["init"] = f"sha256:{saved_run.pop('init_sha256')}"
        check_same_run(saved_run, definition, ckpt_path, args.accept_changes, explicit=bool(args.resume))
    if resume is not None:
        saved = resume.get("detector", {})
        # SyncBN and BN hold the same state and agree at test time: evaluating a SyncBN run in
        # one process is fine; continuing its training with another norm is not.
        same_norm = args.eval_only and {saved.get("norm"), args.norm} <= {"bn", "syncbn"}
        mismatch = differences(saved, vars(args), ("arch", "head", "small_stem") + (() if same_norm else ("norm",)))
        if list(resume.get("class_names", class_names)) != list(class_names):
            mismatch.append(f"classes {resume.get('class_names')} (this data: {list(class_names)})")
        if mismatch:
            raise UsageError(f"checkpoint '{ckpt_path}' belongs to another run: " + ", ".join(mismatch)
                             + ". Use the same flags, or a new --output-dir to start afresh.")
        resnet, arch, small_stem = build_resnet("random", saved.get("arch"), saved.get("small_stem"))
        init_desc = f"resumed from {ckpt_path} (iteration {resume['iter']})"
    else:
        if not (args.pretrained or args.supervised or args.random_init):
            raise UsageError("say which backbone weights to start from: --pretrained PATH, --supervised (torchvision's "
                             "ImageNet weights, downloaded) or --random-init")
        init = args.pretrained or ("supervised" if args.supervised else "random")
        try:
            resnet, arch, small_stem = build_resnet(init, args.arch, args.small_stem)
        except ValueError as e:
            raise UsageError(str(e)) from e
        init_desc = {"random": "random weights", "supervised": "torchvision's supervised ImageNet weights"}.get(
            init, f"the backbone of {init}")
    if small_stem:
        logger.warning("the backbone has the small-image stem (3x3, no max-pool): feature strides are 4x smaller "
                       "than a standard ResNet's, which makes detection much slower")
    cfg = detector_config(args, arch, small_stem, len(class_names))
    model = build_detector(resnet, cfg).to(dist_info.device)
    optimizer = detector_optimizer(model, args.lr, args.momentum, args.wd)
    start_iter = 0
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as e:
            raise UsageError(f"checkpoint '{ckpt_path}' does not fit this model: {str(e).splitlines()[0]} ...") from e
        if not args.eval_only:
            restore_run_state(resume, dist_info, optimizer)
        start_iter = int(resume["iter"])
    else:
        torch.manual_seed(args.seed + dist_info.rank)
    logger.info("%s-%s Faster R-CNN, %s, %d classes, backbone from %s", arch, cfg.head.upper(), cfg.norm,
                len(class_names), init_desc)
    return model, optimizer, cfg, train_set, test_sets, start_iter, output_dir, class_names, local_batch, definition


def run(args: argparse.Namespace, dist_info: DistInfo) -> int:
    setup_logging(dist_info.rank)
    prepared = error = None
    try:
        if args.no_resume:  # one folder for every process, claimed by rank 0
            args.output_dir = str(claim_fresh_folder(args.output_dir, dist_info))
        prepared = prepare(args, dist_info)
    except INPUT_ERRORS as e:
        error = e
    if agree_on_error(error, dist_info):
        return 2
    model, optimizer, cfg, train_set, test_sets, start_iter, output_dir, class_names, local_batch, definition = prepared
    setup_logging(dist_info.rank, output_dir)
    metrics = MetricsWriter(output_dir, enabled=dist_info.is_main)
    write_args(output_dir, args, dist_info)

    def state(rng: list, iters_done: int) -> dict:
        return {"iter": iters_done, "model": unwrap(model).state_dict(), "run": definition,
                "detector": {**asdict(cfg), "train_sizes": list(cfg.train_sizes)}, "class_names": list(class_names),
                **run_state(optimizer, args, dist_info, rng)}

    checkpointer = Checkpointer(output_dir, dist_info, state)
    latest = checkpointer.latest

    def update_bn(batches) -> None:
        if args.precise_bn_iters:
            n = precise_bn(unwrap(model), batches, args.precise_bn_iters, dist_info.device)
            logger.info("precise BN: statistics of %d BatchNorm layers recomputed over %d batches", n,
                        args.precise_bn_iters)

    def evaluate_all(iters_done: int) -> dict:
        results = {}
        for test_set in test_sets:
            t0 = time.time()
            preds = run_inference(unwrap(model), test_set, dist_info.device, dist_info.rank, dist_info.world_size,
                                  workers=min(args.workers, 2))
            if dist_info.is_main:
                res = evaluate(preds, test_set)
                logger.info("%s  (%d images, %.0fs)", summary(f"iter {iters_done} {test_set.info.name}", res),
                            len(test_set), time.time() - t0)
                metrics.write({"type": "eval", "iter": iters_done, "dataset": test_set.info.name, **res},
                              step=iters_done, prefix=f"eval/{test_set.info.name}/")
                results[test_set.info.name] = res
        barrier()
        return results

    try:
        if args.eval_only:
            evaluate_all(start_iter)
            return 0
        if start_iter >= args.max_iter:
            logger.info("%s already holds a finished run of %d iterations; evaluating it (raise --max-iter to train "
                        "more, or use another --output-dir)", latest, args.max_iter)
            evaluate_all(start_iter)
            return 0
        ddp_model = wrap_ddp(model, dist_info)
        sampler = ResumableDistributedSampler(len(train_set), local_batch, dist_info.world_size, dist_info.rank,
                                              shuffle=True, seed=args.seed)
        loader = training_loader(train_set, sampler, batch_size=local_batch, workers=args.workers, seed=args.seed,
                                 pin_memory=dist_info.device.type == "cuda", collate_fn=det_data.collate)
        batches = batch_stream(loader, sampler, start_iter)
        schedule = Schedule(args.lr, args.max_iter, tuple(args.steps or ()), args.warmup_iters, args.print_freq)
        logger.info("%d process(es) on %s, global batch %d, lr %.4g, iterations %d..%d, steps %s, warmup %d -> %s",
                    dist_info.world_size, dist_info.device, args.batch_size, args.lr, start_iter, args.max_iter,
                    list(schedule.steps), schedule.warmup_iters, output_dir)

        def after_step(done: int, record: dict | None) -> None:
            if record is not None:
                metrics.write(record, step=done, prefix="train/")
            if done == args.max_iter:
                return  # checkpointed below, after precise BN
            if done % args.checkpoint_period == 0:
                checkpointer.save(iters_done=done)
            if args.eval_period and done % args.eval_period == 0:
                update_bn(batches)
                evaluate_all(done)

        ddp_model.train()
        train_iterations(ddp_model, optimizer, batches, start_iter, schedule, dist_info, after_step)
        update_bn(batches)
        checkpointer.save(iters_done=args.max_iter)
        final = evaluate_all(args.max_iter)
        if dist_info.is_main:
            save_atomic({"iter": args.max_iter, "model": unwrap(model).state_dict(),
                         "detector": {**asdict(cfg), "train_sizes": list(cfg.train_sizes)},
                         "class_names": list(class_names), "args": plain_args(args)},
                        output_dir / "model_final.pth.tar")
            for name, res in final.items():
                logger.info("final %s", summary(name, res))
    except NonFiniteLossError as e:
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
