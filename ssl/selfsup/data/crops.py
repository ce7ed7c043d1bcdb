"""Crop geometry, in one place: torchvision's RandomResizedCrop boxes drawn per image (in the
loader workers) or per batch (for images held in memory), and the antialiased resize of a box
(bilinear, or bicubic as DINO's crops: Pillow's filters, which the reference runs).

The CPU half of the split loader: decode each image once and cut every view's random resized crop.

Per image, in a data-loading worker: read the header, draw every view's RandomResizedCrop box
and flip (torchvision's distribution, seeded per sample by the sampler), decode once - at a
reduced JPEG scale (DCT scaling, Pillow's `draft`) when every crop still gets at least its
view's output resolution from it - then crop, resize (antialiased, as Pillow) and flip each
view and return it as a uint8 3 x S x S tensor (S: the view's size). Colour, blur and
normalisation follow batched (`selfsup.data.batch_augment`): on the accelerator, or - on a
CPU-only run - still in the worker, per batch (`selfsup.data.pipeline.CropsBatches`).
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import ImageDataset
from .augmentations import Preset, to_rgb

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


def draft_factor(boxes: Sequence[tuple[int, int, int, int]], size: int | Sequence[int]) -> int:
    """The largest JPEG scale-down factor (8, 4, 2, else 1) that leaves every box at least its
    view's `size` (one for all boxes, or one per box) pixels high and wide, so that no view is
    upsampled because of it."""
    sizes = [size] * len(boxes) if isinstance(size, int) else list(size)
    for d in DRAFT_FACTORS:
        if all(min(h, w) >= s * d for (_, _, h, w), s in zip(boxes, sizes)):
            return d
    return 1


def _scaled_box(box: tuple[int, int, int, int], s: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A box of the full-size image on the image decoded at 1/s (rounded to whole pixels)."""
    top, left, h, w = box
    y0, x0 = min(round(top / s), height - 1), min(round(left / s), width - 1)
    y1, x1 = max(min(round((top + h) / s), height), y0 + 1), max(min(round((left + w) / s), width), x0 + 1)
    return y0, x0, y1 - y0, x1 - x0


@functools.cache
def pillow_resizes_vertically_first() -> bool:
    """Whether the installed Pillow resizes vertically first when the height shrinks by more
    pixels than twice the width does (python-pillow/Pillow#9549, in Pillow 13); earlier versions
    always resize horizontally first. The order matters for bicubic, whose overshoot Pillow clips
    to uint8 between its two passes. Probed once on a 12 x 2 image resized to 4 x 4."""
    image = torch.tensor([[[(37 * i + 101 * j + 7 * c) % 256 for c in range(3)] for j in range(2)] for i in range(12)],
                         dtype=torch.uint8)
    pil = torch.from_numpy(np.array(Image.fromarray(image.numpy()).resize((4, 4), Image.BICUBIC))).int()
    crop = image.permute(2, 0, 1).unsqueeze(0)
    h_first = _interpolate(crop, (4, 4), "bicubic")[0].permute(1, 2, 0).int()
    v_first = _interpolate(_interpolate(crop, (4, 2), "bicubic"), (4, 4), "bicubic")[0].permute(1, 2, 0).int()
    return bool((v_first - pil).abs().sum() < (h_first - pil).abs().sum())


def vertical_first(h: int | torch.Tensor, w: int | torch.Tensor, size: int):
    """Whether Pillow resizes an h x w crop to size x size vertically first (see
    pillow_resizes_vertically_first); works on ints and on tensors of crop sizes."""
    if not pillow_resizes_vertically_first():
        return torch.zeros_like(h, dtype=torch.bool) if isinstance(h, torch.Tensor) else False
    return (h > size) & (h - size > 2 * (w - size))


