"""Linear classification on frozen features: the linear evaluation protocol.

A pretrained backbone is frozen - its weights and its BatchNorm statistics - and only a new
linear classifier on its pooled features is trained (Zhang et al. 2016 and every SSL paper
since; MoCo's main_lincls.py is the reference this module follows). Two data paths share one
training step, which sees only (features, labels):

- images: each step runs the frozen backbone on freshly augmented images (the papers' protocol);
- cached: without training augmentation the features never change, so they are computed once
  (distributed, each sample once, gathered on every process) and the classifier trains on them -
  minutes instead of hours. Every process then trains the same classifier on the whole global
  batches, with no communication: the result does not depend on the number of processes.

Validation is exact under DDP: each process evaluates a disjoint block of the validation set and
the correct counts are summed, so top-1/top-5 equal the single-process figures.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import DEFAULT_FEATURES, check_record, feature_options, record
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .errors import UsageError
from .data import training_loader
from .distributed import DistInfo, all_reduce_sum, get_rank, wrap_ddp
from .knn import extract_features, make_eval_loader
from .meters import AverageMeter, MetricsWriter, ProgressMeter, accuracy
from .optim import set_lr
from .probe import LinearProbe, Pretrained, SanityCheckError, changed_backbone_keys, sanity_check
from .resume import run_state
from .data.sampler import ResumableDistributedSampler
from .stopping import NonFiniteLossError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Cached features
# ----------------------------------------------------------------------------------------------


def features_fingerprint(weights: Mapping[str, torch.Tensor], transform: Callable, samples: Sequence,
                         features: Mapping[str, object] | None = None) -> str:
    """A hash of what the cached features depend on: backbone weights, transform, image list, and
    which features (`features`, selfsup.backbones.feature_options; the default ones hash as before)."""
    h = hashlib.sha256()
    options = feature_options(features)
    if options != DEFAULT_FEATURES:
        h.update(repr(sorted(options.items())).encode())
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(transform).encode())
    for path, label in samples:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()


def load_or_extract_features(
    backbone: nn.Module,
    loader,
    device: torch.device,
    cache_file: Path | None = None,
    fingerprint: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features`, or the features saved in `cache_file` when its fingerprint matches.

    All processes take the same branch (a process that cannot read the file makes everyone
    recompute), so the collectives of extract_features stay matched. Rank 0 writes the file.
    """
    cached = None
    if cache_file is not None and cache_file.is_file():
        try:
            obj = load_checkpoint(cache_file, map_location=device)
            if obj.get("fingerprint") == fingerprint and len(obj.get("labels", ())) == len(loader.dataset):
                cached = obj
        except CheckpointError as e:
            logger.warning("ignoring the feature cache %s: %s", cache_file, e)
    missing = all_reduce_sum(torch.tensor([0.0 if cached is not None else 1.0], device=device))
    if float(missing) == 0:
        logger.info("features read from %s", cache_file)
        return cached["features"], cached["labels"]
    features, labels = extract_features(backbone, loader, device)
    if cache_file is not None and get_rank() == 0:
        save_atomic({"fingerprint": fingerprint, "features": features.cpu(), "labels": labels.cpu()}, cache_file)
    return features, labels


