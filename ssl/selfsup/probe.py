"""The frozen backbone under evaluation, and the labelled data it is evaluated on.

Shared by the linear probe (main_lincls.py), the kNN (main_knn.py), the online kNN during
pretraining (selfsup.monitor) and the tools: a pretraining checkpoint's backbone read under
torchvision's names (`load_pretrained`), frozen behind a new linear classifier (`LinearProbe`),
checked to stay unchanged (`sanity_check`), and the evaluation transforms and ROOT/train,
ROOT/val datasets.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torchvision.transforms as T

from .backbones import (ARCHS, Features, backbone_constructor, feature_dim, feature_options, forward_features, get_head,
                        head_name, rebuild_options, set_head)
from .checkpoint import extract_backbone, infer_arch_info, load_backbone, load_checkpoint
from .data import ImageDataset, fashion_mnist_root, fashion_mnist_splits, find_samples, find_unreadable, without_files
from .distributed import DistInfo
from .data.augmentations import IMAGENET_MEAN, IMAGENET_STD, SMALL_IMAGE_MAX

logger = logging.getLogger(__name__)

TRAIN_AUGS = ("standard", "none")


class SanityCheckError(RuntimeError):
    """The backbone changed while only the linear classifier was meant to train."""


@dataclass(frozen=True)
class Pretrained:
    """A pretrained backbone as linear evaluation needs it."""

    path: str
    weights: dict[str, torch.Tensor]  # the backbone family's names (torchvision's for a ResNet), no head
    arch: str
    small_stem: bool
    image_size: int | None  # the pretraining crop size when the checkpoint records it
    method: str | None


def load_pretrained(path: str | os.PathLike, arch: str | None = None) -> Pretrained:
    """Read the backbone of a pretraining checkpoint (this project's methods, facebookresearch/moco's,
    moco-v3's, DINO's - the teacher of its full checkpoints, its published backbone files, told
    by their names - or a plain torchvision state dict).

    `arch` (the -a flag) is optional: the checkpoint's own record wins, and a different `arch` is
    an error rather than a silently mismatched model. Raises CheckpointError or ValueError with
    a message that names the file and the fix.
    """
    ckpt = load_checkpoint(path)
    weights = extract_backbone(ckpt)
    try:
        info = infer_arch_info(ckpt, arch, Path(path).name)
    except ValueError as e:
        raise ValueError(f"'{path}': {e}") from e
    arch = info["arch"]
    if arch is None:
        raise ValueError(f"'{path}' does not record its architecture; pass it with -a (one of {', '.join(ARCHS)})")
    if arch not in ARCHS:
        raise ValueError(f"'{path}' holds a {arch} backbone, which this project cannot build (valid: {', '.join(ARCHS)})")
    saved_args = ckpt.get("args") if isinstance(ckpt.get("args"), Mapping) else {}
    image_size = saved_args.get("image_size")
    return Pretrained(str(path), weights, arch, bool(info["small_stem"]),
                      int(image_size) if image_size else None, info["method"])


class LinearProbe(nn.Module):
    """A frozen backbone (pooled features) followed by a trainable linear classifier `fc`,
    optionally on standardised features (`norm`: a BatchNorm without affine parameters, MAE's
    linear probe, which makes one learning rate fit backbones whose features differ in scale).

    The backbone stays in eval mode whatever `train()` asks, so BatchNorm normalises with the
    pretrained running statistics and never updates them - under the linear protocol no part
    of the pretrained model may change, and BatchNorm statistics are part of it. `head_name` is
    where the backbone's family keeps its classifier ("fc" for ResNets): the name `fc` has in
    the classifier's checkpoint, so that it loads into the family's own network. `features`:
    which features the classifier reads (selfsup.backbones.feature_options; default the ones the
    backbone's head receives; DINO's ViTs: the cls tokens of the last blocks, the mean patch
    token), kept complete in `feature_options`.
    """

    def __init__(self, backbone: nn.Module, fc: nn.Linear, feature_bn: bool = False, head_name: str = "fc",
                 features: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = fc
        self.head_name = head_name
        self.feature_options = feature_options(features)
        self.norm = nn.BatchNorm1d(fc.in_features, affine=False) if feature_bn else nn.Identity()
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
            return forward_features(self.backbone, x, **self.feature_options)

    def trunk(self) -> Features:
        """The frozen backbone giving the classifier's features, as a module (extract_features)."""
        return Features(self.backbone, **self.feature_options)

    @property
    def head(self) -> nn.Sequential:
        """What trains on the features: the (optional) standardisation and the classifier."""
        return nn.Sequential(self.norm, self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.features(x)))  # N x num_classes

    def classifier_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the backbone family's names with the classifier as its head (a ResNet's:
        conv1..., fc.weight), loadable into torchvision.models.<arch>(num_classes=C) when the
        classifier reads the default features (DINO's last blocks make it wider); with
        feature_bn also `norm.running_mean`/`_var` (the standardisation torchvision's ResNet
        lacks: load those with strict=False and apply it before fc)."""
        state = dict(self.backbone.state_dict())
        state.update({f"{self.head_name}.{k}": v for k, v in self.fc.state_dict().items()})
        state.update({f"norm.{k}": v for k, v in self.norm.state_dict().items()})
        return state

    def load_classifier_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what `classifier_state_dict` gave (strict: a key too many or missing is an error)."""
        head = f"{self.head_name}."
        self.fc.load_state_dict({k[len(head):]: v for k, v in state.items() if k.startswith(head)})
        self.norm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("norm.")})
        self.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith((head, "norm."))})