def _interpolate(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def resized_crop_uint8(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool,
                       interpolation: str = "bilinear") -> torch.Tensor:
    """Crop an H x W x 3 uint8 image to `box`, resize it to size x size and mirror it if `flip`.

    torch's uint8 antialiased resize computes Pillow's filters (crop then resize, as
    torchvision's resized_crop on PIL images) in fixed point, rounding to uint8 between its two
    passes as Pillow does: bilinear values differ from Pillow's by at most 1. Bicubic runs its
    passes in Pillow's order (`vertical_first`), because its overshoot is clipped in between:
    at most 2 levels from Pillow (docs/PERFORMANCE.md). Returns a contiguous 3 x size x size
    uint8 tensor.
    """
    top, left, h, w = box
    crop = image[top : top + h, left : left + w].permute(2, 0, 1).unsqueeze(0)  # 1 x 3 x h x w
    if interpolation == "bicubic" and vertical_first(h, w, size):
        crop = _interpolate(crop, (size, w), interpolation)
    out = _interpolate(crop, (size, size), interpolation)[0]
    return out.flip(-1).contiguous() if flip else out.contiguous()


def pil_to_hwc(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as an H x W x 3 uint8 tensor (shares numpy's read-only buffer; never
    written to)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read it
        return torch.from_numpy(np.asarray(img))


class CropsDataset(ImageDataset):
    """Images decoded once per item into a preset's uint8 views (3 x S_v x S_v each, S_v the
    view's size): the CPU half of the batched backend. Items are `([view, ...], label, skipped)`,
    the views in the preset's order; unreadable files are skipped as in ImageDataset.

    Args:
        samples, classes: as ImageDataset (from `find_samples`).
        preset: the augmentation preset; only its crop, flip, size and interpolation settings
            are used here.
        image_size: the run's image size (the views without a size of their own).
        draft: decode JPEGs at a reduced scale when every crop allows it.
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
        self.specs = tuple(preset.views)
        self.sizes = preset.sizes(image_size)
        self.image_size = image_size
        self.draft = draft

    def crop_params(self, seed: int | None, height: int, width: int) -> tuple[list, list[bool]]:
        """Every view's crop box (top, left, h, w), then every view's flip, for an image of
        height x width, drawn from a generator seeded with the sample's seed (fresh randomness
        without one)."""
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
                d = draft_factor(boxes, self.sizes)
                if d > 1:
                    result = img.draft("RGB", (width // d, height // d))
                    if isinstance(result, tuple):  # (mode, box of the full image in decoded pixels)
                        s = width / result[1][2]
            img.load()
        img = to_rgb(img)
        image = pil_to_hwc(img)
        if s != 1.0:
            boxes = [_scaled_box(b, s, img.height, img.width) for b in boxes]
        return [resized_crop_uint8(image, b, size, fl, spec.interpolation)
                for b, fl, size, spec in zip(boxes, flips, self.sizes, self.specs)]


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a small CPU tensor (parameters, indices) to `device` without a stream sync: a copy
    from pageable memory would wait for the GPU's queued work, pinned memory does not."""
    if t.device == device or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (as ToTensor: x / 255); float input is copied as float32."""
    if x.dtype == torch.uint8:
        return torch.div(x, 255.0)  # one kernel: ToTensor's x.float().div(255)
    return x.float().clone() if x.dtype == torch.float32 else x.float()


# ----------------------------------------------------------------------------------------------
# Batched random resized crop and flip (for images held in memory)
# ----------------------------------------------------------------------------------------------


def fallback_crop_size(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(w, h) of RandomResizedCrop.get_params' fallback box, taken when no sampled box fits: the
    whole image, cut to the nearest allowed aspect ratio (centred by the caller)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for `n` images of one size, vectorised.

    Up to `attempts` (area fraction, log aspect ratio) pairs per sample, the first that fits
    wins; none fits -> the central crop clamped to `ratio`. Returns N x 4 long (top, left, h, w).
    """
    g = generator
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=g, dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, attempts, generator=g, dtype=torch.float64))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # index of the first fitting attempt
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = ok.any(dim=1)
    fw, fh = fallback_crop_size(width, height, ratio)
    w = torch.where(found, w, float(fw))
    h = torch.where(found, h, float(fh))
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.minimum(torch.floor(u[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic filter (Keys' cubic convolution with a = -0.5, support 2)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                   interpolation: str = "bilinear") -> torch.Tensor:
    """Antialiased resampling of the windows [start, start + length) of a line of `in_size`
    pixels to `out_size` pixels, one matrix per sample: N x out_size x in_size.

    The filter - bilinear's triangle (support 1) or Pillow's bicubic (a = -0.5, support 2) - is
    stretched by the downscaling factor and renormalised over the window, as Pillow's resize
    (and torch's antialias=True) after a crop.
    """
    start = start.double().view(-1, 1, 1)
    length = length.double().view(-1, 1, 1)
    scale = length / out_size
    support = torch.clamp(scale, min=1.0)
    centre = start + (torch.arange(out_size, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale  # N x out x 1
    pix = torch.arange(in_size, dtype=torch.float64).view(1, 1, -1) + 0.5  # 1 x 1 x in
    if interpolation == "bilinear":
        w = torch.clamp(1.0 - (pix - centre).abs() / support, min=0.0)
    elif interpolation == "bicubic":
        w = _bicubic((pix - centre) / support)
    else:
        raise ValueError(f"unknown interpolation '{interpolation}'; valid: bilinear, bicubic")
    w = w * ((pix > start) & (pix < start + length))
    return (w / w.sum(dim=2, keepdim=True)).float()


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Crop each image to its box, resize to size x size (antialiased bilinear or bicubic) and
    optionally mirror it, in two batched matrix products.

    Bicubic overshoots: as Pillow, which rounds to uint8 between its passes, each pass is
    clipped to [0, 1], and the passes run in Pillow's order for each crop (`vertical_first`).

    images: N x C x H x W (uint8 or float); boxes: N x 4 (top, left, h, w); flip: N bool.
    Returns N x C x size x size float32 in the input's scale (uint8 input -> [0, 1]).
    """
    n, c, h, w = images.shape
    boxes = boxes.cpu()
    wy = resize_weights(boxes[:, 0], boxes[:, 2], h, size, interpolation)  # N x S x H
    wx = resize_weights(boxes[:, 1], boxes[:, 3], w, size, interpolation)  # N x S x W
    if flip is not None:
        wx = torch.where(flip.cpu().view(-1, 1, 1), wx.flip(1), wx)
    wy, wx = host_to(wy, images.device), host_to(wx, images.device)
    x = to_unit_float(images) if images.dtype == torch.uint8 else images.float()
    if interpolation == "bilinear":  # never leaves [0, 1]: no clipping, one order
        x = torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))  # N x C x H x S
        return torch.matmul(wy.unsqueeze(1), x)  # N x C x S x S

    def horizontal(x, wx):  # N x C x H' x W -> N x C x H' x S
        return torch.matmul(x, wx.transpose(1, 2).unsqueeze(1)).clamp_(0.0, 1.0)

    def vertical(x, wy):  # N x C x H x W' -> N x C x S x W'
        return torch.matmul(wy.unsqueeze(1), x).clamp_(0.0, 1.0)

    v_first = vertical_first(boxes[:, 2], boxes[:, 3], size)
    if not v_first.any():
        return vertical(horizontal(x, wx), wy)
    if v_first.all():
        return horizontal(vertical(x, wy), wx)
    out = x.new_empty((n, c, size, size))
    for first_v in (False, True):
        idx = host_to(torch.nonzero(v_first == first_v).squeeze(1), x.device)
        xs, ys, part = wx[idx], wy[idx], x[idx]
        out[idx] = horizontal(vertical(part, ys), xs) if first_v else vertical(horizontal(part, xs), ys)
    return out