def cached_train_batches(
    features: torch.Tensor, labels: torch.Tensor, sampler: ResumableDistributedSampler
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's batches of cached features in the order the image loader would give them
    (the sampler's permutation for the epoch set with `set_epoch`)."""
    indices = sampler.permutation()[sampler.positions()].to(features.device)
    for start in range(0, len(indices), sampler.batch_size):
        rows = indices[start : start + sampler.batch_size]
        yield features[rows], labels[rows]


def row_batches(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, start: int = 0, end: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rows [start, end) of cached features and labels, in batches of `batch_size`."""
    end = features.shape[0] if end is None else end
    for s in range(start, end, batch_size):
        yield features[s : min(s + batch_size, end)], labels[s : min(s + batch_size, end)]


def image_batches(loader, device: torch.device, readable_only: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of a loader over ImageDataset, on `device`; with `readable_only` (an
    evaluation) without the items that replace unreadable files, so each image counts once."""
    for images, labels, replaced in loader:
        if readable_only and replaced.any():
            images, labels = images[replaced == 0], labels[replaced == 0]
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Training and validation
# ----------------------------------------------------------------------------------------------


def _sum_over_processes(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    return all_reduce_sum(t).tolist()


def train_linear_epoch(
    fc: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[float], float],
    epoch: int,
    steps_per_epoch: int,
    device: torch.device,
    print_freq: int = 0,
    reduce: bool = True,
) -> dict:
    """One epoch of the linear classifier `fc` on (features N x D, labels N) batches.

    With `reduce` (the image path) `fc` is DDP-wrapped and each process feeds its share of every
    global batch: all get the same number of equal-sized batches (ResumableDistributedSampler),
    so the mean of the per-process mean losses that DDP's gradient averaging optimises is the
    mean over the global batch. Without `reduce` (cached features) every process trains on the
    whole global batches itself and nothing is communicated. `lr_at(fractional epoch)` sets the
    learning rate every step. Returns the epoch's loss and top-1 over the global batches.
    """
    total_over = _sum_over_processes if reduce else (lambda values, device: [float(v) for v in values])
    fc.train()
    batch_time = AverageMeter("Time", ":6.3f")
    losses, top1 = AverageMeter("Loss", ":.4e"), AverageMeter("Acc@1", ":6.2f")
    lr_meter = AverageMeter("LR", ":.4g")
    progress = ProgressMeter(steps_per_epoch, [batch_time, losses, top1, lr_meter], prefix=f"Epoch: [{epoch}]")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen, lr = 0, lr_at(epoch)
    end = time.perf_counter()
    for i, (feats, target) in enumerate(batches):
        lr = lr_at(epoch + i / steps_per_epoch)
        set_lr(optimizer, lr)
        logits = fc(feats)  # B x C
        loss = F.cross_entropy(logits, target)
        non_finite = total_over([float(not torch.isfinite(loss))], device)[0]
        if non_finite:
            raise NonFiniteLossError(
                f"the linear classifier's loss is {loss.item()} at epoch {epoch}, step {i} on {int(non_finite)} "
                "process(es); stopping before this step is applied. Lower --lr (30 suits MoCo's features; "
                "other backbones may need 0.1-1), or use --optimizer lars."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        n = target.shape[0]
        loss_sum += loss.detach().double() * n
        c1 = accuracy(logits.detach(), target, topk=(1,))[0]
        correct += c1
        seen += n
        batch_time.update(time.perf_counter() - end)
        losses.update(loss.item(), n)
        top1.update(100.0 * c1.item() / n, n)
        lr_meter.update(lr)
        if print_freq and get_rank() == 0 and (i % print_freq == 0 or i + 1 == steps_per_epoch):
            logger.info(progress.line(i))
        end = time.perf_counter()
    total_loss, total_correct, total = total_over([loss_sum, correct, seen], device)
    return {"train_loss": total_loss / max(total, 1), "train_acc1": 100.0 * total_correct / max(total, 1),
            "lr": lr, "train_n": int(total)}


@torch.no_grad()
def validate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    reduce: bool = True,
) -> dict:
    """Loss and top-1/top-5 over the whole validation set.

    With `reduce` each process feeds its own disjoint block of the set (`make_eval_loader`) and
    the summed losses and correct counts are added over processes, so the result is exactly that
    of one process for any set size and any number of processes. Without it, `batches` must
    cover the whole set (cached features held by every process).
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    c1_sum = torch.zeros((), dtype=torch.float64, device=device)
    c5_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for x, target in batches:
        logits = forward(x).float()  # B x C
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        c1, c5 = accuracy(logits, target, topk=(1, 5))
        c1_sum += c1
        c5_sum += c5
        seen += target.shape[0]
    values = [loss_sum, c1_sum, c5_sum, seen]
    loss_total, c1_total, c5_total, n = _sum_over_processes(values, device) if reduce else [float(v) for v in values]
    if n == 0:
        raise ValueError("validation set is empty")
    return {"val_loss": loss_total / n, "val_acc1": 100.0 * c1_total / n, "val_acc5": 100.0 * c5_total / n,
            "val_correct1": int(c1_total), "val_correct5": int(c5_total), "val_n": int(n)}


# ----------------------------------------------------------------------------------------------
# The epochs
# ----------------------------------------------------------------------------------------------


@dataclass
class ProbeRun:
    """How a linear classifier is trained, besides the probe, its optimizer and the data.

    `cached`: compute the frozen features once (or read them from `output_dir` with
    `save_features`) and train on them, every process on the whole global batches; otherwise the
    image path, DDP over the classifier. `lr_at(fractional epoch)` is the schedule;
    `state(epoch=, best_acc1=, val=)` builds a checkpoint. After the first epoch the backbone is
    compared with `pretrained_path` on disk (MoCo's sanity check)."""

    dist: DistInfo
    epochs: int
    lr_at: Callable[[float], float]
    global_batch: int
    workers: int
    seed: int
    cached: bool
    output_dir: Path
    state: Callable[..., dict]
    metrics: MetricsWriter
    save_features: bool = False
    print_freq: int = 10
    pretrained_path: str | None = None


def _cached_epochs(probe: LinearProbe, optimizer: torch.optim.Optimizer, train_ds, val_ds, local_batch: int,
                   run: ProbeRun) -> tuple[Callable[[int], tuple[dict, dict]], int]:
    """Features once (or from the cache files), then `(epoch -> (train stats, validation), steps per
    epoch)`: every process trains the same classifier on the whole global batches of the image
    path's permutation (the head is tiny: computing all of them beats splitting them and
    averaging gradients), over the readable images (extraction leaves unreadable files out)."""
    device, t0 = run.dist.device, time.perf_counter()
    loaders = {name: make_eval_loader(ds, local_batch, run.workers, device.type == "cuda")
               for name, ds in (("train", train_ds), ("val", val_ds))}
    fingerprint = {}
    if run.save_features:
        weights = probe.backbone.state_dict()
        fingerprint = {name: features_fingerprint(weights, ds.transform, ds.samples, probe.feature_options)
                       for name, ds in (("train", train_ds), ("val", val_ds))}
    trunk = probe.trunk()
    (train_feats, train_labels), (val_feats, val_labels) = (
        load_or_extract_features(trunk, loaders[name], device,
                                 run.output_dir / f"features_{name}.pth" if name in fingerprint else None,
                                 fingerprint.get(name, ""))
        for name in ("train", "val"))
    extract_s = time.perf_counter() - t0
    logger.info("features of %d + %d images (%d dims) ready in %.1fs", train_feats.shape[0], val_feats.shape[0],
                train_feats.shape[1], extract_s)
    run.metrics.write({"event": "features", "train_n": train_feats.shape[0], "val_n": val_feats.shape[0],
                       "dim": train_feats.shape[1], "time_s": extract_s})
    replica_sampler = ResumableDistributedSampler(len(train_feats), run.global_batch, 1, 0, seed=run.seed)
    steps = replica_sampler.steps_per_epoch

    def epoch_of(epoch: int) -> tuple[dict, dict]:
        replica_sampler.set_epoch(epoch)
        batches = cached_train_batches(train_feats, train_labels, replica_sampler)
        stats = train_linear_epoch(probe.head, batches, optimizer, run.lr_at, epoch, steps, device, reduce=False)
        probe.eval()
        return stats, validate(probe.head, row_batches(val_feats, val_labels, run.global_batch), device, reduce=False)

    return epoch_of, steps


def _image_epochs(probe: LinearProbe, optimizer: torch.optim.Optimizer, train_ds, val_ds,
                  sampler: ResumableDistributedSampler, run: ProbeRun) -> tuple[Callable[[int], tuple[dict, dict]], int]:
    """`(epoch -> (train stats, validation), steps per epoch)` on the images: the frozen backbone
    on every step's batch, DDP over the classifier, exact distributed validation."""
    device = run.dist.device
    train_loader = training_loader(train_ds, sampler, batch_size=sampler.batch_size, workers=run.workers,
                                   seed=run.seed, pin_memory=device.type == "cuda", drop_last=True)
    val_loader = make_eval_loader(val_ds, sampler.batch_size, run.workers, device.type == "cuda")
    head = wrap_ddp(probe.head, run.dist)  # only the classifier has gradients to average

    def epoch_of(epoch: int) -> tuple[dict, dict]:
        batches = ((probe.features(x), y) for x, y in image_batches(train_loader, device))
        stats = train_linear_epoch(head, batches, optimizer, run.lr_at, epoch, sampler.steps_per_epoch, device,
                                   run.print_freq)
        probe.eval()
        return stats, validate(probe, image_batches(val_loader, device, readable_only=True), device)

    return epoch_of, sampler.steps_per_epoch


class _ClassifierCheckpoints:
    """OUTPUT_DIR/checkpoint.pth.tar (the latest) and model_best.pth.tar (the best epoch's), by
    rank 0. An epoch on cached features takes milliseconds: those are written once a minute and
    at the end rather than rewriting the whole backbone every epoch."""

    def __init__(self, run: ProbeRun) -> None:
        self.run, self.last_save = run, time.perf_counter()
        self.best: dict | None = None  # the best epoch's checkpoint, until written

    def after_epoch(self, epoch: int, best_acc1: float, val: dict, is_best: bool) -> None:
        if not self.run.dist.is_main:
            return
        ckpt = self.run.state(epoch=epoch + 1, best_acc1=best_acc1, val=val)
        if is_best:  # a snapshot: the live fc and optimizer keep changing
            self.best = {**ckpt, "state_dict": {k: v.clone() for k, v in ckpt["state_dict"].items()},
                         "optimizer": copy.deepcopy(ckpt["optimizer"])}
        if not self.run.cached or epoch + 1 == self.run.epochs or time.perf_counter() - self.last_save >= 60:
            save_atomic(ckpt, self.run.output_dir / "checkpoint.pth.tar")
            if self.best is not None:
                save_atomic(self.best, self.run.output_dir / "model_best.pth.tar")
                self.best = None
            self.last_save = time.perf_counter()


def train_probe(probe: LinearProbe, optimizer: torch.optim.Optimizer, train_ds, val_ds,
                sampler: ResumableDistributedSampler, run: ProbeRun, start_epoch: int = 0,
                best_acc1: float = -1.0) -> int:
    """Train the linear classifier `probe.fc` for epochs start_epoch .. run.epochs - 1, validating
    and checkpointing after each; returns the exit status (1 on a non-finite loss or a failed
    sanity check)."""
    if run.cached:
        epoch_of, _ = _cached_epochs(probe, optimizer, train_ds, val_ds, sampler.batch_size, run)
    else:
        epoch_of, _ = _image_epochs(probe, optimizer, train_ds, val_ds, sampler, run)
    checkpoints = _ClassifierCheckpoints(run)
    t_start, val = time.perf_counter(), {}
    try:
        for epoch in range(start_epoch, run.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            probe.train()  # the backbone stays in eval mode (LinearProbe.train)
            stats, val = epoch_of(epoch)
            is_best, best_acc1 = val["val_acc1"] > best_acc1, max(best_acc1, val["val_acc1"])
            checkpoints.after_epoch(epoch, best_acc1, val, is_best)
            if epoch == start_epoch and run.pretrained_path is not None:
                sanity_check(probe, run.pretrained_path)  # every process checks its own copy
            _report_epoch(run, epoch, stats, val, best_acc1, time.perf_counter() - t0)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except SanityCheckError as e:
        print(f"error: sanity check failed: {e}", file=sys.stderr, flush=True)
        return 1
    logger.info("Done: %d epochs in %.1fs. Last: acc@1 %.2f acc@5 %.2f; best acc@1 %.2f. Classifier: %s",
                run.epochs - start_epoch, time.perf_counter() - t_start, val["val_acc1"], val["val_acc5"], best_acc1,
                run.output_dir / "checkpoint.pth.tar")
    return 0


def _report_epoch(run: ProbeRun, epoch: int, stats: dict, val: dict, best_acc1: float, seconds: float) -> None:
    """The epoch's metrics.jsonl record and log line."""
    record = {"epoch": epoch, **stats, **val, "best_acc1": best_acc1, "epoch_time_s": seconds}
    run.metrics.write(record, step=epoch, prefix="lincls/")
    logger.info("Epoch %d: train loss %.4f acc@1 %.2f | val loss %.4f acc@1 %.2f acc@5 %.2f (best %.2f) | "
                "lr %.4g | %.1fs", epoch, stats["train_loss"], stats["train_acc1"], val["val_loss"],
                val["val_acc1"], val["val_acc5"], best_acc1, stats["lr"], seconds)


# ----------------------------------------------------------------------------------------------
# Classifier checkpoints
# ----------------------------------------------------------------------------------------------

CHECKPOINT_KIND = "linear_classifier"


def classifier_state(probe: LinearProbe, optimizer: torch.optim.Optimizer, args, dist: DistInfo, *, epoch: int,
                     best_acc1: float, val: dict, arch: str, small_stem: bool, image_size: int, classes: list[str],
                     pretrained: str | None) -> dict:
    """A classifier checkpoint, in plain types (loads with weights_only=True). `state_dict` keys are
    the backbone family's names (torchvision's for a ResNet) with the DDP prefix, as MoCo's
    classifier checkpoints; its backbone part
    feeds --pretrained too. `epoch` is the next epoch to train."""
    return {
        "kind": CHECKPOINT_KIND, "epoch": epoch, "arch": arch, "backbone_variant": record(probe.backbone),
        "small_stem": small_stem, "image_size": image_size,
        "feature_bn": isinstance(probe.norm, nn.BatchNorm1d), "features": dict(probe.feature_options),
        "num_classes": len(classes), "classes": list(classes),
        "state_dict": {f"module.{k}": v for k, v in probe.classifier_state_dict().items()},
        "best_acc1": best_acc1, "val": dict(val), "pretrained": pretrained,
        **run_state(optimizer, args, dist),
    }


def restore_classifier(path: Path, ckpt: dict, probe: LinearProbe, *, arch: str, classes: list[str],
                       pretrained: Pretrained | None) -> None:
    """Load a classifier checkpoint of main_lincls.py into `probe`, after checking it belongs to
    this run: the same architecture, classes and pretrained backbone. Raises UsageError."""
    if ckpt.get("kind") != CHECKPOINT_KIND and "best_acc1" not in ckpt:
        raise UsageError(f"'{path}' is not a linear-classifier checkpoint (a pretraining one? pass it as --pretrained)")
    problems = [f"arch {ckpt['arch']!r} (this command: {arch!r})"] if ckpt.get("arch") not in (None, arch) else []
    if "classes" in ckpt and list(ckpt["classes"]) != classes:
        problems.append(f"{len(ckpt['classes'])} classes {list(ckpt['classes'])[:5]}... (this data: {len(classes)})")
    trained_on = feature_options(ckpt.get("features"))  # none recorded: the default features
    if trained_on != probe.feature_options:  # same width, other features: n_last_blocks 2 or 1 + avgpool
        problems.append(f"features {trained_on} (this command: {probe.feature_options})")
    if problems:
        raise UsageError(f"'{path}' was trained in another setting: {', '.join(problems)}. Use a new --output-dir.")
    check_record(probe.backbone, ckpt.get("backbone_variant"), f"'{path}'")
    try:
        probe.load_classifier_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})
    except RuntimeError as e:
        raise UsageError(f"'{path}' does not fit this model: {str(e).splitlines()[0]}") from e
    changed = changed_backbone_keys(probe, pretrained.weights) if pretrained is not None else []
    if changed:
        raise UsageError(
            f"'{path}' holds a classifier trained on another backbone than {pretrained.path} "
            f"({len(changed)} backbone entries differ, e.g. {changed[0]}): the pretrained checkpoint changed "
            "since. Use a new --output-dir (or delete this one) to evaluate it afresh."
        )
