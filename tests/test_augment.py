"""The batched device-side augmentation against torchvision's per-image ops and Pillow.

Three kinds of checks:
* per operation, against torchvision's tensor functional ops (the same formulas in float):
  tight tolerances;
* per operation, against Pillow - what the reference pipeline really runs - where the only
  differences are Pillow's uint8 rounding and its 8-bit HSV (bounds documented in
  docs/PERFORMANCE.md);
* the distribution of the random parameters against the presets, and a whole view with the
  sampled parameters against torchvision's per-image ops applied one image at a time.
"""

from __future__ import annotations

import math

import numpy as np
import PIL
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from selfsup.data.augmentations import (AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, ViewSpec, build_multi_crop_transform,
                                        get_preset)
from selfsup.data.batch_augment import (BatchAugment, ViewsAugment, adjust_brightness_, adjust_contrast_, adjust_hue,
                              adjust_saturation_, gaussian_blur_pil_, rgb_to_gray, sample_view_params, solarize_)
from selfsup.data.crops import CropsDataset, resized_crop, sample_crop_box, sample_crop_boxes
from selfsup.rng import augment_generator, seeded


def smooth_images(n: int, h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 N x 3 x H x W images with gradients, flat areas, grey pixels and exact channel ties
    (the cases where hue formulas branch)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = []
    for _ in range(n):
        c0, c1, c2 = torch.rand(3, 3, 1, 1, generator=g)
        img = c0 * (1 - xx) + c1 * xx * yy + c2 * (1 - yy) * 0.5
        img = img + 0.15 * torch.rand(3, h, w, generator=g)
        img = (img.clamp(0, 1) * 255).round()
        img[:, :4, :4] = img[0, :4, :4]  # grey
        img[1, 4:8, :] = img[0, 4:8, :]  # red == green
        img[2, 8:10, :] = img[0, 8:10, :]  # red == blue
        out.append(img)
    return torch.stack(out).to(torch.uint8)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


# ---------------------------------------------------------------------------------------------- per op


def test_colour_ops_match_torchvision_tensor_ops_per_sample():
    x = unit(smooth_images(6))
    g = torch.Generator().manual_seed(1)
    f = 0.2 + 1.6 * torch.rand(6, generator=g)
    h = torch.rand(6, generator=g) - 0.5
    h[0], h[1] = -0.5, 0.5
    per_image = {
        "brightness": (adjust_brightness_, TF.adjust_brightness, f),
        "contrast": (adjust_contrast_, TF.adjust_contrast, f),
        "saturation": (adjust_saturation_, TF.adjust_saturation, f),
        "hue": (adjust_hue, TF.adjust_hue, h),
    }
    for name, (ours, theirs, factor) in per_image.items():
        expected = torch.stack([theirs(x[i], float(factor[i])) for i in range(6)])
        torch.testing.assert_close(ours(x.clone(), factor), expected, atol=3e-6, rtol=0, msg=name)
    expected = torch.stack([TF.rgb_to_grayscale(x[i], 3) for i in range(6)])
    torch.testing.assert_close(rgb_to_gray(x).expand_as(x), expected, atol=1e-6, rtol=0)


def test_colour_ops_match_pillow_up_to_its_uint8_rounding():
    """The reference pipeline runs Pillow on uint8 images; ours is the unrounded float result."""
    x8 = smooth_images(4, 40, 48, seed=3)
    rng = np.random.default_rng(0)
    bounds = {  # (max, mean) absolute difference in levels of 255
        "brightness": (1.0 + 1e-4, 0.6),  # Pillow truncates after the blend
        "contrast": (1.5, 0.7),  # ... and rounds the mean luma to an integer
        "saturation": (1.5, 0.7),
    }
    ops = {"brightness": (adjust_brightness_, TF.adjust_brightness), "contrast": (adjust_contrast_, TF.adjust_contrast),
           "saturation": (adjust_saturation_, TF.adjust_saturation)}
    for name, (ours, pil_op) in ops.items():
        for i in range(4):
            factor = float(rng.uniform(0.2, 1.8))
            expected = from_pil(pil_op(to_pil(x8[i]), factor))
            d = (ours(unit(x8[i : i + 1]), torch.tensor([factor]))[0] * 255 - expected).abs()
            assert d.max() <= bounds[name][0] and d.mean() <= bounds[name][1], (name, factor, d.max(), d.mean())
    gray = rgb_to_gray(unit(x8))[:, 0] * 255
    pil_gray = torch.stack([torch.from_numpy(np.array(to_pil(img).convert("L"))).float() for img in x8])
    assert (gray - pil_gray).abs().max() <= 0.6  # Pillow rounds 0.299/0.587/0.114 in 16-bit fixed point
    # Hue: Pillow stores H as floor(255 h) and shifts it by int(255 shift), each up to 1/255 of a
    # turn off; a hue error of e turns moves a channel by up to 6 e chroma. S and V are 8-bit too.
    for i in range(4):
        shift = float(rng.uniform(-0.5, 0.5))
        x = unit(x8[i : i + 1])
        d = (adjust_hue(x, torch.tensor([shift]))[0] * 255 - from_pil(TF.adjust_hue(to_pil(x8[i]), shift))).abs()
        chroma = (x.amax(dim=1) - x.amin(dim=1))[0] * 255
        assert (d <= 6 * (2 / 255) * chroma + 2).all() and d.mean() <= 1.5, (shift, d.max(), d.mean())


def test_solarize_matches_pillow_on_every_uint8_value():
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    expected = from_pil(ImageOps.solarize(to_pil(values[0]), 128))
    torch.testing.assert_close(solarize_(unit(values))[0] * 255, expected, atol=1e-4, rtol=0)


def pil_box_blur_reference(a: np.ndarray, sigma: float, rounding: bool) -> np.ndarray:
    """Pillow's GaussianBlur written out naively: per pixel, per pass, with the edge pixel
    repeated; `rounding` reproduces Pillow's uint8 result, otherwise float. a: H x W x C."""
    f32 = np.float32
    s2 = f32(f32(sigma) * f32(sigma) / f32(3))
    length = f32(math.sqrt(12.0 * float(s2) + 1.0))
    l = f32(math.floor((float(length) - 1.0) / 2.0))
    frac = f32(f32(2 * l + 1) * f32(l * (l + 1) - f32(3) * s2))
    frac = f32(frac / f32(f32(6) * f32(s2 - (l + 1) * (l + 1))))
    radius = f32(l + frac)
    ww = int(f32(16777216) / f32(radius * f32(2) + f32(1)))
    li = int(l)
    fw = (16777216 - (2 * li + 1) * ww) // 2

    def one_pass(v: np.ndarray) -> np.ndarray:  # along axis 1
        n = v.shape[1]
        out = np.empty(v.shape, dtype=np.int64 if rounding else np.float64)
        for x in range(n):
            inner = sum(v[:, min(max(x + t, 0), n - 1)] for t in range(-li, li + 1))
            outer = v[:, max(x - li - 1, 0)] + v[:, min(x + li + 1, n - 1)]
            acc = inner * ww + outer * fw
            out[:, x] = (acc + (1 << 23)) >> 24 if rounding else acc / 16777216
        return out

    v = a.astype(np.int64 if rounding else np.float64)
    for _ in range(3):
        v = one_pass(v)
    v = v.transpose(1, 0, 2)
    for _ in range(3):
        v = one_pass(v)
    return v.transpose(1, 0, 2)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.5, 2.0, 3.3])