def build_probe(
    arch: str, small_stem: bool, num_classes: int, weights: Mapping[str, torch.Tensor] | None = None,
    feature_bn: bool = False, features: Mapping[str, object] | None = None,
) -> LinearProbe:
    """`arch` with the pretrained `weights` (or random ones for a baseline), frozen, and a new
    linear classifier initialised N(0, 0.01) with zero bias (MoCo, SimCLR, DINO) in its head's
    place, on the `features` a linear protocol names (LinearProbe; default the head's input).

    The weights must fill every backbone parameter and buffer: the only keys allowed to be
    missing are the head's (fc.weight and fc.bias), anything else is a CheckpointError listing
    the keys.
    """
    options = feature_options(features)
    net = backbone_constructor(arch, small_stem, **(rebuild_options(arch, weights) if weights is not None else {}))(
        num_classes=num_classes)
    if weights is not None:
        load_backbone(net, weights)
    fc = get_head(net)
    width = feature_dim(net, **options)
    if fc.in_features != width:  # wider features than the head's (DINO's last blocks): a classifier of their width
        fc = nn.Linear(width, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    set_head(net, nn.Identity())
    return LinearProbe(net, fc, feature_bn, head_name(net), options)


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
            f"training (only the classifier may change): {changed[:8]}{' ...' if len(changed) > 8 else ''}. "
            "Was the backbone left trainable, or BatchNorm in train mode?"
        )
    logger.info("sanity check passed: the backbone equals %s", pretrained_path)


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
    """ROOT/train and ROOT/val as labelled datasets with the same classes - or, when ROOT names
    Fashion-MNIST (selfsup.data.fashion_mnist_root), its training and test sets.

    Labels are positions in the sorted list of class folders, so a class missing from one split
    would shift every label after it: differing classes are an error naming them.
    """
    fmnist = fashion_mnist_root(root)
    if fmnist is not None:
        return fashion_mnist_splits(fmnist, train_tf, val_tf)
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
    val = ImageDataset(val_samples, val_tf, val_classes)
    return train, val, list(train_classes)


def readable(dataset: ImageDataset, name: str, dist: DistInfo, workers: int = 0) -> ImageDataset:
    """`dataset` without its unreadable files, found before the evaluation starts by decoding every
    file (the processes share the work) and reported by rank 0: the evaluation then counts every
    readable image exactly once instead of failing - or replacing - at the first bad file."""
    if not isinstance(dataset, ImageDataset):  # images held in an array: nothing to decode
        return dataset
    bad = find_unreadable(dataset.samples, dist, workers)
    if not bad:
        return dataset
    if dist.is_main:
        for path, why in bad[:10]:
            logger.warning("unreadable image in %s: %s (%s)", name, path, why)
        logger.warning("%d unreadable image(s) left out of %s; %d remain", len(bad), name, len(dataset) - len(bad))
    return without_files(dataset, [path for path, _ in bad])
