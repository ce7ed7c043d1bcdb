"""The CPU half of the split loader: decode each image once and cut both random resized crops.

Per image, in a data-loading worker: read the header, draw both views' RandomResizedCrop boxes
and flips (torchvision's distribution, seeded per sample by the sampler), decode once - at a
reduced JPEG scale (DCT scaling, Pillow's `draft`) when both crops still get at least the
output resolution from it - then crop, resize (antialiased bilinear, as Pillow) and flip each
view and return it as a uint8 3 x S x S tensor. Colour, blur and normalisation follow batched
(`selfsup.augment`): on the accelerator, or - on a CPU-only run - still in the worker, per batch
(`TwoCropsBatches`).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment import TwoViewAugment, augment_generator, fallback_crop_size
from .data import ImageDataset
from .loader import Preset, to_rgb

# JPEG's DCT scaling as Pillow exposes it: decode at 1/2, 1/4 or 1/8 of the size.
DRAFT_FACTORS = (8, 4, 2)


def sample_crop_box(
    rng: random.Random, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`: (top, left, h, w).

    Up to 10 (area fraction, log aspect ratio) draws, the first crop that fits wins; otherwise
    the central crop clamped to `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    w, h = fallback_crop_size(width, height, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def draft_factor(boxes: Sequence[tuple[int, int, int, int]], size: int) -> int:
    """The largest JPEG scale-down factor (8, 4, 2, else 1) that leaves every box at least
    `size` pixels high and wide, so that no view is upsampled because of it."""
    smallest = min(min(h, w) for _, _, h, w in boxes)
    for d in DRAFT_FACTORS:
        if smallest >= size * d:
            return d
    return 1


def _scaled_box(box: tuple[int, int, int, int], s: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A box of the full-size image on the image decoded at 1/s (rounded to whole pixels)."""
    top, left, h, w = box
    y0, x0 = min(round(top / s), height - 1), min(round(left / s), width - 1)
    y1, x1 = max(min(round((top + h) / s), height), y0 + 1), max(min(round((left + w) / s), width), x0 + 1)
    return y0, x0, y1 - y0, x1 - x0


def resized_crop_uint8(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """Crop an H x W x 3 uint8 image to `box`, resize it to size x size and mirror it if `flip`.

    torch's uint8 antialiased bilinear resize computes Pillow's filter (crop then resize, as
    torchvision's resized_crop on PIL images) in fixed point; values differ from Pillow's by at
    most 1. Returns a contiguous 3 x size x size uint8 tensor.
    """
    top, left, h, w = box
    crop = image[top : top + h, left : left + w].permute(2, 0, 1).unsqueeze(0)  # 1 x 3 x h x w
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.flip(-1).contiguous() if flip else out.contiguous()


def pil_to_hwc(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as an H x W x 3 uint8 tensor (shares numpy's read-only buffer; never
    written to)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read it
        return torch.from_numpy(np.asarray(img))


class TwoCropsDataset(ImageDataset):
    """Images decoded once per item into a preset's two uint8 views (3 x S x S each): the CPU
    half of the batched backend. Items are `([view1, view2], label, skipped)`; unreadable files
    are skipped as in ImageDataset.

    Args:
        samples, classes: as ImageDataset (from `find_samples`).
        preset: the augmentation preset; only its crop and flip settings are used here.
        image_size: output size S.
        draft: decode JPEGs at a reduced scale when both crops allow it.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        preset: Preset,
        image_size: int,
        classes: Sequence[str] = (),
        draft: bool = True,
    ) -> None:
        super().__init__(samples, None, classes)
        self.specs = (preset.view1, preset.view2)
        self.image_size = image_size
        self.draft = draft

    def crop_params(self, seed: int | None, height: int, width: int) -> tuple[list, list[bool]]:
        """Both views' crop boxes (top, left, h, w) and flips for an image of height x width,
        drawn from a generator seeded with the sample's seed (fresh randomness without one)."""
        rng = random.Random(seed) if seed is not None else random.Random()
        boxes = [sample_crop_box(rng, height, width, v.crop_scale, v.crop_ratio) for v in self.specs]
        flips = [rng.random() < v.flip_p for v in self.specs]
        return boxes, flips

    def _read(self, path: str, seed: int | None):
        # Decoding happens here, inside ImageDataset's unreadable-file handling.
        with open(path, "rb") as f:
            img = Image.open(f)
            width, height = img.size
            boxes, flips = self.crop_params(seed, height, width)
            s = 1.0
            if self.draft and img.format == "JPEG":
                d = draft_factor(boxes, self.image_size)
                if d > 1:
                    result = img.draft("RGB", (width // d, height // d))
                    if isinstance(result, tuple):  # (mode, box of the full image in decoded pixels)
                        s = width / result[1][2]
            img.load()
        img = to_rgb(img)
        image = pil_to_hwc(img)
        if s != 1.0:
            boxes = [_scaled_box(b, s, img.height, img.width) for b in boxes]
        return [resized_crop_uint8(image, b, self.image_size, fl) for b, fl in zip(boxes, flips)]


class TwoCropsBatches(torch.utils.data.Dataset):
    """Whole batches of a TwoCropsDataset, fetched by `(epoch, step, [(index, seed), ...])` keys
    (pipeline.StepBatchSampler): `([view1, view2], labels, skipped)` with N x 3 x S x S views.

    With `augment`, the batched colour half runs here too, with the generator the device would
    use for that step (augment_generator(seed, epoch, step, rank)): what a CPU-only run does, so
    that the colour work stays in the loader workers, in parallel with the training step, at the
    batched cost per image. Without it the views stay uint8 for the device.
    """

    def __init__(self, dataset: TwoCropsDataset, augment: TwoViewAugment | None = None, seed: int = 0,
                 rank: int = 0) -> None:
        self.dataset, self.augment, self.seed, self.rank = dataset, augment, seed, rank

    def __getitem__(self, key: tuple[int, int, list[tuple[int, int]]]):
        epoch, step, items = key
        out = [self.dataset[item] for item in items]
        views = [torch.stack([o[0][k] for o in out]) for k in (0, 1)]
        labels = torch.tensor([o[1] for o in out])
        skipped = torch.tensor([o[2] for o in out])
        if self.augment is not None:
            views = self.augment(views, augment_generator(self.seed, epoch, step, self.rank))
        return views, labels, skipped