def test_blur_is_pillows_box_cascade_without_its_rounding(sigma):
    x8 = smooth_images(1, 13, 17, seed=int(sigma * 10))[0]
    a = x8.permute(1, 2, 0).numpy()
    # The naive reference with rounding is Pillow itself...
    pil = np.asarray(to_pil(x8).filter(ImageFilter.GaussianBlur(sigma)))
    np.testing.assert_array_equal(pil_box_blur_reference(a, sigma, rounding=True), pil)
    # ... and ours is the same cascade without the rounding.
    ours = gaussian_blur_pil_(unit(x8[None]), torch.tensor([sigma]))[0].permute(1, 2, 0).numpy() * 255
    np.testing.assert_allclose(ours, pil_box_blur_reference(a, sigma, rounding=False), atol=2e-3, rtol=0)
    assert np.abs(ours - pil).max() <= 3.0 and np.abs(ours - pil).mean() <= 1.0


def test_blur_uses_each_samples_own_sigma():
    x = unit(smooth_images(5))
    sigma = torch.tensor([0.1, 2.0, 1.2, 1.9, 0.5])
    batched = gaussian_blur_pil_(x.clone(), sigma)
    for i in range(5):
        torch.testing.assert_close(batched[i], gaussian_blur_pil_(x[i : i + 1].clone(), sigma[i : i + 1])[0])


