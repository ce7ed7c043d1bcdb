"""The device half of the split loader: batched augmentation with per-sample random parameters.

The reference pipeline (`selfsup.data.augmentations`) does everything per image in the loading workers,
as facebookresearch/moco does. The batched backend splits that work in two:

* the workers (`selfsup.data.crops`) decode each image once, cut every view's random resized crop
  from it, flip them and hand over uint8 views - 4x fewer bytes to copy than float32;
* this module turns a batch of such views into the model's input on the training device:
  ColorJitter (brightness, contrast, saturation and an exact HSV hue shift, in a random order
  per sample), grayscale, Gaussian blur, solarize and normalisation, in the requested dtype and
  memory format.

For small datasets held in memory (`selfsup.data.inmemory`) the crop and flip run batched on the
device too (`ViewsAugment.forward_from_images`, with selfsup.data.crops's batched geometry), so
nothing per image is left on the CPU.

Every operation reproduces the tensor formulas of torchvision's `transforms.functional`
(the same blends, grayscale weights and HSV round trip), and the blur reproduces what the
reference pipeline really runs: Pillow's `GaussianBlur`, three extended box filters per axis
(Gwosdek et al., "Theoretical foundations of Gaussian convolution by extended box filtering",
SSVM 2011). Differences to the PIL reference are uint8 rounding between Pillow's steps and
Pillow's 8-bit HSV; docs/PERFORMANCE.md lists them and tests/test_augment.py measures them.

All random parameters come from an explicit CPU `torch.Generator` (see `selfsup.rng.augment_generator`), so
the parameters of a step are a function of (seed, epoch, step, rank) and identical on a CPU and a
GPU; they are tiny and move to the device with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .augmentations import IMAGENET_MEAN, IMAGENET_STD, Preset, ViewSpec
from .crops import host_to, resized_crop, sample_crop_boxes, to_unit_float

# torchvision's rgb_to_grayscale on tensors (ITU-R 601-2 luma, as Pillow's "L" conversion up to
# Pillow's 16-bit fixed point: 0.299, 0.587, 0.114).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Pillow's ImageOps.solarize(threshold=128) inverts uint8 values >= 128.
SOLARIZE_THRESHOLD = 128 / 255
# ColorJitter's operations, in torchvision's numbering (the random order is a permutation of these).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# On a CPU the batch is processed in chunks of about this many bytes of float32 pixels, so the
# intermediate tensors of the ~40 elementwise steps stay in cache.
CPU_CHUNK_BYTES = 6 << 20


# ----------------------------------------------------------------------------------------------
# Per-sample parameters
# ----------------------------------------------------------------------------------------------


@dataclass
class ViewParams:
    """The random parameters of one view for a batch of N samples (CPU tensors of length N).

    `order[i]` is the permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE) in which sample i
    applies ColorJitter; `factors[i]` holds its brightness, contrast and saturation factors and
    its hue shift (in turns), as torchvision's ColorJitter.get_params draws them.
    """

    jitter: torch.Tensor  # N bool
    order: torch.Tensor  # N x 4 long
    factors: torch.Tensor  # N x 4 float32
    grayscale: torch.Tensor  # N bool
    blur: torch.Tensor  # N bool
    sigma: torch.Tensor  # N float32
    solarize: torch.Tensor  # N bool

    def __len__(self) -> int:
        return self.jitter.shape[0]

    def slice(self, start: int, stop: int) -> "ViewParams":
        return ViewParams(**{k: v[start:stop] for k, v in self.__dict__.items()})

    def take(self, index: torch.Tensor) -> "ViewParams":
        return ViewParams(**{k: v[index] for k, v in self.__dict__.items()})


def _ranges(spec: ViewSpec) -> list[tuple[float, float] | None]:
    """ColorJitter's factor ranges, None for an operation it leaves out (torchvision: a strength
    of 0 skips the operation)."""
    b, c, s, h = spec.jitter
    out: list[tuple[float, float] | None] = [
        (max(0.0, 1.0 - v), 1.0 + v) if v > 0 else None for v in (b, c, s)
    ]
    out.append((-h, h) if h > 0 else None)
    return out


def sample_view_params(spec: ViewSpec, n: int, generator: torch.Generator) -> ViewParams:
    """Draw the parameters of `n` samples of one view: the distribution of `spec.to_torchvision`.

    Every value is drawn for every sample (whether used or not) in a fixed sequence, so the
    stream of a generator does not depend on earlier outcomes.
    """
    g = generator
    jitter = torch.rand(n, generator=g) < spec.jitter_p
    order = torch.rand(n, 4, generator=g).argsort(dim=1)  # uniform random permutations
    u = torch.rand(n, 4, generator=g)
    factors = torch.empty(n, 4)
    for k, rng in enumerate(_ranges(spec)):
        lo, hi = rng if rng is not None else ((0.0, 0.0) if k == HUE else (1.0, 1.0))
        factors[:, k] = lo + (hi - lo) * u[:, k]
    grayscale = torch.rand(n, generator=g) < spec.grayscale_p
    blur = torch.rand(n, generator=g) < spec.blur_p
    lo, hi = spec.blur_sigma
    sigma = lo + (hi - lo) * torch.rand(n, generator=g)
    solarize = torch.rand(n, generator=g) < spec.solarize_p
    return ViewParams(jitter, order, factors, grayscale, blur, sigma, solarize)


# ----------------------------------------------------------------------------------------------
# Batched functional operations. x: N x 3 x H x W float in [0, 1]; factors: N (on x.device).
# The trailing-underscore versions work in place and return x.
# ----------------------------------------------------------------------------------------------


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A vector of N per-sample values (any device), shaped to broadcast over N x ... x."""
    return host_to(v.to(x.dtype), x.device).view(-1, *([1] * (x.dim() - 1)))


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W -> N x 1 x H x W luma, torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: clamp(f * x)."""
    return x.mul_(_per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean luma of each image: clamp(f * x + (1 - f) * mean(gray(x)))."""
    f = _per_sample(factor, x)
    w = host_to(torch.tensor(GRAY_WEIGHTS, dtype=x.dtype), x.device)
    mean = (x.mean(dim=(2, 3)) @ w).view(-1, 1, 1, 1)  # N x 1 x 1 x 1
    return x.mul_(f).add_((1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's own luma: clamp(f * x + (1 - f) * gray(x))."""
    f = _per_sample(factor, x)
    gray = rgb_to_gray(x).mul_(1.0 - f)
    return x.mul_(f).add_(gray).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) through an exact RGB -> HSV -> RGB trip.

    Same result as torchvision's tensor `adjust_hue` (which follows Pillow's HSV conversion), in
    ~35 in-place elementwise steps instead of ~100: value (max) and chroma (max - min) are kept,
    the hue in sextants H is the piecewise formula of rgb -> hsv, and the output is
    min + chroma * (clamp(|H - 3| - 1), clamp(2 - |H - 2|), clamp(2 - |H - 4|)) - the closed form
    of the six-sector hsv -> rgb table. Branches are selected with 0/1 float masks
    (1 - sign(max - channel)), not torch.where, whose CPU kernel is a slow branchy loop.
    """
    n, _, hgt, wid = x.shape
    r, g, b = x.unbind(1)  # N x H x W views
    ws = x.new_empty((6, n, hgt, wid))  # one allocation for every temporary
    maxc, minc, chroma, mask, num, other = ws.unbind(0)
    torch.maximum(torch.maximum(r, g, out=maxc), b, out=maxc)
    torch.minimum(torch.minimum(r, g, out=minc), b, out=minc)
    torch.sub(maxc, minc, out=chroma)
    # Hue numerators for "max is green" and "max is blue"; ties pick red, then green.
    torch.sub(r, g, out=num).add_(chroma, alpha=4.0)  # blue: 4 + (r - g) / c
    torch.sub(b, r, out=other).add_(chroma, alpha=2.0)  # green: 2 + (b - r) / c
    torch.sub(maxc, g, out=mask).sign_().neg_().add_(1.0)  # 1 where g is the max
    num.add_(other.sub_(num).mul_(mask))
    torch.sub(maxc, r, out=mask).sign_().neg_().add_(1.0)  # 1 where r is the max
    torch.sub(g, b, out=other)  # red: (g - b) / c
    num.add_(other.sub_(num).mul_(mask))
    hue = num.div_(torch.clamp(chroma, min=1e-12, out=other))  # grey pixels: 0 / tiny = 0
    hue.add_(_per_sample(shift, hue).mul(6.0))
    hue.sub_(torch.mul(hue, 1.0 / 6.0, out=mask).floor_(), alpha=6.0)  # in [0, 6]
    out = torch.empty_like(x)
    torch.sub(hue, 3.0, out=mask).abs_().sub_(1.0).clamp_(0.0, 1.0)
    torch.addcmul(minc, chroma, mask, out=out[:, 0])
    torch.sub(hue, 2.0, out=mask).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    torch.addcmul(minc, chroma, mask, out=out[:, 1])
    torch.sub(hue, 4.0, out=mask).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    torch.addcmul(minc, chroma, mask, out=out[:, 2])
    return out


def solarize_(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert the values at or above `threshold` (Pillow's solarize at 128 of 255), in place:
    |x - m| with m = floor(x - threshold) + 1, which is 1 exactly where x >= threshold (for x in
    [0, 1] and a threshold near 1/2), without torch.where's slow CPU kernel."""
    m = torch.sub(x, threshold).floor_().add_(1.0)
    return x.sub_(m).abs_()


