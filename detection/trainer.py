"""A detection run's setup and training loop around detection.engine: validate the inputs and
build the detector (`prepare`), evaluate on every test set (`Evaluation`), train to the end with
step checkpoints and periodic evaluations (`train`). detection/train_torchvision.py holds the
command line and calls these."""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from detection import datasets as det_data
from detection.engine import Schedule, batch_stream, precise_bn, train_iterations
from detection.evaluation import evaluate, run_inference, summary
from detection.models import DetectorConfig, build_detector, build_resnet, check_norm, norm_parameters
from selfsup.checkpoint import check_writable, load_checkpoint, plain_args, save_atomic
from selfsup.cli import per_process_batch
from selfsup.data import training_loader
from selfsup.data.sampler import ResumableDistributedSampler
from selfsup.distributed import DistInfo, barrier, wrap_ddp
from selfsup.errors import UsageError
from selfsup.meters import MetricsWriter
from selfsup.networks import unwrap
from selfsup.optim import build_optimizer
from selfsup.resume import Checkpointer, check_same_run, differences, restore_run_state

logger = logging.getLogger("train_torchvision")


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


@dataclass
class Prepared:
    """What `prepare` builds: the model and its optimizer, the data, where to start."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: DetectorConfig
    train_set: object | None  # None with --eval-only
    test_sets: list
    class_names: tuple
    start_iter: int
    output_dir: Path
    local_batch: int
    definition: dict  # what defines the run (run_definition)


def _datasets(args: argparse.Namespace, resume: dict | None) -> tuple[object | None, list, tuple]:
    """The training set (images without objects left out; None with --eval-only), the test sets and
    the class names, which every set must share."""
    test_sets = [det_data.build_dataset(name, args.data_root) for name in args.test or []]
    train_set = None
    if not args.eval_only:
        train_set = det_data.concat([det_data.build_dataset(name, args.data_root, train=True) for name in args.train])
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
    return train_set, test_sets, class_names


def _check_resumed_run(args: argparse.Namespace, resume: dict, ckpt_path: Path, definition: dict,
                       class_names: tuple) -> None:
    """Refuse a detector checkpoint of another run: other definition, architecture, norm or classes."""
    if not args.eval_only and "run" in resume:  # a checkpoint without a run record: the checks below only
        saved_run = dict(resume["run"])
        if "init_sha256" in saved_run:  # a record holding path + digest: compare the digest only
            saved_run["init"] = f"sha256:{saved_run.pop('init_sha256')}"
        check_same_run(saved_run, definition, ckpt_path, args.accept_changes, explicit=bool(args.resume))
    saved = resume.get("detector", {})
    # SyncBN and BN hold the same state and agree at test time: evaluating a SyncBN run in one
    # process is fine; continuing its training with another norm is not.
    same_norm = args.eval_only and {saved.get("norm"), args.norm} <= {"bn", "syncbn"}
    mismatch = differences(saved, vars(args), ("arch", "head", "small_stem") + (() if same_norm else ("norm",)))
    if list(resume.get("class_names", class_names)) != list(class_names):
        mismatch.append(f"classes {resume.get('class_names')} (this data: {list(class_names)})")
    if mismatch:
        raise UsageError(f"checkpoint '{ckpt_path}' belongs to another run: " + ", ".join(mismatch)
                         + ". Use the same flags, or a new --output-dir to start afresh.")


def _backbone(args: argparse.Namespace, resume: dict | None, ckpt_path: Path) -> tuple[torch.nn.Module, str, bool, str]:
    """The ResNet to build the detector around, its arch and stem, and where its weights come from."""
    if resume is not None:
        saved = resume.get("detector", {})
        resnet, arch, small_stem = build_resnet("random", saved.get("arch"), saved.get("small_stem"))
        return resnet, arch, small_stem, f"resumed from {ckpt_path} (iteration {resume['iter']})"
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
    return resnet, arch, small_stem, init_desc


def prepare(args: argparse.Namespace, dist_info: DistInfo) -> Prepared:
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
    train_set, test_sets, class_names = _datasets(args, resume)

    torch.manual_seed(args.seed)  # the same new layers on every process (DDP also broadcasts them)
    definition = run_definition(args) if args.pretrained is None or Path(args.pretrained).is_file() else {}
    if resume is not None:
        _check_resumed_run(args, resume, ckpt_path, definition, class_names)
    resnet, arch, small_stem, init_desc = _backbone(args, resume, ckpt_path)
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
    return Prepared(model, optimizer, cfg, train_set, test_sets, class_names, start_iter, output_dir, local_batch,
                    definition)


class Evaluation:
    """Precise BN statistics and the evaluation on every test set (distributed inference, rank 0
    scores and reports)."""

    def __init__(self, args: argparse.Namespace, p: Prepared, dist_info: DistInfo, metrics: MetricsWriter) -> None:
        self.args, self.p, self.dist, self.metrics = args, p, dist_info, metrics

    def update_bn(self, batches) -> None:
        if self.args.precise_bn_iters:
            n = precise_bn(unwrap(self.p.model), batches, self.args.precise_bn_iters, self.dist.device)
            logger.info("precise BN: statistics of %d BatchNorm layers recomputed over %d batches", n,
                        self.args.precise_bn_iters)

    def __call__(self, iters_done: int) -> dict:
        results = {}
        for test_set in self.p.test_sets:
            t0 = time.time()
            preds = run_inference(unwrap(self.p.model), test_set, self.dist.device, self.dist.rank,
                                  self.dist.world_size, workers=min(self.args.workers, 2))
            if self.dist.is_main:
                res = evaluate(preds, test_set)
                logger.info("%s  (%d images, %.0fs)", summary(f"iter {iters_done} {test_set.info.name}", res),
                            len(test_set), time.time() - t0)
                self.metrics.write({"type": "eval", "iter": iters_done, "dataset": test_set.info.name, **res},
                                   step=iters_done, prefix=f"eval/{test_set.info.name}/")
                results[test_set.info.name] = res
        barrier()
        return results


def train(args: argparse.Namespace, p: Prepared, dist_info: DistInfo, checkpointer: Checkpointer,
           evaluate_all: Evaluation, metrics: MetricsWriter) -> None:
    """Iterations start_iter .. max_iter: step checkpoints and periodic evaluations, then precise
    BN, the last checkpoint, the final evaluation and model_final.pth.tar."""
    ddp_model = wrap_ddp(p.model, dist_info)
    sampler = ResumableDistributedSampler(len(p.train_set), p.local_batch, dist_info.world_size, dist_info.rank,
                                          shuffle=True, seed=args.seed)
    loader = training_loader(p.train_set, sampler, batch_size=p.local_batch, workers=args.workers, seed=args.seed,
                             pin_memory=dist_info.device.type == "cuda", collate_fn=det_data.collate)
    batches = batch_stream(loader, sampler, p.start_iter)
    schedule = Schedule(args.lr, args.max_iter, tuple(args.steps or ()), args.warmup_iters, args.print_freq)
    logger.info("%d process(es) on %s, global batch %d, lr %.4g, iterations %d..%d, steps %s, warmup %d -> %s",
                dist_info.world_size, dist_info.device, args.batch_size, args.lr, p.start_iter, args.max_iter,
                list(schedule.steps), schedule.warmup_iters, p.output_dir)

    def after_step(done: int, record: dict | None) -> None:
        if record is not None:
            metrics.write(record, step=done, prefix="train/")
        if done == args.max_iter:
            return  # checkpointed below, after precise BN
        if done % args.checkpoint_period == 0:
            checkpointer.save(iters_done=done)
        if args.eval_period and done % args.eval_period == 0:
            evaluate_all.update_bn(batches)
            evaluate_all(done)

    ddp_model.train()
    train_iterations(ddp_model, p.optimizer, batches, p.start_iter, schedule, dist_info, after_step)
    evaluate_all.update_bn(batches)
    checkpointer.save(iters_done=args.max_iter)
    final = evaluate_all(args.max_iter)
    if dist_info.is_main:
        save_atomic({"iter": args.max_iter, "model": unwrap(p.model).state_dict(), "detector": detector_record(p.cfg),
                     "class_names": list(p.class_names), "args": plain_args(args)}, p.output_dir / "model_final.pth.tar")
        for name, res in final.items():
            logger.info("final %s", summary(name, res))


def detector_record(cfg: DetectorConfig) -> dict:
    return {**asdict(cfg), "train_sizes": list(cfg.train_sizes)}