# ---------------------------------------------------------------------------------------------- whole views


def torchvision_view(img: torch.Tensor, spec: ViewSpec, p, i: int) -> torch.Tensor:
    """One image through torchvision's per-image functional ops with sample i's parameters, in
    the order of ViewSpec.to_torchvision."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]

    def jitter(x):
        if p.jitter[i]:
            for op in p.order[i].tolist():
                if spec.jitter[op] > 0:
                    x = ops[op](x, float(p.factors[i, op]))
        return x

    def gray(x):
        return TF.rgb_to_grayscale(x, 3) if p.grayscale[i] else x

    x = img
    if spec.jitter_p > 0:
        x = jitter(gray(x)) if spec.grayscale_first else gray(jitter(x))
    elif spec.grayscale_p > 0:
        x = gray(x)
    if spec.blur_p > 0 and p.blur[i]:
        a = pil_box_blur_reference(x.permute(1, 2, 0).double().numpy(), float(p.sigma[i]), rounding=False)
        x = torch.from_numpy(a).permute(2, 0, 1).float()
    if spec.solarize_p > 0 and p.solarize[i]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("preset", ["moco_v1", "moco_v2", "byol", "simclr"])
def test_whole_view_matches_torchvision_per_image_with_the_same_parameters(preset):
    x8 = smooth_images(12, 14, 18, seed=7)
    for spec in set(get_preset(preset, 224).views):
        aug = BatchAugment(spec, chunk_bytes=4 * 3 * 14 * 18 * 4)  # chunks of 4: several sorts
        p = aug.sample_params(12, torch.Generator().manual_seed(3))
        p.jitter[:3] = True  # make sure every branch is exercised
        p.grayscale[3], p.blur[4:6], p.solarize[6:8] = True, True, True
        ours = aug(x8, params=p)
        expected = torch.stack([torchvision_view(unit(x8[i]), spec, p, i) for i in range(12)])
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)


def test_output_dtype_memory_format_and_chunking():
    x8 = smooth_images(9)
    spec = AUGMENTATIONS["byol"].views[1]
    p = sample_view_params(spec, 9, torch.Generator().manual_seed(0))
    whole = BatchAugment(spec, chunk_bytes=0)(x8, params=p)
    chunked = BatchAugment(spec, chunk_bytes=2 * 3 * 24 * 32 * 4)(x8, params=p)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    fast = BatchAugment(spec, out_dtype=torch.bfloat16, channels_last=True)(x8, params=p)
    assert fast.dtype == torch.bfloat16 and fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, whole.to(torch.bfloat16))


def test_same_step_same_views_other_step_other_views():
    x8 = smooth_images(4)
    aug = ViewsAugment(AUGMENTATIONS["moco_v2"], 24)
    a = aug([x8, x8], augment_generator(0, 1, 2, 0))
    b = aug([x8, x8], augment_generator(0, 1, 2, 0))
    c = aug([x8, x8], augment_generator(0, 1, 3, 0))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------------------------------------- statistics


def binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("preset", list(AUGMENTATIONS))
def test_parameter_distributions_match_the_preset(preset):
    n = 20000
    for spec in dict.fromkeys(AUGMENTATIONS[preset].views):  # each distinct view
        p = sample_view_params(spec, n, torch.Generator().manual_seed(11))
        for flag, prob in ((p.jitter, spec.jitter_p), (p.grayscale, spec.grayscale_p), (p.blur, spec.blur_p),
                           (p.solarize, spec.solarize_p)):
            assert binomial_ok(int(flag.sum()), n, prob), (preset, prob, int(flag.sum()))
        for k, strength in enumerate(spec.jitter):
            lo, hi = (-strength, strength) if k == 3 else (max(0.0, 1 - strength), 1 + strength)
            f = p.factors[:, k]
            assert lo <= f.min() and f.max() <= hi
            assert f.min() - lo < 0.01 * (hi - lo) + 1e-9 and hi - f.max() < 0.01 * (hi - lo) + 1e-9
            assert abs(f.mean() - (lo + hi) / 2) < 0.02 * (hi - lo) + 1e-9  # uniform
        assert spec.blur_sigma[0] <= p.sigma.min() and p.sigma.max() <= spec.blur_sigma[1]
        # Every one of the 24 orders of ColorJitter's operations, equally often.
        key = p.order @ torch.tensor([64, 16, 4, 1])
        counts = torch.unique(key, return_counts=True)[1]
        assert len(counts) == 24 and all(binomial_ok(int(c), n, 1 / 24) for c in counts)


def test_applied_augmentation_frequencies():
    """What the images show: grey outputs, changed brightness, solarized pixels."""
    n = 2000
    colour = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    colour[:, 0], colour[:, 1], colour[:, 2] = 200, 60, 30
    g = torch.Generator().manual_seed(5)
    gray_only = ViewSpec(jitter_p=0.0, grayscale_p=0.2, blur_p=0.0)
    out = BatchAugment(gray_only, mean=(0, 0, 0), std=(1, 1, 1))(colour, g)
    is_gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2))
    assert binomial_ok(int(is_gray.sum()), n, 0.2)
    bright = ViewSpec(jitter=(0.4, 0, 0, 0), jitter_p=0.8, grayscale_p=0.0, blur_p=0.0)
    out = BatchAugment(bright, mean=(0, 0, 0), std=(1, 1, 1))(torch.full((n, 3, 2, 2), 100, dtype=torch.uint8), g)
    factor = out[:, 0, 0, 0] * 255 / 100
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
    assert binomial_ok(int((factor != 1).sum()), n, 0.8)
    sol = ViewSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.2)
    out = BatchAugment(sol, mean=(0, 0, 0), std=(1, 1, 1))(colour, g)
    assert binomial_ok(int((out[:, 0, 0, 0] * 255 < 100).sum()), n, 0.2)  # 200 -> 55


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), grid, side="right") / len(s)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def box_features(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(float)
    return {"area": h * w / (height * width), "log_aspect": np.log(w / h),
            "cy": (top + h / 2) / height, "cx": (left + w / 2) / width}


@pytest.mark.parametrize("size", [(375, 500), (32, 32), (20, 200)])
def test_crop_boxes_follow_torchvision_get_params(size):
    height, width = size
    n = 3000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    img = torch.empty(1, height, width)
    with seeded(0):
        ref = np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])
    batched = sample_crop_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(0)).numpy()
    import random

    rng = random.Random(0)
    per_image = np.array([sample_crop_box(rng, height, width, scale, ratio) for _ in range(n)])
    for ours in (batched, per_image):
        assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
        assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
        fr, fo = box_features(ref, height, width), box_features(ours, height, width)
        for k in fr:
            assert ks_distance(fr[k], fo[k]) < 0.06, (size, k, ks_distance(fr[k], fo[k]))


def test_resized_crop_is_antialiased_bilinear_of_the_crop():
    x8 = smooth_images(5, 30, 40, seed=2)
    boxes = torch.tensor([[0, 0, 30, 40], [3, 5, 11, 7], [10, 2, 20, 37], [0, 0, 1, 1], [29, 39, 1, 1]])
    flip = torch.tensor([False, True, False, True, False])
    ours = resized_crop(x8, boxes, 16, flip)
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        crop = unit(x8[i : i + 1, :, t : t + h, l : l + w])
        ref = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        ref = ref.flip(-1) if flip[i] else ref
        torch.testing.assert_close(ours[i : i + 1], ref, atol=2e-6, rtol=0)
        pil = to_pil(x8[i]).crop((l, t, l + w, t + h)).resize((16, 16), Image.BILINEAR)
        pil = from_pil(pil.transpose(Image.FLIP_LEFT_RIGHT) if flip[i] else pil)
        assert (ours[i] * 255 - pil).abs().max() <= 1.0  # Pillow rounds to uint8


def test_gathered_subsets_give_the_same_views_as_slices(monkeypatch):
    """Subsets in many runs are gathered and scattered (always, on a GPU); same numbers."""
    import selfsup.data.batch_augment as augment

    x8 = smooth_images(10)
    spec = AUGMENTATIONS["byol"].views[0]
    p = sample_view_params(spec, 10, torch.Generator().manual_seed(2))
    sliced = BatchAugment(spec)(x8, params=p)
    monkeypatch.setattr(augment, "MAX_RUNS", 0)  # write back with index_copy_
    # Report every subset as at least two runs, so that none is worked on as a slice.
    monkeypatch.setattr(augment, "_runs", lambda mask: [(int(i), 1) for i in torch.nonzero(mask).squeeze(1)] * 2)
    gathered = BatchAugment(spec)(x8, params=p)
    torch.testing.assert_close(gathered, sliced, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- bicubic resize

# Pillow 13 resizes vertically first when the height shrinks by more than twice as many pixels as
# the width (python-pillow/Pillow#9549); earlier versions always resize horizontally first.
PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def pil_filter(interpolation: str):
    """Pillow's filters (Resample.c): (function, support)."""
    def bilinear(x):
        x = abs(x)
        return 1.0 - x if x < 1.0 else 0.0

    def bicubic(x, a=-0.5):
        x = abs(x)
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    return {"bilinear": (bilinear, 1.0), "bicubic": (bicubic, 2.0)}[interpolation]


