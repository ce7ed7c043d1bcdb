"""The two halves wired together: worker crops, images held in memory, pipelines and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from helpers import make_image_folder, run_script
from PIL import Image, JpegImagePlugin
from selfsup.data import find_samples
from selfsup.data.augmentations import Preset, ViewSpec, build_multi_crop_transform, get_preset
from selfsup.data.batch_augment import ViewsAugment
from selfsup.data.crops import CropsDataset, draft_factor, resized_crop_uint8
from selfsup.data.inmemory import IndexBatchLoader, InMemoryImages
from selfsup.data.pipeline import CropsBatches, build_memory_pipeline, build_pretrain_pipeline
from selfsup.data.sampler import ResumableDistributedSampler
from selfsup.distributed import DistInfo
from selfsup.rng import augment_generator, seeded
from torch.utils.data import DataLoader


def smooth_jpeg(path, width: int, height: int, seed: int = 0, quality: int = 90) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    a = np.stack([np.sin(6 * xx + c) * 0.5 + 0.5 for c in rng.uniform(0, 6, 3)], -1) * (0.6 + 0.4 * yy[..., None])
    a = (a * 255).astype(np.uint8)
    Image.fromarray(a).save(path, quality=quality)
    return a


def pil_view(img: Image.Image, box, size: int, flip: bool, resample=Image.BILINEAR) -> torch.Tensor:
    top, left, h, w = box
    out = img.crop((left, top, left + w, top + h)).resize((size, size), resample)
    out = out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------- worker half


@pytest.mark.parametrize("size", [24, 64])  # downscaled and (some boxes) upscaled views
def test_worker_views_are_pillows_crop_resize_and_flip(tmp_path, size):
    smooth_jpeg(tmp_path / "a.jpg", 90, 70)
    ds = CropsDataset([(str(tmp_path / "a.jpg"), 3)], get_preset("byol", 224), size, draft=False)
    img = Image.open(tmp_path / "a.jpg").convert("RGB")
    for seed in range(6):
        views, label, skipped = ds[(0, seed)]
        boxes, flips = ds.crop_params(seed, 70, 90)
        assert label == 3 and skipped == 0
        for v, box, flip in zip(views, boxes, flips):
            assert v.dtype == torch.uint8 and v.shape == (3, size, size) and v.is_contiguous()
            diff = (v.int() - pil_view(img, box, size, flip).int()).abs()
            assert diff.max() <= 1, (seed, box)  # torch's fixed point vs Pillow's: at most 1 level


def test_views_are_a_function_of_the_sample_seed(tmp_path):
    make_image_folder(tmp_path, classes=1, per_class=2, size=40, ext="jpg")
    samples, _ = find_samples(tmp_path)
    ds = CropsDataset(samples, get_preset("moco_v2", 224), 16)
    a, b, c = ds[(1, 7)][0], ds[(1, 7)][0], ds[(1, 8)][0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_reduced_size_decoding_only_when_both_crops_allow_it(tmp_path, monkeypatch):
    assert draft_factor([(0, 0, 300, 400), (0, 0, 260, 500)], 32) == 8
    assert draft_factor([(0, 0, 300, 400), (0, 0, 100, 500)], 32) == 2
    assert draft_factor([(0, 0, 300, 400), (0, 0, 40, 500)], 32) == 1
    smooth_jpeg(tmp_path / "big.jpg", 800, 600)
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    big_crops = Preset("t", (ViewSpec(crop_scale=(0.9, 1.0)), ViewSpec(crop_scale=(0.8, 1.0))))
    fast = CropsDataset([(str(tmp_path / "big.jpg"), 0)], big_crops, 32)
    full = CropsDataset([(str(tmp_path / "big.jpg"), 0)], big_crops, 32, draft=False)
    for seed in range(3):
        a, b = fast[(0, seed)][0], full[(0, seed)][0]
        for u, v in zip(a, b):
            diff = (u.int() - v.int()).abs().float()
            assert diff.mean() < 2.0 and diff.max() <= 16, (seed, diff.mean(), diff.max())
    assert calls == [(100, 75)] * 3  # 1/8 scale: every crop keeps >= 8 x 32 pixels
    calls.clear()
    CropsDataset([(str(tmp_path / "big.jpg"), 0)], big_crops, 320)[(0, 0)]
    assert calls == []  # 1/2 scale would leave less than 320 pixels of a 600-pixel-high image


def test_unreadable_files_are_skipped_by_the_worker_half(tmp_path):
    make_image_folder(tmp_path, classes=1, per_class=3, size=30, ext="jpg")
    samples, _ = find_samples(tmp_path)
    data = open(samples[1][0], "rb").read()
    open(samples[1][0], "wb").write(data[: len(data) // 3])  # truncated JPEG
    ds = CropsDataset(samples, get_preset("moco_v2", 224), 16)
    views, _, skipped = ds[(1, 0)]
    assert skipped == 1 and views[0].shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------- in memory


def test_in_memory_images_accept_numpy_layouts():
    gray = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    data = InMemoryImages(gray, np.arange(5))
    assert data.images.shape == (5, 1, 28, 28) and torch.equal(data.images[2, 0], torch.from_numpy(gray[2]))
    hwc = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    data = InMemoryImages(hwc, channels_last_input=True)
    assert data.images.shape == (4, 3, 32, 32) and torch.equal(data.images[1, 2], torch.from_numpy(hwc[1, ..., 2]))
    assert (data.labels == -1).all()
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImages(gray.astype(np.float32))
    with pytest.raises(ValueError, match="channels_last_input"):
        InMemoryImages(hwc)
    with pytest.raises(ValueError, match="labels"):
        InMemoryImages(gray, [1, 2])


def test_in_memory_from_folder_decodes_every_image_once(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (6, 12, 10), dtype=np.uint8)
    for i, a in enumerate(arrays):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(a, "L").save(tmp_path / f"c{i % 2}" / f"{i}.png")
    (tmp_path / "c0" / "broken.png").write_bytes(b"not a png")
    data = InMemoryImages.from_folder(tmp_path)
    assert data.images.shape == (6, 1, 12, 10) and data.classes == ["c0", "c1"] and data.skipped == 1
    order = [0, 2, 4, 1, 3, 5]  # class folders, files sorted by name
    assert torch.equal(data.images[:, 0], torch.from_numpy(arrays[order]))
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((12, 11, 3), np.uint8)).save(tmp_path / "c1" / "odd.png")
    with pytest.raises(ValueError, match="share one size"):
        InMemoryImages.from_folder(tmp_path)


def test_index_loader_gives_the_batches_of_a_dataloader_over_the_sampler():
    for rank, start in ((0, 0), (1, 2)):
        sampler = ResumableDistributedSampler(50, 4, num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(5, start)
        ref = [b.tolist() for b in DataLoader(list(range(50)), batch_size=4, sampler=[i for i, _ in sampler],
                                                 drop_last=True)]
        ours = [b[0].tolist() for b in IndexBatchLoader(sampler, torch.arange(50))]
        assert ours == ref and len(IndexBatchLoader(sampler, torch.arange(50))) == len(ref)


def test_batched_crops_take_each_sample_from_its_own_image():
    colours = torch.arange(8, dtype=torch.uint8).mul(30).view(8, 1, 1, 1).expand(8, 3, 20, 20).contiguous()
    plain = ViewSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, crop_scale=(0.1, 1.0))
    aug = ViewsAugment(Preset("plain", (plain, plain)), 12, mean=(0, 0, 0), std=(1, 1, 1))
    views = aug.forward_from_images(colours, torch.Generator().manual_seed(0))
    for v in views:
        assert v.shape == (8, 3, 12, 12)
        torch.testing.assert_close(v, colours[:, :, :12, :12].float() / 255)


def record(pipeline, epoch: int, start: int = 0) -> list[list[torch.Tensor]]:
    """Every step's views (one micro-batch: no --accum-iter)."""
    pipeline.sampler.set_epoch(epoch, start)
    steps = [pipeline.views(views, epoch, start + i) for i, (views, _, _) in enumerate(pipeline.loader)]
    assert all(len(micro) == 1 for micro in steps)
    return [micro[0] for micro in steps]


