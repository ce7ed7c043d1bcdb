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

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from .builder import ARCHS, backbone_constructor
from .checkpoint import CheckpointError, extract_backbone, infer_arch_info, load_backbone, load_checkpoint, save_atomic
from .data import ImageDataset, find_samples
from .distributed import DistInfo, all_reduce_sum, concat_all_gather, get_rank
from .engine import NonFiniteLossError
from .knn import extract_features
from .loader import IMAGENET_MEAN, IMAGENET_STD, SMALL_IMAGE_MAX
from .meters import AverageMeter, ProgressMeter, accuracy
from .optim import LARS, set_lr
from .sampler import ResumableDistributedSampler

logger = logging.getLogger(__name__)

TRAIN_AUGS = ("standard", "none")


class SanityCheckError(RuntimeError):
    """The backbone changed while only the linear classifier was meant to train."""


class UsageError(ValueError):
    """Bad input found before training: the scripts print it as one message and exit with 2."""


# ----------------------------------------------------------------------------------------------
# Setup shared by main_lincls.py and main_knn.py
# ----------------------------------------------------------------------------------------------


def check_global_batch(global_batch: int, world_size: int) -> int:
    """The per-process batch of a global `global_batch`; a UsageError when it does not divide."""
    if global_batch <= 0 or global_batch % world_size:
        raise UsageError(
            f"--batch-size {global_batch} is the global batch and must divide by the {world_size} processes; "
            f"use e.g. --batch-size {max(world_size, global_batch // world_size * world_size)}"
        )
    return global_batch // world_size


def default_output_dir(pretrained: str | os.PathLike, kind: str) -> Path:
    """Results next to the evaluated checkpoint: `<its folder>/<kind>` for checkpoint.pth.tar,
    `<its folder>/<kind>-<name>` for any other file (e.g. lincls-checkpoint_0199)."""
    path = Path(pretrained)
    name = path.name.removesuffix(".tar").removesuffix(".pth")
    return path.parent / (kind if name == "checkpoint" else f"{kind}-{name}")


def agree_on_error(error: BaseException | None, dist: DistInfo) -> bool:
    """True when setup failed on any process. Call it on every process after a setup that runs
    no collective. The message is printed once - by rank 0 if it failed, else by the lowest
    failing rank - and every process can then exit with the same status instead of hanging in
    the first collective of the others."""
    flags = torch.tensor([0.0 if error is None else 1.0], device=dist.device)
    flags = concat_all_gather(flags) if dist.distributed else flags
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if failed and error is not None and dist.rank == failed[0]:
        where = f" (rank {dist.rank})" if dist.rank else ""
        print(f"error{where}: {error}", file=sys.stderr, flush=True)
    return bool(failed)


# ----------------------------------------------------------------------------------------------
# The pretrained backbone
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pretrained:
    """A pretrained backbone as linear evaluation needs it."""

    path: str
    weights: dict[str, torch.Tensor]  # torchvision ResNet names, no fc
    arch: str
    small_stem: bool
    image_size: int | None  # the pretraining crop size when the checkpoint records it
    method: str | None


def load_pretrained(path: str | os.PathLike, arch: str | None = None) -> Pretrained:
    """Read the backbone of a pretraining checkpoint (this project's three methods,
    facebookresearch/moco's, moco-v3's, or a plain torchvision state dict).

    `arch` (the -a flag) is optional: the checkpoint's own record wins, and a different `arch` is
    an error rather than a silently mismatched model. Raises CheckpointError or ValueError with
    a message that names the file and the fix.
    """
    ckpt = load_checkpoint(path)
    weights = extract_backbone(ckpt)
    info = infer_arch_info(ckpt)
    if arch is not None and info["arch"] is not None and arch != info["arch"]:
        raise ValueError(
            f"'{path}' holds a {info['arch']} backbone but -a {arch} was given; leave -a out to use the "
            "checkpoint's architecture"
        )
    arch = arch or info["arch"]
    if arch is None:
        raise ValueError(f"'{path}' does not record its architecture; pass it with -a (one of {', '.join(ARCHS)})")
    if arch not in ARCHS:
        raise ValueError(f"'{path}' holds a {arch} backbone, which this project cannot build (valid: {', '.join(ARCHS)})")
    saved_args = ckpt.get("args") if isinstance(ckpt.get("args"), Mapping) else {}
    image_size = saved_args.get("image_size")
    return Pretrained(str(path), weights, arch, bool(info["small_stem"]),
                      int(image_size) if image_size else None, info["method"])


class LinearProbe(nn.Module):
    """A frozen backbone (pooled features) followed by a trainable linear classifier `fc`.

    The backbone stays in eval mode whatever `train()` asks, so BatchNorm normalises with the
    pretrained running statistics and never updates them - under the linear protocol no part
    of the pretrained model may change, and BatchNorm statistics are part of it.
    """

    def __init__(self, backbone: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = fc
        for p in self.backbone.parameters():
            p.requires_grad = False
        self.backbone.eval()

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x H x W -> N x D, without building a graph through the frozen backbone."""
        with torch.no_grad():
            return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # N x num_classes

    def resnet_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under torchvision ResNet names (conv1..., fc.weight), loadable into
        torchvision.models.<arch>(num_classes=C)."""
        state = dict(self.backbone.state_dict())
        state.update({f"fc.{k}": v for k, v in self.fc.state_dict().items()})
        return state

    def load_resnet_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.fc.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("fc.")})
        self.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})


