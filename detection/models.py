"""Faster R-CNN with a pretrained ResNet, from torchvision pieces: FPN or C4 head, SyncBN / BN /
frozen BN, all stages trainable by default.

The C4 variant is Detectron2's R50-C4 as used by MoCo: the RPN and RoI pooling (ROIAlignV2,
14 x 14) work on res4 (stride 16) and res5 is the RoI box head, followed by the extra BatchNorm
of MoCo's `Res5ROIHeadsExtraNorm` and average pooling.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from selfsup.backbones import backbone_constructor
from selfsup.backbones.resnet import ARCHS  # detection transfer is for ResNets (C4 and FPN heads)
from selfsup.checkpoint import CheckpointError, extract_backbone, infer_arch_info, load_backbone, load_checkpoint

logger = logging.getLogger(__name__)

HEADS = ("c4", "fpn")
NORMS = ("syncbn", "bn", "frozenbn")
# torchvision's ImageNet statistics on [0, 1] images: MoCo's PIXEL_MEAN/PIXEL_STD divided by 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # Detectron2's stem, res2 .. res5


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that shapes the detector (not the weights)."""

    arch: str = "resnet50"
    head: str = "c4"
    num_classes: int = 20  # object classes, background excluded
    norm: str = "syncbn"
    small_stem: bool = False
    freeze_at: int = 0  # Detectron2's FREEZE_AT: 0 trains everything, 1 freezes the stem, 2 also res2 ...
    train_sizes: tuple[int, ...] = (800,)  # shorter side, one drawn per image when training
    test_size: int = 800
    max_size: int = 1333
    roi_batch_size: int = 512  # RoIs sampled per image for the box head
    fpn_channels: int = 256
    box_head_dim: int = 1024  # FPN's two-layer box head

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch '{self.arch}'; valid: {', '.join(ARCHS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head '{self.head}'; valid: {', '.join(HEADS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm '{self.norm}'; valid: {', '.join(NORMS)}")
        if not 0 <= self.freeze_at <= (4 if self.head == "c4" else 5):
            raise ValueError(f"freeze_at {self.freeze_at} is outside 0..{4 if self.head == 'c4' else 5}")
        if self.num_classes < 1:
            raise ValueError("num_classes must be at least 1")


# ---------------------------------------------------------------------------------------------- backbone weights


def supervised_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's supervised ImageNet weights (IMAGENET1K_V1, the classic recipe), downloaded
    into torch's hub cache the first time. Only called when the user asks for them."""
    try:
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"torchvision has no IMAGENET1K_V1 weights for {arch}") from e
    try:
        return weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    except Exception as e:  # URLError, HTTPError, a hash mismatch: all mean "no usable file"
        cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise CheckpointError(
            f"could not download torchvision's supervised {arch} weights from {weights.url} ({type(e).__name__}: {e}). "
            f"Offline, copy that file to {cache}, or pass it as --pretrained PATH."
        ) from e


def build_resnet(init: str, arch: str | None = None, small_stem: bool | None = None) -> tuple[nn.Module, str, bool]:
    """A torchvision ResNet with the backbone weights to fine-tune.

    Args:
        init: 'random', 'supervised' (torchvision's ImageNet weights, downloaded) or the path of a
            pretraining checkpoint (this project, facebookresearch/moco, moco-v3, torchvision).
        arch / small_stem: None takes them from the checkpoint (else resnet50, standard stem);
            a value that contradicts the checkpoint is an error.
    Returns:
        (resnet, arch, small_stem). Loading goes through selfsup.checkpoint.extract_backbone and
        load_backbone: a missing, unexpected or misshapen key is an error.
    """
    if init in ("random", "supervised"):
        arch = arch or "resnet50"
        small_stem = bool(small_stem)
        if init == "supervised" and small_stem:
            raise ValueError("torchvision's supervised weights have the standard stem; drop --small-stem")
        net = backbone_constructor(arch, small_stem)(num_classes=1000)
        if init == "supervised":
            load_backbone(net, extract_backbone(supervised_state_dict(arch)))
        return net, arch, small_stem
    checkpoint = load_checkpoint(init)
    info = infer_arch_info(checkpoint)
    if arch is not None and info.get("arch") and arch != info["arch"]:
        raise ValueError(f"--arch {arch} contradicts the checkpoint {init}, which holds a {info['arch']}")
    if small_stem is not None and info.get("small_stem") is not None and bool(small_stem) != bool(info["small_stem"]):
        raise ValueError(f"--small-stem {small_stem} contradicts the checkpoint {init} (small_stem={info['small_stem']})")
    arch = arch or info.get("arch") or "resnet50"
    if arch not in ARCHS:
        raise ValueError(f"{init} holds a {arch} backbone: detection transfer here is for ResNets ({', '.join(ARCHS)})")
    small_stem = bool(small_stem if small_stem is not None else info.get("small_stem"))
    net = backbone_constructor(arch, small_stem)(num_classes=1000)
    load_backbone(net, extract_backbone(checkpoint))
    return net, arch, small_stem


# ---------------------------------------------------------------------------------------------- norms


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (and SyncBatchNorm) by a FrozenBatchNorm2d with its statistics
    and affine parameters: an affine map that neither learns nor tracks statistics."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = convert_frozen_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def norm_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of normalisation layers (no weight decay, as Detectron2's
    WEIGHT_DECAY_NORM = 0)."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    return {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}


def freeze_stages(resnet: nn.Module, freeze_at: int) -> None:
    """Detectron2's FREEZE_AT: no gradient and frozen BN for the stem (1) and res2.. (2..5)."""
    for i in range(freeze_at):
        names = ("conv1", "bn1") if _STAGES[i] == "stem" else (_STAGES[i],)
        for name in names:
            module = convert_frozen_batchnorm(getattr(resnet, name))
            for p in module.parameters():
                p.requires_grad = False
            setattr(resnet, name, module)


# ---------------------------------------------------------------------------------------------- C4 head


class C4Pooler(MultiScaleRoIAlign):
    """ROIAlignV2 (aligned=True, adaptive sampling) on the single res4 map of a known stride,
    as Detectron2's C4 box pooler. A MultiScaleRoIAlign only so torchvision's FasterRCNN
    accepts it."""

    def __init__(self, stride: int, output_size: int = 14) -> None:
        super().__init__(["0"], output_size, sampling_ratio=0)
        self.stride = stride

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes) -> torch.Tensor:
        # x['0']: N x C x H/16 x W/16; boxes: per image R_i x 4 -> (sum R_i) x C x 14 x 14
        return roi_align(x["0"], boxes, self.output_size, spatial_scale=1.0 / self.stride, sampling_ratio=0,
                         aligned=True)


class Res5Head(nn.Module):
    """res5 on the pooled RoIs, MoCo's extra norm after it, then average pooling.
    (sum R) x C4 x 14 x 14 -> (sum R) x C5."""

    def __init__(self, res5: nn.Module, out_channels: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.res5 = res5
        self.norm = norm_layer(out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x)).mean(dim=(2, 3))


class C4Backbone(nn.Sequential):
    """Stem, res2, res3 and res4 of a torchvision ResNet; returns the res4 map."""

    def __init__(self, resnet: nn.Module, out_channels: int) -> None:
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
        super().__init__(OrderedDict((n, getattr(resnet, n)) for n in names))  # torchvision's names in the state dict
        self.out_channels = out_channels


def _out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]  # Bottleneck (conv1-3) or BasicBlock (conv1-2)
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def _init_predictor(predictor: FastRCNNPredictor) -> None:
    # Detectron2's FastRCNNOutputLayers: small normal weights, zero biases.
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)