def test_memory_pipeline_resumes_exactly_in_the_main_process_or_in_workers():
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    full = record(build_memory_pipeline(InMemoryImages(images), aug="byol", image_size=32, batch_size=8, dist=DistInfo(), seed=4), epoch=2)
    in_workers = build_memory_pipeline(InMemoryImages(images), aug="byol", image_size=32, batch_size=8, dist=DistInfo(), seed=4,
                                       workers=2)
    assert "in 2 worker(s)" in in_workers.description
    resumed = record(in_workers, epoch=2, start=3)
    assert len(full) == 5 and len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert full[0][0].shape == (8, 3, 32, 32) and not torch.equal(full[0][0], full[0][1])


def test_batched_pipeline_resumes_exactly_whatever_the_worker_count(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=10, size=72, ext="jpg")

    def build(workers):
        return build_pretrain_pipeline(str(tmp_path), aug="moco_v2", image_size=24, batch_size=4, workers=workers,
                                       dist=DistInfo(), seed=1, backend="batched")

    full = record(build(0), epoch=1)
    resumed = record(build(2), epoch=1, start=2)
    assert len(full) == 5 and len(resumed) == 3
    for a, b in zip(full[2:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_auto_backend_holds_small_images_in_memory(tmp_path):
    make_image_folder(tmp_path / "small", classes=2, per_class=4, size=28)
    make_image_folder(tmp_path / "large", classes=2, per_class=4, size=80, ext="jpg")
    small = build_pretrain_pipeline(str(tmp_path / "small"), aug="simclr", image_size=32, batch_size=4, workers=0,
                                    dist=DistInfo(), seed=0, backend="auto")
    large = build_pretrain_pipeline(str(tmp_path / "large"), aug="simclr", image_size=64, batch_size=4, workers=0,
                                    dist=DistInfo(), seed=0, backend="auto")
    assert small.backend == "memory" and large.backend == "batched"
    ref = build_pretrain_pipeline(str(tmp_path / "large"), aug="simclr", image_size=64, batch_size=4, workers=0,
                                  dist=DistInfo(), seed=0, backend="reference")
    for p in (small, large, ref):
        out = record(p, 0)[0]
        assert [v.shape[1:] for v in out] == [out[0].shape[1:]] * 2 and out[0].dtype == torch.float32


@pytest.mark.e2e
def test_main_pretrain_trains_with_the_batched_backend(tmp_path):
    make_image_folder(tmp_path / "imgs", classes=2, per_class=8, size=72, ext="jpg")
    out = tmp_path / "run"
    r = run_script(["main_pretrain.py", str(tmp_path / "imgs"), "-a", "resnet18", "--image-size", "16", "-b", "8",
                    "--epochs", "1", "--moco-k", "16", "--moco-dim", "16", "--mlp", "--aug", "moco_v2", "-j", "1",
                    "--channels-last", "--output-dir", str(out)])  # default --aug-backend auto: batched here
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoint.pth.tar").is_file()
    assert "batched colour in 1 worker" in r.stderr + r.stdout  # a CPU run: colour in the workers too


def test_views_come_in_the_dtype_and_format_the_step_wants(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=4, size=28)
    for backend in ("batched", "memory"):
        p = build_pretrain_pipeline(str(tmp_path), aug="byol", image_size=32, batch_size=4, workers=0, dist=DistInfo(),
                                    seed=0, backend=backend,
                                    channels_last=True, out_dtype=torch.bfloat16)
        for v in record(p, 0)[0]:
            assert v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)


def test_colour_in_the_workers_equals_colour_on_the_device(tmp_path):
    """A CPU-only run augments in the loader workers; the parameters are those the device would
    draw for the same step, so the views are the same."""
    make_image_folder(tmp_path, classes=1, per_class=6, size=40, ext="jpg")
    samples, _ = find_samples(tmp_path)
    preset = get_preset("byol", 24)
    crops = CropsDataset(samples, preset, 24)
    augment = ViewsAugment(preset, 24)
    key = (3, 5, [(i, 100 + i) for i in range(6)])
    in_workers = CropsBatches(crops, augment, seed=9, rank=1)[key][0][0]  # its one micro-batch
    uint8 = CropsBatches(crops)[key][0]
    on_device = augment(uint8, augment_generator(9, 3, 5, 1))
    assert uint8[0].dtype == torch.uint8
    assert all(torch.equal(a, b) for a, b in zip(in_workers, on_device))


# ---------------------------------------------------------------------------------------------- multi-crop

DINO_SMALL = {"local_crops_number": 3, "local_size": 12}  # 2 global crops at the image size, 3 local ones


def test_worker_bicubic_views_are_within_two_levels_of_pillow(tmp_path):
    """DINO's crops in the workers: torch's uint8 bicubic, its passes in Pillow's order."""
    from test_augment import RESIZE_CASES, noise_image

    for seed, a in enumerate((noise_image(60, 70, 3), smooth_jpeg(tmp_path / "a.jpg", 70, 60))):
        diffs = []
        for k, ((t, l, h, w), size) in enumerate(RESIZE_CASES):
            ours = resized_crop_uint8(torch.from_numpy(a), (t, l, h, w), size, bool(k % 2), "bicubic")
            diff = (ours.int() - pil_view(Image.fromarray(a), (t, l, h, w), size, bool(k % 2), Image.BICUBIC).int()).abs()
            assert ours.dtype == torch.uint8 and diff.max() <= 2, ((t, l, h, w), size, diff.max())
            diffs.append(diff.float().mean())
        assert max(diffs) <= 0.05, diffs  # almost every pixel equal
    # Through the dataset: every DINO view is a bicubic crop of its own size.
    ds = CropsDataset([(str(tmp_path / "a.jpg"), 0)], get_preset("dino", 32, **DINO_SMALL), 32, draft=False)
    img = Image.open(tmp_path / "a.jpg").convert("RGB")
    for seed in range(3):
        views = ds[(0, seed)][0]
        boxes, flips = ds.crop_params(seed, 60, 70)
        assert [v.shape[-1] for v in views] == [32, 32, 12, 12, 12]
        for v, box, flip in zip(views, boxes, flips):
            assert (v.int() - pil_view(img, box, v.shape[-1], flip, Image.BICUBIC).int()).abs().max() <= 2


def test_reference_views_are_pillows_bicubic_crops(tmp_path):
    """The reference backend runs torchvision on PIL images: DINO's views are Pillow's bicubic
    resize of the box torchvision draws."""
    smooth_jpeg(tmp_path / "a.jpg", 90, 70)
    img = Image.open(tmp_path / "a.jpg").convert("RGB")
    spec = ViewSpec(crop_scale=(0.05, 0.4), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0, size=20,
                    interpolation="bicubic")
    transform = build_multi_crop_transform(Preset("crop only", (spec,)), 64, mean=(0, 0, 0), std=(1, 1, 1))
    for seed in range(5):
        with seeded(seed):
            view = transform(img)[0]
        with seeded(seed):
            box = T.RandomResizedCrop.get_params(img, [0.05, 0.4], [3 / 4, 4 / 3])
        assert torch.equal((view * 255).round().to(torch.uint8), pil_view(img, box, 20, False, Image.BICUBIC))


def test_draft_decoding_leaves_every_view_its_own_size():
    boxes = [(0, 0, 300, 400), (0, 0, 100, 100)]
    assert draft_factor(boxes, [32, 12]) == 8  # the 100-pixel crop still has 8 x 12 pixels
    assert draft_factor(boxes, [32, 32]) == 2
    assert draft_factor(boxes, [40, 12]) == 4  # 300 < 8 x 40


@pytest.mark.parametrize("backend", ["reference", "batched", "memory"])
def test_multi_crop_views_resume_exactly_whatever_the_worker_count(tmp_path, backend):
    memory = backend == "memory"
    make_image_folder(tmp_path, classes=2, per_class=10, size=28 if memory else 72, ext="png" if memory else "jpg")

    def build(workers):
        return build_pretrain_pipeline(str(tmp_path), aug="dino", image_size=24, batch_size=4, workers=workers,
                                       dist=DistInfo(), seed=1, backend=backend, aug_options=DINO_SMALL)

    first = build(0)
    assert first.backend == backend and "2x24px + 3x12px" in first.description
    full = record(first, epoch=1)
    resumed = record(build(2), epoch=1, start=2)
    assert len(full) == 5 and len(resumed) == 3
    assert [tuple(v.shape) for v in full[0]] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    for a, b in zip(full[2:], resumed):
        assert len(a) == len(b) == 5 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(full[0][2], full[0][3])  # each local crop its own draw


def test_multi_crop_views_come_in_the_dtype_and_format_the_step_wants(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=4, size=28)
    for backend in ("batched", "memory"):
        p = build_pretrain_pipeline(str(tmp_path), aug="dino", image_size=32, batch_size=4, workers=0, dist=DistInfo(),
                                    seed=0, backend=backend, channels_last=True, out_dtype=torch.bfloat16,
                                    aug_options=DINO_SMALL)
        views = record(p, 0)[0]
        assert [v.shape[-1] for v in views] == [32, 32, 12, 12, 12]
        for v in views:
            assert v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
