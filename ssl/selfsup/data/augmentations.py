"""Per-image augmentations (PIL + torchvision) and the papers' augmentation presets.

This is the reference pipeline, the one facebookresearch/moco runs: every image is decoded,
augmented and normalised in a data-loading worker. `selfsup.data.batch_augment` holds the fast path that
moves the colour half onto the accelerator; both draw from the same preset definitions below.
"""

from __future__ import annotations

import dataclasses

import random
from dataclasses import dataclass, field

import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Images at most this large follow the small-image (CIFAR) recipes, which drop Gaussian blur:
# SimCLR, Appendix B.9, and solo-learn's CIFAR configs. A sigma of up to 2 pixels would wash
# out a 32-pixel image.
SMALL_IMAGE_MAX = 64


class TwoCropsTransform:
    """Take two random crops of one image: the query and the key (MoCo), or two views.

    With one transform both views use it (MoCo, SimCLR); with two, view 1 uses the first and
    view 2 the second (BYOL's asymmetric augmentation).
    """

    def __init__(self, base_transform, second_transform=None) -> None:
        self.t1 = base_transform
        self.t2 = second_transform if second_transform is not None else base_transform

    def __call__(self, x):
        return [self.t1(x), self.t2(x)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n  view1={self.t1},\n  view2={self.t2})"


class GaussianBlur:
    """Gaussian blur with sigma drawn uniformly from `sigma` (SimCLR, Appendix A), as MoCo v2."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, x: Image.Image) -> Image.Image:
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma[0], self.sigma[1])))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class Solarize:
    """Invert every pixel value at or above `threshold` (BYOL, Appendix B)."""

    def __init__(self, threshold: int = 128) -> None:
        self.threshold = threshold

    def __call__(self, x: Image.Image) -> Image.Image:
        return ImageOps.solarize(x, self.threshold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"


@dataclass(frozen=True)
class ViewSpec:
    """The random augmentation of one view, as probabilities and ranges.

    One spec is the single source of truth for both pipelines: `to_torchvision` builds the
    per-image reference transform, `selfsup.data.batch_augment` the batched one.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    flip_p: float = 0.5
    # MoCo v1 lists RandomGrayscale before ColorJitter; later recipes jitter first. Kept exactly.
    grayscale_first: bool = False

    def to_torchvision(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
        ops: list = [T.RandomResizedCrop(image_size, scale=self.crop_scale, ratio=self.crop_ratio)]
        jitter = T.ColorJitter(*self.jitter)
        jitter_op = jitter if self.jitter_p >= 1.0 else T.RandomApply([jitter], p=self.jitter_p)
        gray = T.RandomGrayscale(p=self.grayscale_p)
        if self.jitter_p > 0:
            ops += [gray, jitter_op] if self.grayscale_first else [jitter_op, gray]
        elif self.grayscale_p > 0:
            ops.append(gray)
        if self.blur_p > 0:
            ops.append(T.RandomApply([GaussianBlur(self.blur_sigma)], p=self.blur_p))
        if self.solarize_p > 0:
            ops.append(T.RandomApply([Solarize()], p=self.solarize_p))
        if self.flip_p > 0:
            ops.append(T.RandomHorizontalFlip(p=self.flip_p))
        ops += [T.ToTensor(), T.Normalize(mean, std)]
        return T.Compose(ops)


@dataclass(frozen=True)
class Preset:
    """A paper's augmentation recipe: one ViewSpec per view, and where it comes from."""

    name: str
    view1: ViewSpec
    view2: ViewSpec
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def for_image_size(self, image_size: int) -> "Preset":
        """The recipe at `image_size`: small images drop blur (see SMALL_IMAGE_MAX)."""
        if image_size > SMALL_IMAGE_MAX:
            return self
        no_blur = lambda v: ViewSpec(**{**v.__dict__, "blur_p": 0.0})  # noqa: E731
        return Preset(self.name, no_blur(self.view1), no_blur(self.view2), self.source, self.notes)


_MOCO_V1 = ViewSpec(
    crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_p=0.2, blur_p=0.0,
    grayscale_first=True,
)
_MOCO_V2 = ViewSpec(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
_BYOL_1 = ViewSpec(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=1.0)
_BYOL_2 = ViewSpec(
    crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.1, solarize_p=0.2
)
# moco-v3's views are BYOL's (its main_moco.py says so), with its --crop-min; CONFIG.md's ResNet
# recipes set it to 0.2, its ViT recipes keep the default 0.08 (then the views equal "byol").
_MOCOV3_RESNET_1 = dataclasses.replace(_BYOL_1, crop_scale=(0.2, 1.0))
_MOCOV3_RESNET_2 = dataclasses.replace(_BYOL_2, crop_scale=(0.2, 1.0))
_SIMCLR = ViewSpec(crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)

AUGMENTATIONS: dict[str, Preset] = {
    "moco_v1": Preset("moco_v1", _MOCO_V1, _MOCO_V1, "MoCo v1, facebookresearch/moco main_moco.py (default)"),
    "moco_v2": Preset("moco_v2", _MOCO_V2, _MOCO_V2, "MoCo v2, arXiv:2003.04297; moco --aug-plus"),
    "byol": Preset("byol", _BYOL_1, _BYOL_2, "BYOL, arXiv:2006.07733, Table 6 (asymmetric views)"),
    "simclr": Preset("simclr", _SIMCLR, _SIMCLR, "SimCLR, arXiv:2002.05709, Appendix A (strength s=1)"),
    "mocov3_resnet": Preset("mocov3_resnet", _MOCOV3_RESNET_1, _MOCOV3_RESNET_2,
                            "moco-v3 CONFIG.md's ResNet-50 views: BYOL's with --crop-min=.2"),
}


def get_preset(name: str, image_size: int = 224) -> Preset:
    """The augmentation recipe `name` (moco_v1, moco_v2, byol, simclr) at `image_size`."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation preset '{name}'; valid: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name].for_image_size(image_size)


def build_two_crops_transform(
    name: str, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> TwoCropsTransform:
    """The reference per-image two-view transform of preset `name` (PIL image -> 2 tensors)."""
    preset = get_preset(name, image_size)
    t1 = preset.view1.to_torchvision(image_size, mean, std)
    if preset.view2 == preset.view1:
        return TwoCropsTransform(t1)
    return TwoCropsTransform(t1, preset.view2.to_torchvision(image_size, mean, std))


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette and RGBA images become RGB, so every network sees 3 channels."""
    return img if img.mode == "RGB" else img.convert("RGB")