class _Transform(GeneralizedRCNNTransform):
    """torchvision's resize-and-normalise with a separate test size (Detectron2's MIN_SIZE_TEST):
    training draws the shorter side from `min_size`, evaluation uses `test_size`."""

    def __init__(self, train_sizes, test_size: int, max_size: int) -> None:
        super().__init__(train_sizes, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
        self.test_size = test_size

    def resize(self, image, target=None):
        if self.training:
            return super().resize(image, target)
        train_sizes, self.min_size = self.min_size, (self.test_size,)
        try:
            return super().resize(image, target)
        finally:
            self.min_size = train_sizes


# ---------------------------------------------------------------------------------------------- detector


def build_detector(resnet: nn.Module, cfg: DetectorConfig) -> FasterRCNN:
    """Faster R-CNN around `resnet` (its weights are used as they are; see build_resnet).

    SyncBN conversion happens here too; the caller checks that it runs on CUDA with DDP.
    """
    freeze_stages(resnet, cfg.freeze_at)
    channels = [_out_channels(getattr(resnet, f"layer{i}")) for i in range(1, 5)]
    stem_stride = 1 if cfg.small_stem else 4
    num_outputs = cfg.num_classes + 1  # + background
    common = dict(min_size=cfg.train_sizes, max_size=cfg.max_size, image_mean=list(IMAGENET_MEAN),
                  image_std=list(IMAGENET_STD), box_batch_size_per_image=cfg.roi_batch_size)
    if cfg.head == "fpn":
        fpn_norm = nn.BatchNorm2d if cfg.norm in ("bn", "syncbn") else None
        backbone = BackboneWithFPN(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)}, channels,
                                   cfg.fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm)
        box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim)
        predictor = FastRCNNPredictor(cfg.box_head_dim, num_outputs)
        _init_predictor(predictor)
        # Detectron2's R50-FPN RPN: 2000 boxes per level before NMS, 1000 per image after it.
        model = FasterRCNN(backbone, box_head=box_head, box_predictor=predictor, rpn_pre_nms_top_n_train=2000,
                           rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000,
                           rpn_post_nms_top_n_test=1000, **common)
    else:
        backbone = C4Backbone(resnet, channels[2])
        anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
        extra_norm = FrozenBatchNorm2d if cfg.norm == "frozenbn" else nn.BatchNorm2d
        box_head = Res5Head(resnet.layer4, channels[3], extra_norm)
        predictor = FastRCNNPredictor(channels[3], num_outputs)
        _init_predictor(predictor)
        # Detectron2's C4 defaults, which MoCo's configs keep: 12000/2000 proposals around NMS when
        # training, 6000/1000 when testing.
        model = FasterRCNN(backbone, rpn_anchor_generator=anchors, rpn_head=RPNHead(channels[2], 15),
                           box_roi_pool=C4Pooler(stride=stem_stride * 4), box_head=box_head, box_predictor=predictor,
                           rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=2000,
                           rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=1000, **common)
    model.transform = _Transform(cfg.train_sizes, cfg.test_size, cfg.max_size)
    if cfg.norm == "frozenbn":
        convert_frozen_batchnorm(model)
    elif cfg.norm == "syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def check_norm(norm: str, device: torch.device, world_size: int) -> None:
    """SyncBN needs CUDA and several DDP processes; say so before anything is built."""
    if norm == "syncbn" and (device.type != "cuda" or world_size < 2):
        raise ValueError(
            f"--norm syncbn synchronises BatchNorm across DDP processes on CUDA, but this run has "
            f"{world_size} process(es) on {device.type}. Use --norm bn (BatchNorm per process) or --norm frozenbn, "
            "or launch with torchrun on several GPUs."
        )