def pil_coefficients(in_size: int, out_size: int, interpolation: str, fixed_point: bool) -> np.ndarray:
    """Pillow's precompute_coeffs as an out x in matrix, normalised over the window; with
    `fixed_point`, as normalize_coeffs_8bpc rounds them (22 fractional bits)."""
    filt, support = pil_filter(interpolation)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    m = np.zeros((out_size, in_size))
    for xx in range(out_size):
        centre = (xx + 0.5) * scale
        xmin, xmax = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        k = [filt((x - centre + 0.5) * (1.0 / filterscale)) for x in range(xmin, xmax)]
        ww = sum(k)
        m[xx, xmin:xmax] = [v / ww for v in k] if ww != 0.0 else k
    if fixed_point:
        m = np.where(m < 0, np.trunc(-0.5 + m * (1 << 22)), np.trunc(0.5 + m * (1 << 22)))
    return m


def pil_resize_reference(a: np.ndarray, size: int, interpolation: str, rounding: bool) -> np.ndarray:
    """Pillow's resize of an H x W x C uint8 image to size x size written out: two separable
    passes (a pass only where the size changes), in Pillow's order, each clipped to 0..255;
    `rounding` reproduces Pillow's fixed point and its uint8 result after each pass, otherwise
    the same in float, clipped but not rounded."""
    h, w = a.shape[:2]
    wy = pil_coefficients(h, size, interpolation, rounding)
    wx = pil_coefficients(w, size, interpolation, rounding)

    def apply(m, v, axis):
        if m.shape[0] == m.shape[1]:  # Pillow skips a pass that keeps the size
            return v
        out = np.einsum("oi,hic->hoc", m, v) if axis == 1 else np.einsum("oi,iwc->owc", m, v)
        if rounding:
            out = np.floor((out + (1 << 21)) / (1 << 22))
        return np.clip(out, 0, 255)

    v = a.astype(np.int64 if rounding else np.float64)
    if PILLOW_VERTICAL_FIRST and h > size and h - size > 2 * (w - size):
        return apply(wx, apply(wy, v, 0), 1)
    return apply(wy, apply(wx, v, 1), 0)


