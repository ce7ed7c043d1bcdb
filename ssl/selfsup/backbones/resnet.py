"""torchvision's ResNets (and any torchvision-style network whose head is `fc`), optionally with
the small-image stem: the ResNet family of selfsup.backbones."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torchvision

# torchvision constructors whose models have the ResNet layout (conv1/bn1/layer1-4/avgpool/fc).
ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
TITLE = "ResNet"  # how messages name the family
HEAD = "fc"  # the classifier torchvision puts last; the methods replace it by their projection head
MARKER = "conv1.weight"  # a key every network of the family has: where a checkpoint holds one

_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


def build(arch: str, num_classes: int, small_stem: bool = False, **kwargs: Any) -> nn.Module:
    """torchvision's `arch` with `num_classes` outputs, randomly initialised; `small_stem`: a 3x3
    stride-1 first convolution and no max-pool, for 28-64 pixel images (the CIFAR recipe of
    SimCLR and of MoCo's demos)."""
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def owns(net: nn.Module) -> bool:
    """A torchvision-style classifier: its head is the attribute `fc` (a ResNet, or a small test
    network with the same convention)."""
    return isinstance(getattr(net, HEAD, None), nn.Module)


def feature_dim(net: nn.Module) -> int:
    """The width of the pooled features: the input of the head's first Linear (the classifier, or
    the first layer of a projection MLP); for a torchvision ResNet whose head was removed, the
    width of its last stage."""
    for module in getattr(net, HEAD).modules():
        if isinstance(module, nn.Linear):
            return module.in_features
    if isinstance(net, torchvision.models.ResNet):
        return net.inplanes  # torchvision leaves the last stage's output width here
    raise TypeError(
        f"cannot tell the feature width of {type(net).__name__}: its `fc` ({type(net.fc).__name__}) holds no "
        "nn.Linear; a torchvision-style base_encoder ends in `fc = nn.Linear(features, num_classes)`"
    )


def forward_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: N x 3 x H x W -> the pooled features N x D, everything of the ResNet but its head."""
    missing = [name for name in _TRUNK if not hasattr(net, name)]
    if missing:
        raise TypeError(f"{type(net).__name__} lacks the ResNet layout's {missing}: its features cannot be read")
    for name in _TRUNK:
        x = getattr(net, name)(x)
    return torch.flatten(x, 1)  # N x D


def describe(weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights (ResNet names) say about how to rebuild the network: the small stem has a
    3x3 first convolution, torchvision's a 7x7 one."""
    return {"small_stem": weights[MARKER].shape[-1] == 3}


def rebuild_options(weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor keywords beyond `small_stem` that rebuild the network: none for a ResNet."""
    return {}


def flag_options(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor keywords main_pretrain.py's flags give a ResNet: torchvision's zero_init_residual
    (moco-v3 builds its ResNets with it; the stem is small_stem)."""
    return {"zero_init_residual": bool(flags.get("zero_init_residual"))}
