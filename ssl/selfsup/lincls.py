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
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import Features
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .errors import UsageError
from .data import training_loader
from .distributed import DistInfo, all_reduce_sum, get_rank, wrap_ddp
from .knn import extract_features, make_eval_loader
from .meters import AverageMeter, MetricsWriter, ProgressMeter, accuracy
from .optim import set_lr
from .probe import LinearProbe, Pretrained, SanityCheckError, changed_backbone_keys, sanity_check
from .resume import run_state
from .sampler import ResumableDistributedSampler
from .stopping import NonFiniteLossError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Cached features
# ----------------------------------------------------------------------------------------------


def features_fingerprint(weights: Mapping[str, torch.Tensor], transform: Callable, samples: Sequence) -> str:
    """A hash of what the cached features depend on: backbone weights, transform, image list."""
    h = hashlib.sha256()
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
    positions = sampler.positions()
    indices = sampler.permutation()[torch.arange(positions.start, positions.stop, positions.step)]
    indices = indices.to(features.device)
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


def fit(probe: LinearProbe, optimizer: torch.optim.Optimizer, train_ds, val_ds, sampler: ResumableDistributedSampler,
        *, dist: DistInfo, epochs: int, start_epoch: int, best_acc1: float, lr_at: Callable[[float], float],
        global_batch: int, workers: int, seed: int, cached: bool, output_dir: Path, state: Callable[..., dict],
        metrics: MetricsWriter, save_features: bool = False, print_freq: int = 10,
        pretrained_path: str | None = None) -> int:
    """Train the linear classifier `probe.fc` for epochs start_epoch .. epochs - 1, validating and
    checkpointing after each; returns the exit status (1 on a non-finite loss or a failed check).

    `cached`: compute the frozen features once (or read them from OUTPUT_DIR with
    `save_features`) and train on them, every process on the whole global batches; otherwise the
    image path, DDP over the classifier. `state(epoch=, best_acc1=, val=)` builds a checkpoint;
    OUTPUT_DIR/checkpoint.pth.tar holds the latest, model_best.pth.tar the best epoch's. After
    the first epoch the backbone is compared with `pretrained_path` on disk (MoCo's sanity check).
    """
    device = dist.device
    local_batch = sampler.batch_size
    val_loader = make_eval_loader(val_ds, local_batch, workers, device.type == "cuda")
    if cached:
        t0 = time.perf_counter()
        train_loader = make_eval_loader(train_ds, local_batch, workers, device.type == "cuda")
        fingerprint = {}
        if save_features:
            weights = probe.backbone.state_dict()
            fingerprint = {name: features_fingerprint(weights, ds.transform, ds.samples)
                           for name, ds in (("train", train_ds), ("val", val_ds))}
        cache = {name: output_dir / f"features_{name}.pth" for name in fingerprint}  # empty without save_features
        trunk = Features(probe.backbone)
        train_feats, train_labels = load_or_extract_features(trunk, train_loader, device, cache.get("train"),
                                                             fingerprint.get("train", ""))
        val_feats, val_labels = load_or_extract_features(trunk, val_loader, device, cache.get("val"),
                                                         fingerprint.get("val", ""))
        extract_s = time.perf_counter() - t0
        logger.info("features of %d + %d images (%d dims) ready in %.1fs", train_feats.shape[0], val_feats.shape[0],
                    train_feats.shape[1], extract_s)
        metrics.write({"event": "features", "train_n": train_feats.shape[0], "val_n": val_feats.shape[0],
                       "dim": train_feats.shape[1], "time_s": extract_s})
        # The global batches of the image path (same permutation, see ResumableDistributedSampler),
        # all on this process; the head is tiny, so rather than splitting them and averaging
        # gradients, every process computes them all, identically.
        # (Over the readable images: extraction leaves unreadable files out.)
        replica_sampler = ResumableDistributedSampler(len(train_feats), global_batch, 1, 0, seed=seed)
    else:
        train_loader = training_loader(train_ds, sampler, batch_size=local_batch, workers=workers, seed=seed,
                                       pin_memory=device.type == "cuda", drop_last=True)
        head = wrap_ddp(probe.head, dist)  # only the classifier has gradients to average
    steps = (replica_sampler if cached else sampler).steps_per_epoch
    t_start = last_save = time.perf_counter()
    best_state = None  # the best epoch's checkpoint, until written
    val: dict = {}
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            probe.train()  # the backbone stays in eval mode (LinearProbe.train)
            if cached:  # every process trains the same classifier on whole global batches
                replica_sampler.set_epoch(epoch)
                batches = cached_train_batches(train_feats, train_labels, replica_sampler)
                stats = train_linear_epoch(probe.head, batches, optimizer, lr_at, epoch, steps, device, reduce=False)
                probe.eval()
                val = validate(probe.head, row_batches(val_feats, val_labels, global_batch), device, reduce=False)
            else:
                batches = ((probe.features(x), y) for x, y in image_batches(train_loader, device))
                stats = train_linear_epoch(head, batches, optimizer, lr_at, epoch, steps, device, print_freq)
                probe.eval()
                val = validate(probe, image_batches(val_loader, device, readable_only=True), device)
            is_best = val["val_acc1"] > best_acc1
            best_acc1 = max(best_acc1, val["val_acc1"])
            if dist.is_main:
                ckpt = state(epoch=epoch + 1, best_acc1=best_acc1, val=val)
                if is_best:  # a snapshot: the live fc and optimizer keep changing
                    best_state = {**ckpt, "state_dict": {k: v.clone() for k, v in ckpt["state_dict"].items()},
                                  "optimizer": copy.deepcopy(ckpt["optimizer"])}
                # An epoch on cached features takes milliseconds: checkpoint once a minute and at the end
                # rather than rewriting the whole backbone every epoch.
                if not cached or epoch + 1 == epochs or time.perf_counter() - last_save >= 60:
                    save_atomic(ckpt, output_dir / "checkpoint.pth.tar")
                    if best_state is not None:
                        save_atomic(best_state, output_dir / "model_best.pth.tar")
                        best_state = None
                    last_save = time.perf_counter()
            if epoch == start_epoch and pretrained_path is not None:
                sanity_check(probe, pretrained_path)  # every process checks its own copy
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
                epochs - start_epoch, time.perf_counter() - t_start, val["val_acc1"], val["val_acc5"], best_acc1,
                output_dir / "checkpoint.pth.tar")
    return 0


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
        "kind": CHECKPOINT_KIND, "epoch": epoch, "arch": arch, "small_stem": small_stem, "image_size": image_size,
        "feature_bn": isinstance(probe.norm, nn.BatchNorm1d),
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
    if problems:
        raise UsageError(f"'{path}' was trained in another setting: {', '.join(problems)}. Use a new --output-dir.")
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