# (top, left, h, w) on a 60 x 70 image and the output size: shrinking, enlarging, both at once,
# vertical-first cases, a side that keeps its size, one-pixel crops.
RESIZE_CASES = [((0, 0, 60, 70), 24), ((3, 5, 44, 8), 16), ((10, 2, 8, 44), 16), ((7, 30, 34, 22), 32),
                ((20, 20, 5, 7), 32), ((0, 0, 1, 1), 8), ((30, 40, 20, 16), 16), ((1, 3, 16, 30), 16),
                ((0, 61, 60, 9), 24), ((12, 9, 40, 31), 16)]


def noise_image(h: int, w: int, seed: int) -> np.ndarray:
    """Uniform noise: the strongest bicubic overshoot, where Pillow's clipping between passes shows."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_resize_rewrite_is_pillow_bit_for_bit(interpolation):
    pil_mode = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    for i, ((t, l, h, w), size) in enumerate(RESIZE_CASES):
        for a in (noise_image(60, 70, i), smooth_images(1, 60, 70, seed=i)[0].permute(1, 2, 0).numpy()):
            pil = np.asarray(Image.fromarray(a).crop((l, t, l + w, t + h)).resize((size, size), pil_mode))
            ours = pil_resize_reference(a[t : t + h, l : l + w], size, interpolation, rounding=True)
            np.testing.assert_array_equal(ours, pil, err_msg=f"{(t, l, h, w)} -> {size}")


def test_batched_bicubic_resize_is_pillows_filter_without_its_rounding():
    """The memory backend's bicubic crops (DINO's): Pillow's filter in float, clipped after each
    pass in Pillow's order; from Pillow itself only by its uint8 rounding."""
    for seed in range(2):
        a = noise_image(60, 70, seed) if seed == 0 else smooth_images(1, 60, 70, seed=4)[0].permute(1, 2, 0).numpy()
        x8 = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)
        for k, ((t, l, h, w), size) in enumerate(RESIZE_CASES):
            flip = bool(k % 2)
            ours = resized_crop(x8, torch.tensor([[t, l, h, w]]), size, torch.tensor([flip]), "bicubic")[0]
            ours = (ours * 255).permute(1, 2, 0).numpy()
            ref = pil_resize_reference(a[t : t + h, l : l + w], size, "bicubic", rounding=False)
            ref = ref[:, ::-1] if flip else ref
            np.testing.assert_allclose(ours, ref, atol=5e-3, rtol=0, err_msg=f"{(t, l, h, w)} -> {size}")
            pil = Image.fromarray(a).crop((l, t, l + w, t + h)).resize((size, size), Image.BICUBIC)
            pil = np.asarray(pil.transpose(Image.FLIP_LEFT_RIGHT) if flip else pil).astype(np.float64)
            d = np.abs(ours - pil)
            assert d.max() <= 1.5 and d.mean() <= 0.5, ((t, l, h, w), size, d.max(), d.mean())
    # A batch with both pass orders gives each crop its own.
    x8 = torch.from_numpy(noise_image(60, 70, 5)).permute(2, 0, 1).unsqueeze(0).expand(3, 3, 60, 70)
    boxes = torch.tensor([[3, 5, 44, 8], [10, 2, 8, 44], [7, 30, 34, 22]])
    together = resized_crop(x8, boxes, 16, interpolation="bicubic")
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], resized_crop(x8[:1], boxes[i : i + 1], 16, interpolation="bicubic"),
                                   atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- DINO's views