def pil_blur_radius(sigma: torch.Tensor, passes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's GaussianBlur(radius=sigma) as `passes` extended box filters: per sample the
    integer box radius l and the weights (centre, far) of one pass, as fractions of 1.

    The box of radius l + a (0 <= a < 1) has variance sigma^2 / passes (Gwosdek et al. 2011,
    eqs. 7, 11, 14); Pillow weighs its 2l + 1 inner taps by ww / 2^24 and the two outer taps by
    fw / 2^24 in fixed point, reproduced here exactly.
    """
    s2 = sigma.double() ** 2 / passes
    length = torch.sqrt(12.0 * s2 + 1.0)
    l = torch.floor((length - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    radius = l + a
    one = float(1 << 24)
    ww = torch.floor(one / (2 * radius + 1))
    fw = torch.floor((one - (2 * l + 1) * ww) / 2)
    return l.long(), torch.stack([ww / one, fw / one], dim=1).float()


def _box_passes_(x: torch.Tensor, l: int, centre: torch.Tensor, far: torch.Tensor, dim: int, passes: int) -> None:
    """`passes` extended box filters of integer radius l along `dim` (-1 or -2), in place, with
    Pillow's edge handling (the edge pixel repeated) at every pass. Two padded buffers take
    turns as input and output, so a pass costs 2l + 4 elementwise steps and no allocation."""
    r, size = l + 1, x.shape[dim]
    shape = list(x.shape)
    shape[dim] += 2 * r
    bufs = (x.new_empty(shape), x.new_empty(shape))
    bufs[0].narrow(dim, r, size).copy_(x)
    ratio = far / centre
    for k in range(passes):
        src, dst = bufs[k % 2], bufs[(k + 1) % 2]
        src.narrow(dim, 0, r).copy_(src.narrow(dim, r, 1).expand_as(src.narrow(dim, 0, r)))
        src.narrow(dim, r + size, r).copy_(src.narrow(dim, r + size - 1, 1).expand_as(src.narrow(dim, 0, r)))
        # centre * (sum of the 2l + 1 inner taps) + far * (the two outer taps)
        out = dst.narrow(dim, r, size) if k + 1 < passes else x
        torch.add(src.narrow(dim, 0, size), src.narrow(dim, 2 * r, size), out=out).mul_(ratio)
        for t in range(1, 2 * l + 2):
            out.add_(src.narrow(dim, t, size))
        out.mul_(centre)


def gaussian_blur_pil_(x: torch.Tensor, sigma: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """Blur each sample with its own sigma as Pillow's ImageFilter.GaussianBlur(radius=sigma)
    does - three extended box passes per axis, horizontal first - without Pillow's uint8
    rounding between passes; in place. Separable and O(l) per pixel: never a dense kernel."""
    l, w = pil_blur_radius(sigma.cpu(), passes)

    def blur(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        centre, far = _per_sample(w[idx, 0], rows), _per_sample(w[idx, 1], rows)
        for dim in (-1, -2):
            _box_passes_(rows, int(l[idx[0]]), centre, far, dim, passes)
        return rows

    for value in torch.unique(l).tolist():
        x = _apply(x, l == value, blur)
    return x


# ----------------------------------------------------------------------------------------------
# One view: colour, blur, solarize, normalise
# ----------------------------------------------------------------------------------------------


# Beyond this many runs a subset is written back with index_copy_ rather than slice copies.
MAX_RUNS = 16


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the maximal runs of True in a CPU bool vector."""
    idx = torch.nonzero(mask).squeeze(1).tolist()
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(a, n) for a, n in runs]