def build_probe(
    arch: str, small_stem: bool, num_classes: int, weights: Mapping[str, torch.Tensor] | None = None
) -> LinearProbe:
    """A torchvision ResNet with the pretrained `weights` (or random ones for a baseline), frozen,
    and a new fc initialised N(0, 0.01) with zero bias (MoCo, SimCLR).

    The weights must fill every backbone parameter and buffer: the only keys allowed to be
    missing are fc.weight and fc.bias, anything else is a CheckpointError listing the keys.
    """
    net = backbone_constructor(arch, small_stem)(num_classes=num_classes)
    if weights is not None:
        load_backbone(net, weights)
    fc = net.fc
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    net.fc = nn.Identity()
    return LinearProbe(net, fc)


def changed_backbone_keys(probe: LinearProbe, reference: Mapping[str, torch.Tensor]) -> list[str]:
    """Backbone entries (parameters and buffers) that differ from `reference`, or exist in only one."""
    own = probe.backbone.state_dict()
    changed = []
    for k in sorted(set(own) | set(reference)):
        if k not in own or k not in reference:
            changed.append(k)
        elif own[k].shape != reference[k].shape or not torch.equal(own[k].detach().cpu(), reference[k].detach().cpu()):
            changed.append(k)
    return changed


def sanity_check(probe: LinearProbe, pretrained_path: str | os.PathLike) -> None:
    """Re-read the pretrained checkpoint from disk and check that every backbone weight and
    BatchNorm statistic is unchanged (MoCo's sanity_check). Raises SanityCheckError."""
    changed = changed_backbone_keys(probe, extract_backbone(load_checkpoint(pretrained_path)))
    if changed:
        raise SanityCheckError(
            f"{len(changed)} backbone entr{'y' if len(changed) == 1 else 'ies'} changed during linear classifier "
            f"training (only fc may change): {changed[:8]}{' ...' if len(changed) > 8 else ''}. "
            "Was the backbone left trainable, or BatchNorm in train mode?"
        )
    logger.info("sanity check passed: the backbone equals %s", pretrained_path)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def eval_transform(image_size: int) -> T.Compose:
    """Validation (and cached-feature) transform. ImageNet-sized data: resize the short side to
    image_size * 256/224, centre crop (MoCo's 256 -> 224). Small images (<= 64 px, CIFAR,
    Fashion-MNIST): resize to image_size, no crop - a crop would cut away the object."""
    if image_size <= SMALL_IMAGE_MAX:
        resize = [T.Resize((image_size, image_size))]
    else:
        resize = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(image_size: int, aug: str) -> T.Compose:
    """'standard': RandomResizedCrop + horizontal flip (MoCo, SimCLR, BYOL linear protocols);
    'none': the validation transform, which makes cached features possible."""
    if aug == "none":
        return eval_transform(image_size)
    if aug != "standard":
        raise ValueError(f"unknown --train-aug '{aug}'; valid: {', '.join(TRAIN_AUGS)}")
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def linear_eval_datasets(
    root: str | os.PathLike, train_tf: Callable, val_tf: Callable
) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """ROOT/train and ROOT/val as labelled datasets with the same classes.

    Labels are positions in the sorted list of class folders, so a class missing from one split
    would shift every label after it: differing classes are an error naming them.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder '{root}' does not exist (or is not a folder)")
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"linear evaluation needs ROOT/train and ROOT/val with one folder per class (ImageNet layout); "
            f"'{root}' has no {' and no '.join(m + '/' for m in missing)}"
        )
    train_samples, train_classes = find_samples(root / "train")
    val_samples, val_classes = find_samples(root / "val")
    for split, classes in (("train", train_classes), ("val", val_classes)):
        if not classes:
            raise ValueError(f"'{root / split}' holds images but no class folders; linear evaluation needs labels")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ValueError(
            f"the classes of '{root / 'val'}' differ from those of '{root / 'train'}': "
            f"only in train/: {only_train or 'none'}; only in val/: {only_val or 'none'}. Labels are positions "
            "in the sorted class list, so both splits need the same class folders, each with at least one image."
        )
    train = ImageDataset(train_samples, train_tf, train_classes)
    val = ImageDataset(val_samples, val_tf, val_classes, replace_unreadable=False)
    return train, val, list(train_classes)


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


def image_batches(loader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of a loader over ImageDataset, on `device`."""
    for batch in loader:
        yield batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Training and validation
# ----------------------------------------------------------------------------------------------


def build_linear_optimizer(
    name: str, params, lr: float, momentum: float, weight_decay: float, nesterov: bool = False
) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov, as SimCLR's and BYOL's linear protocols) or LARS."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "lars":
        if nesterov:
            raise ValueError("--nesterov applies to --optimizer sgd only")
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; valid: sgd, lars")


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