def test_dino_preset_is_dinos_data_augmentation():
    """facebookresearch/dino main_dino.py DataAugmentationDINO with its defaults
    (--global_crops_scale 0.4 1, --local_crops_number 8, --local_crops_scale 0.05 0.4), written out."""
    preset = get_preset("dino", 224)
    common = {"crop_ratio": (3 / 4, 4 / 3), "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "grayscale_p": 0.2,
              "blur_sigma": (0.1, 2.0), "flip_p": 0.5, "grayscale_first": False, "interpolation": "bicubic"}
    expected = ([{"crop_scale": (0.4, 1.0), "blur_p": 1.0, "solarize_p": 0.0},  # global_transfo1
                 {"crop_scale": (0.4, 1.0), "blur_p": 0.1, "solarize_p": 0.2}]  # global_transfo2
                + [{"crop_scale": (0.05, 0.4), "blur_p": 0.5, "solarize_p": 0.0}] * 8)  # local_transfo
    assert len(preset.views) == 10 and preset.sizes(224) == (224, 224) + (96,) * 8
    for i, (view, want) in enumerate(zip(preset.views, expected)):
        for key, value in {**common, **want}.items():
            assert getattr(view, key) == pytest.approx(value), (i, key)
    # The reference pipeline: a bicubic RandomResizedCrop of each view's size and scale.
    crops = [t.transforms[0] for t in build_multi_crop_transform(preset, 224).transforms]
    assert [c.size for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 8
    assert all(c.interpolation == T.InterpolationMode.BICUBIC for c in crops)
    assert [tuple(c.scale) for c in crops] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8
    # Its run options; the small-image rule goes by the run's image size, not by a view's.
    custom = get_preset("dino", 224, local_crops_number=2, local_size=64, global_scale=(0.3, 1.0), local_scale=(0.1, 0.3))
    assert custom.sizes(224) == (224, 224, 64, 64)
    assert [v.crop_scale for v in custom.views] == [(0.3, 1.0)] * 2 + [(0.1, 0.3)] * 2
    assert [v.blur_p for v in custom.views] == [1.0, 0.1, 0.5, 0.5]  # 64-px locals of a 224-px run blur (p 0.5)
    assert get_preset("dino", 32).sizes(32) == (32, 32) + (16,) * 8  # 96 / 224 of the image size, to 8 px
    assert all(v.blur_p == 0.0 for v in get_preset("dino", 32).views)
    # At 128 px the run is no small-image recipe: its 56-px local crops blur as DINO's (p 0.5)
    mid = get_preset("dino", 128)
    assert mid.sizes(128) == (128, 128) + (56,) * 8 and [v.blur_p for v in mid.views] == [1.0, 0.1] + [0.5] * 8
    assert len(get_preset("dino", 224, local_crops_number=0).views) == 2
    with pytest.raises(ValueError, match="dino preset only"):
        get_preset("moco_v2", 224, local_crops_number=2)
    with pytest.raises(ValueError, match="local_scale"):
        get_preset("dino", 224, local_scale=(0.5, 0.2))


@pytest.mark.parametrize("path", ["per image", "batched"])
def test_each_dino_view_crops_with_its_own_scale(path, monkeypatch):
    """Global crops cover 40-100% of the image, local ones 5-40%: each view's boxes follow
    torchvision's RandomResizedCrop.get_params with that view's scale."""
    import selfsup.data.batch_augment as augment

    preset = get_preset("dino", 16, local_crops_number=2, local_size=8)
    height, width, n = 60, 80, 2000
    if path == "per image":
        ds = CropsDataset([], preset, 16)
        boxes = np.array([ds.crop_params(seed, height, width)[0] for seed in range(n)]).transpose(1, 0, 2)  # V x N x 4
    else:
        drawn = []
        original = augment.sample_crop_boxes
        monkeypatch.setattr(augment, "sample_crop_boxes", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
        images = torch.from_numpy(noise_image(height, width, 0)).permute(2, 0, 1).unsqueeze(0).expand(n, 3, height, width)
        ViewsAugment(preset, 16).forward_from_images(images.contiguous(), augment_generator(0, 0, 0, 0))
        boxes = np.stack([b.numpy() for b in drawn])
    assert boxes.shape == (4, n, 4)
    img = torch.empty(1, height, width)
    for view, ours in zip(preset.views, boxes):
        with seeded(1):
            ref = np.array([T.RandomResizedCrop.get_params(img, list(view.crop_scale), list(view.crop_ratio))
                            for _ in range(n)])
        fr, fo = box_features(ref, height, width), box_features(ours, height, width)
        for k in fr:
            assert ks_distance(fr[k], fo[k]) < 0.06, (view.crop_scale, k, ks_distance(fr[k], fo[k]))


def test_views_of_one_spec_are_augmented_together_as_each_alone(monkeypatch):
    """DINO's local crops (one spec) go through one BatchAugment call; every view keeps the
    parameters it draws in its turn and the bits it would get alone (CPU chunks stay inside a view)."""
    import selfsup.data.batch_augment as augment

    preset = get_preset("dino", 24, local_crops_number=3, local_size=10)
    views = [smooth_images(6, s, s, seed=i) for i, s in enumerate(preset.sizes(24))]
    monkeypatch.setattr(augment, "CPU_CHUNK_BYTES", 4 * 3 * 10 * 10 * 4)  # chunks of 4 local crops: 2 per view
    aug = ViewsAugment(preset, 24)
    assert [len(g) for g in aug.groups] == [1, 1, 3]
    together = aug(views, augment_generator(0, 1, 2, 0))
    g = augment_generator(0, 1, 2, 0)
    params = [sample_view_params(spec, 6, g) for spec in preset.views]  # view after view
    alone = [BatchAugment(spec)(x, params=p) for spec, x, p in zip(preset.views, views, params)]
    assert [tuple(v.shape) for v in together] == [(6, 3, 24, 24)] * 2 + [(6, 3, 10, 10)] * 3
    for i, (a, b) in enumerate(zip(together, alone)):
        assert torch.equal(a, b), i
    # On an accelerator the group is one chunk: the same numbers, up to float rounding.
    whole = ViewsAugment(preset, 24)
    for a in whole.augments:
        a.chunk_bytes = 0
    for a, b in zip(whole(views, augment_generator(0, 1, 2, 0)), alone):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
