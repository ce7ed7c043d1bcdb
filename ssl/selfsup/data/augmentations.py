"""Per-image augmentations (PIL + torchvision) and the papers' augmentation presets.

This is the reference pipeline, the one facebookresearch/moco runs: every image is decoded,
augmented and normalised in a data-loading worker. `selfsup.data.batch_augment` holds the fast path that
moves the colour half onto the accelerator; both draw from the same preset definitions below.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Images at most this large follow the small-image (CIFAR) recipes, which drop Gaussian blur:
# SimCLR, Appendix B.9, and solo-learn's CIFAR configs. A sigma of up to 2 pixels would wash
# out a 32-pixel image.
SMALL_IMAGE_MAX = 64


class MultiCropTransform:
    """Cut a preset's views from one image, one transform per view, in the preset's order: the
    query and the key (MoCo), two views (SimCLR, BYOL's asymmetric pair), or DINO's two global
    and several local crops. Returns the list of view tensors."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        if not transforms:
            raise ValueError("MultiCropTransform needs at least one view transform")
        self.transforms = list(transforms)

    def __call__(self, x) -> list:
        return [t(x) for t in self.transforms]

    def __repr__(self) -> str:
        views = "".join(f"\n  view{i + 1}={t}," for i, t in enumerate(self.transforms))
        return f"{type(self).__name__}({views})"


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


INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class ViewSpec:
    """The random augmentation of one view, as probabilities and ranges.

    One spec is the single source of truth for every pipeline: `to_torchvision` builds the
    per-image reference transform, `selfsup.data.crops` and `selfsup.data.batch_augment` the
    batched one. `size` is the view's output size (None: the run's --image-size), and
    `interpolation` the resize of its RandomResizedCrop ("bilinear", or "bicubic" as DINO's).
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
    size: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{self.interpolation}'; valid: {', '.join(INTERPOLATIONS)}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"a view's size must be at least 1 pixel; got {self.size}")

    def output_size(self, image_size: int) -> int:
        """The view's side in pixels: its own size, else the run's `image_size`."""
        return self.size if self.size is not None else image_size

    def to_torchvision(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
        ops: list = [T.RandomResizedCrop(self.output_size(image_size), scale=self.crop_scale, ratio=self.crop_ratio,
                                         interpolation=T.InterpolationMode(self.interpolation))]
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
    """A paper's augmentation recipe: one ViewSpec per view, in the order the method takes them
    (DINO: the global crops first), and where it comes from."""

    name: str
    views: tuple[ViewSpec, ...]
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError(f"preset '{self.name}' has no views")

    def sizes(self, image_size: int) -> tuple[int, ...]:
        """Each view's side in pixels at the run's `image_size`."""
        return tuple(v.output_size(image_size) for v in self.views)

    def for_image_size(self, image_size: int) -> "Preset":
        """The recipe at `image_size`: no blur on any view when the run's images are at most
        SMALL_IMAGE_MAX pixels (the small-image recipes); at larger sizes DINO's smaller local crops
        keep theirs, as DINO's own."""
        if image_size > SMALL_IMAGE_MAX:
            return self
        return dataclasses.replace(self, views=tuple(dataclasses.replace(v, blur_p=0.0) for v in self.views))

    def describe(self, image_size: int) -> str:
        """`at 224px` when every view has one size, else the views by size (`at 2x224px + 8x96px`)."""
        sizes = self.sizes(image_size)
        if len(set(sizes)) == 1:
            return f"at {sizes[0]}px"
        runs: list[list[int]] = []
        for s in sizes:
            if runs and runs[-1][1] == s:
                runs[-1][0] += 1
            else:
                runs.append([1, s])
        return "at " + " + ".join(f"{n}x{s}px" for n, s in runs)


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

# DINO (facebookresearch/dino main_dino.py, DataAugmentationDINO and its defaults): bicubic
# RandomResizedCrops, BYOL's colour jitter and grayscale, and BYOL's blur/solarize pair on the two
# global crops; the local crops blur with p 0.5. Its flip comes before the colour operations,
# ours last: flipping commutes with all of them (and with the symmetric blur), so the
# distribution of the views is the same.
DINO_LOCAL_CROPS_NUMBER = 8
DINO_GLOBAL_SCALE = (0.4, 1.0)
DINO_LOCAL_SCALE = (0.05, 0.4)
DINO_LOCAL_SIZE_AT_224 = 96


def dino_views(local_crops_number: int = DINO_LOCAL_CROPS_NUMBER, local_size: int | None = DINO_LOCAL_SIZE_AT_224,
               global_scale: tuple[float, float] = DINO_GLOBAL_SCALE,
               local_scale: tuple[float, float] = DINO_LOCAL_SCALE) -> tuple[ViewSpec, ...]:
    """DINO's views: global crop 1 (blur p 1.0), global crop 2 (blur p 0.1, solarize p 0.2), both
    at the run's image size, then `local_crops_number` local crops of `local_size` (blur p 0.5)."""
    global_1 = ViewSpec(crop_scale=tuple(global_scale), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2,
                        blur_p=1.0, interpolation="bicubic")
    global_2 = dataclasses.replace(global_1, blur_p=0.1, solarize_p=0.2)
    local = dataclasses.replace(global_1, crop_scale=tuple(local_scale), blur_p=0.5, size=local_size)
    return (global_1, global_2) + (local,) * local_crops_number


AUGMENTATIONS: dict[str, Preset] = {
    "moco_v1": Preset("moco_v1", (_MOCO_V1, _MOCO_V1), "MoCo v1, facebookresearch/moco main_moco.py (default)"),
    "moco_v2": Preset("moco_v2", (_MOCO_V2, _MOCO_V2), "MoCo v2, arXiv:2003.04297; moco --aug-plus"),
    "byol": Preset("byol", (_BYOL_1, _BYOL_2), "BYOL, arXiv:2006.07733, Table 6 (asymmetric views)"),
    "simclr": Preset("simclr", (_SIMCLR, _SIMCLR), "SimCLR, arXiv:2002.05709, Appendix A (strength s=1)"),
    "mocov3_resnet": Preset("mocov3_resnet", (_MOCOV3_RESNET_1, _MOCOV3_RESNET_2),
                            "moco-v3 CONFIG.md's ResNet-50 views: BYOL's with --crop-min=.2"),
    "dino": Preset("dino", dino_views(), "DINO, arXiv:2104.14294; facebookresearch/dino DataAugmentationDINO",
                   ("2 global crops at the image size, then --local-crops-number local crops (96 px at 224)",)),
}


def default_local_size(image_size: int) -> int:
    """DINO's local crop size for `image_size`: 96 at 224, in proportion elsewhere, a multiple of 8
    (a whole number of patches for patch 4 and 8): 16 at 32 px."""
    return max(8, round(image_size * DINO_LOCAL_SIZE_AT_224 / 224 / 8) * 8)


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must be two area fractions 0 < min <= max <= 1; got {tuple(scale)}")
    return lo, hi


def get_preset(
    name: str,
    image_size: int = 224,
    *,
    local_crops_number: int | None = None,
    local_size: int | None = None,
    global_scale: Sequence[float] | None = None,
    local_scale: Sequence[float] | None = None,
) -> Preset:
    """The augmentation recipe `name` (see AUGMENTATIONS) at `image_size` (Preset.for_image_size:
    no blur on views of at most SMALL_IMAGE_MAX pixels). Views without a size of their own take
    the run's image size wherever the preset is used.

    The dino preset takes its run options (facebookresearch/dino's flags; None: its default):
    `local_crops_number` (8), `local_size` (default_local_size(image_size): 96 at 224),
    `global_scale` ((0.4, 1.0)) and `local_scale` ((0.05, 0.4)). Other presets take none.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation preset '{name}'; valid: {', '.join(AUGMENTATIONS)}")
    options = {"local_crops_number": local_crops_number, "local_size": local_size, "global_scale": global_scale,
               "local_scale": local_scale}
    given = [k for k, v in options.items() if v is not None]
    preset = AUGMENTATIONS[name]
    if name == "dino":
        n = DINO_LOCAL_CROPS_NUMBER if local_crops_number is None else int(local_crops_number)
        if n < 0:
            raise ValueError(f"local_crops_number must be 0 or more; got {local_crops_number}")
        size = default_local_size(image_size) if local_size is None else int(local_size)
        if size < 1:
            raise ValueError(f"local_size must be at least 1 pixel; got {local_size}")
        views = dino_views(n, size, _check_scale("global_scale", global_scale or DINO_GLOBAL_SCALE),
                           _check_scale("local_scale", local_scale or DINO_LOCAL_SCALE))
        preset = dataclasses.replace(preset, views=views)
    elif given:
        raise ValueError(f"{', '.join(given)}: options of the dino preset only, not of '{name}'")
    return preset.for_image_size(image_size)


def build_multi_crop_transform(
    preset: str | Preset, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> MultiCropTransform:
    """The reference per-image transform of `preset` (a Preset, or a name for get_preset's
    defaults): PIL image -> one tensor per view, in the preset's order."""
    if isinstance(preset, str):
        preset = get_preset(preset, image_size)
    built: dict[ViewSpec, T.Compose] = {}  # views with one spec share one transform
    for v in preset.views:
        if v not in built:
            built[v] = v.to_torchvision(image_size, mean, std)
    return MultiCropTransform([built[v] for v in preset.views])


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette and RGBA images become RGB, so every network sees 3 channels."""
    return img if img.mode == "RGB" else img.convert("RGB")
