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
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from selfsup.data.augmentations import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, ViewSpec, get_preset
from selfsup.data.batch_augment import (BatchAugment, TwoViewAugment, adjust_brightness_, adjust_contrast_, adjust_hue,
                              adjust_saturation_, gaussian_blur_pil_, rgb_to_gray, sample_view_params, solarize_)
from selfsup.data.crops import resized_crop, sample_crop_box, sample_crop_boxes
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
    views = get_preset(preset, 224)
    for spec in {views.view1, views.view2}:
        aug = BatchAugment(spec, chunk_bytes=4 * 3 * 14 * 18 * 4)  # chunks of 4: several sorts
        p = aug.sample_params(12, torch.Generator().manual_seed(3))
        p.jitter[:3] = True  # make sure every branch is exercised
        p.grayscale[3], p.blur[4:6], p.solarize[6:8] = True, True, True
        ours = aug(x8, params=p)
        expected = torch.stack([torchvision_view(unit(x8[i]), spec, p, i) for i in range(12)])
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)


def test_output_dtype_memory_format_and_chunking():
    x8 = smooth_images(9)
    spec = AUGMENTATIONS["byol"].view2
    p = sample_view_params(spec, 9, torch.Generator().manual_seed(0))
    whole = BatchAugment(spec, chunk_bytes=0)(x8, params=p)
    chunked = BatchAugment(spec, chunk_bytes=2 * 3 * 24 * 32 * 4)(x8, params=p)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    fast = BatchAugment(spec, out_dtype=torch.bfloat16, channels_last=True)(x8, params=p)
    assert fast.dtype == torch.bfloat16 and fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, whole.to(torch.bfloat16))


def test_same_step_same_views_other_step_other_views():
    x8 = smooth_images(4)
    aug = TwoViewAugment(AUGMENTATIONS["moco_v2"], 24)
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
    for spec in (AUGMENTATIONS[preset].view1, AUGMENTATIONS[preset].view2):
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
    spec = AUGMENTATIONS["byol"].view1
    p = sample_view_params(spec, 10, torch.Generator().manual_seed(2))
    sliced = BatchAugment(spec)(x8, params=p)
    monkeypatch.setattr(augment, "MAX_RUNS", 0)  # write back with index_copy_
    # Report every subset as at least two runs, so that none is worked on as a slice.
    monkeypatch.setattr(augment, "_runs", lambda mask: [(int(i), 1) for i in torch.nonzero(mask).squeeze(1)] * 2)
    gathered = BatchAugment(spec)(x8, params=p)
    torch.testing.assert_close(gathered, sliced, atol=1e-6, rtol=0)