def _apply(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """Apply fn(rows, idx) to the samples of x where the CPU bool `mask` holds, and return x.

    fn gets the selected rows and their indices (CPU long) and returns the new rows (it may work
    in place). One contiguous run is worked on as a slice of x; otherwise the rows are gathered,
    processed in one call, and written back - by slice copies on a CPU, where index_copy_ looks
    up an index per element and is slow (BatchAugment sorts a chunk to keep subsets in few runs).
    """
    runs = _runs(mask)
    if not runs:
        return x
    if len(runs) == 1:
        start, length = runs[0]
        rows = x.narrow(0, start, length)
        new = fn(rows, torch.arange(start, start + length))
        if new is not rows:
            rows.copy_(new)
        return x
    idx = torch.nonzero(mask).squeeze(1)
    new = fn(x.index_select(0, host_to(idx, x.device)), idx)
    if x.device.type == "cpu" and len(runs) <= MAX_RUNS:
        k = 0
        for start, length in runs:
            x.narrow(0, start, length).copy_(new.narrow(0, k, length))
            k += length
        return x
    return x.index_copy_(0, host_to(idx, x.device), new)


def _jitter_key(p: ViewParams) -> torch.Tensor:
    """One integer per sample for its ColorJitter order (-1: no jitter); sorting by it puts every
    (slot, operation) subset into few contiguous runs."""
    o = p.order
    key = o[:, 0] * 64 + o[:, 1] * 16 + o[:, 2] * 4 + o[:, 3]
    return torch.where(p.jitter, key, -1)


class BatchAugment(nn.Module):
    """The colour half of one view's augmentation (`ViewSpec`), batched with per-sample random
    parameters: uint8 (or [0, 1] float) N x 3 x H x W in, normalised N x 3 x H x W out.

    The order of operations is that of `ViewSpec.to_torchvision`: ColorJitter with probability
    `jitter_p` (its four operations in a random order per sample) and RandomGrayscale (in
    MoCo v1's order when `grayscale_first`), blur, solarize, then normalisation. Crop and flip
    happen before (in the workers, or in `resized_crop`); flipping commutes with all of these.

    Args:
        spec: the view's augmentation.
        mean, std: normalisation.
        out_dtype: dtype of the output (e.g. torch.bfloat16 under bf16 autocast).
        channels_last: return a channels_last tensor.
        chunk_bytes: process the batch in chunks of about this many float32 bytes (default: the
            whole batch on an accelerator, CPU_CHUNK_BYTES on a CPU, where it keeps the work in
            cache).
    """

    def __init__(
        self,
        spec: ViewSpec,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        out_dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        chunk_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        self.chunk_bytes = chunk_bytes
        self._jitter_ops = [k for k, rng in enumerate(_ranges(spec)) if rng is not None]

    def sample_params(self, n: int, generator: torch.Generator) -> ViewParams:
        return sample_view_params(self.spec, n, generator)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, params: ViewParams | None = None,
        segment: int | None = None,
    ) -> torch.Tensor:
        """images: N x 3 x H x W, uint8 or float in [0, 1]. Draws the parameters from
        `generator` (a CPU generator) unless `params` are given. With `segment`, the batch is
        several views of this spec one after another (`segment` samples each, see ViewsAugment):
        CPU chunks are then cut inside each view, as for the view alone."""
        n, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"BatchAugment takes N x 3 x H x W images; got shape {tuple(images.shape)}")
        if params is None:
            params = self.sample_params(n, generator if generator is not None else torch.default_generator)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((n, c, h, w), dtype=self.out_dtype, device=images.device, memory_format=fmt)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        step = self._chunk_size(images)
        if step <= 0:  # the whole batch at once (an accelerator), every view of it together
            step = segment = max(n, 1)
        segment = segment or max(n, 1)
        chunks = [(start, min(start + step, end)) for first in range(0, n, segment)
                  for end in [min(first + segment, n)] for start in range(first, end, step)]
        for start, stop in chunks:
            p = params.slice(start, stop)
            # Sort the chunk by ColorJitter order: each (slot, operation) subset then falls into
            # few contiguous runs (one at the first slot), worked on as slices or written back
            # with few copies.
            perm = torch.argsort(_jitter_key(p), stable=True)
            x = images[start:stop]
            if bool((perm != torch.arange(len(perm))).any()):
                x = x.index_select(0, host_to(perm, x.device))
                x = self.augment_unit(to_unit_float(x), p.take(perm))
                x = x.index_select(0, host_to(torch.argsort(perm), x.device))
            else:
                x = self.augment_unit(to_unit_float(x), p)
            torch.div(x.sub_(mean), std, out=out[start:stop])  # torchvision's Normalize
        return out

    def _chunk_size(self, images: torch.Tensor) -> int:
        """Samples per chunk; 0: the whole batch in one."""
        n, c, h, w = images.shape
        budget = self.chunk_bytes
        if budget is None:
            budget = CPU_CHUNK_BYTES if images.device.type == "cpu" else 0
        if budget <= 0:
            return 0
        return max(1, budget // (c * h * w * 4))

    def augment_unit(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """The augmentation in [0, 1] before normalisation; x (float) may be modified in place."""
        spec = self.spec
        if spec.jitter_p > 0:
            if spec.grayscale_first:
                x = self._grayscale(x, p)
                x = self._jitter(x, p)
            else:
                x = self._jitter(x, p)
                x = self._grayscale(x, p)
        elif spec.grayscale_p > 0:
            x = self._grayscale(x, p)
        if spec.blur_p > 0:
            x = _apply(x, p.blur, lambda rows, idx: gaussian_blur_pil_(rows, p.sigma[idx]))
        if spec.solarize_p > 0:
            x = _apply(x, p.solarize, lambda rows, idx: solarize_(rows))
        return x

    def _grayscale(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        return _apply(x, p.grayscale, lambda rows, idx: rgb_to_gray(rows).expand_as(rows))

    def _jitter(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        ops = {
            BRIGHTNESS: adjust_brightness_,
            CONTRAST: adjust_contrast_,
            SATURATION: adjust_saturation_,
            HUE: adjust_hue,
        }
        for slot in range(4):
            for op in self._jitter_ops:
                mask = p.jitter & (p.order[:, slot] == op)
                x = _apply(x, mask, lambda rows, idx, op=op: ops[op](rows, p.factors[idx, op]))
        return x

    def extra_repr(self) -> str:
        return f"spec={self.spec}, out_dtype={self.out_dtype}, channels_last={self.channels_last}"


# ----------------------------------------------------------------------------------------------
# Every view of a preset
# ----------------------------------------------------------------------------------------------


class ViewsAugment(nn.Module):
    """A preset's views (`Preset.views`: BYOL's two differ, DINO's are two global crops and
    several local ones of another size) on the device.

    `forward(views, generator)` takes the workers' uint8 batches, one per view (N x 3 x S_v x
    S_v); `forward_from_images` crops and flips images held in memory first. Parameters are
    drawn from `generator` view after view, in the preset's order (for images in memory: a
    view's crop boxes, flips, then colour parameters), so a two-view preset draws what it always
    drew. The views that share a spec (and so a size: MoCo's two, DINO's local crops) are then
    augmented in one BatchAugment call.

    Args:
        preset: the views.
        image_size: the run's image size, for views without a size of their own.
        mean, std, out_dtype, channels_last: as BatchAugment.
    """

    def __init__(
        self,
        preset: Preset,
        image_size: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        out_dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.preset = preset
        self.image_size = image_size
        self.specs = tuple(preset.views)
        self.sizes = preset.sizes(image_size)
        # One BatchAugment per distinct spec; groups[k] lists the views (indices) of augments[k].
        distinct = list(dict.fromkeys(self.specs))
        self.augments = nn.ModuleList([BatchAugment(spec, mean, std, out_dtype, channels_last) for spec in distinct])
        self.groups = [[i for i, v in enumerate(self.specs) if v == spec] for spec in distinct]

    def forward(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if len(views) != len(self.specs):
            raise ValueError(f"preset '{self.preset.name}' has {len(self.specs)} views; got {len(views)} batches")
        params = [sample_view_params(spec, v.shape[0], generator) for spec, v in zip(self.specs, views)]
        return self._colour(views, params)

    def forward_from_images(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """images: N x C x H x W uint8 (C = 1 or 3) -> every view, augmented, at its size."""
        n, c, h, w = images.shape
        draws = []
        for spec in self.specs:
            boxes = sample_crop_boxes(n, h, w, spec.crop_scale, spec.crop_ratio, generator)
            flip = torch.rand(n, generator=generator) < spec.flip_p
            draws.append((boxes, flip, sample_view_params(spec, n, generator)))
        crops = []
        for spec, size, (boxes, flip, _) in zip(self.specs, self.sizes, draws):
            x = resized_crop(images, boxes, size, flip, spec.interpolation)
            if c == 1:  # Pillow's "L" -> "RGB": the same value in every channel
                x = x.expand(n, 3, size, size)
            crops.append(x.contiguous())
        return self._colour(crops, [p for _, _, p in draws])

    def _colour(self, views: list[torch.Tensor], params: list[ViewParams]) -> list[torch.Tensor]:
        """The colour half of every view, one BatchAugment call per group of views with one spec."""
        out: list[torch.Tensor | None] = [None] * len(views)
        for aug, group in zip(self.augments, self.groups):
            if len(group) == 1:
                out[group[0]] = aug(views[group[0]], params=params[group[0]])
                continue
            n = views[group[0]].shape[0]
            batch = torch.cat([views[i] for i in group])
            joined = ViewParams(**{k: torch.cat([getattr(params[i], k) for i in group])
                                   for k in params[group[0]].__dict__})
            for i, part in zip(group, aug(batch, params=joined, segment=n).split(n)):
                out[i] = part
        return out  # type: ignore[return-value]
