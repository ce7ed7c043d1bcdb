"""How pretraining batches reach the model: dataset, sampler, loader, and the views on the device.

`build_pretrain_pipeline` (over an image folder, or Fashion-MNIST's idx files) returns a
`Pipeline` whose loader yields `(batch, labels, skipped)` and whose `views(batch, epoch, step)`
turns a batch into its micro-batches (one without --accum-iter), each the list of normalised
views the model takes, on the training device. The data paths (docs/PERFORMANCE.md), by backend:

* reference: the workers do everything per image (PIL + torchvision v1, as facebookresearch/moco);
  `views` only copies.
* batched: the workers decode once and cut every view's crop as uint8 (selfsup.data.crops); colour, blur,
  solarize and normalisation run batched (selfsup.data.batch_augment) on the accelerator - or, on a
  CPU-only run, in the workers too, so that they overlap with the training step.
* memory: the whole dataset is one uint8 tensor (selfsup.data.inmemory); everything, crops
  included, runs batched on the device - or, on a CPU-only run with workers, in the workers.
* auto: memory for small images (<= 64 pixels, as the small-image recipes) that fit in memory,
  otherwise batched.

Every path keeps exact resume: the data order comes from ResumableDistributedSampler, the
workers' randomness from its per-sample seeds, the batched augmentation's from (seed, epoch,
step, rank) - so a view is the same whether a worker or the main process makes it. With
--accum-iter K, micro-batch j of rank r is augmented as virtual rank r*K + j (selfsup.accumulation).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from PIL import Image

from ..distributed import DistInfo
from ..rng import augment_generator
from . import (FASHION_MNIST_CLASSES, ImageDataset, fashion_mnist_root, find_samples, load_fashion_mnist,
               training_loader)
from .augmentations import SMALL_IMAGE_MAX, build_multi_crop_transform, get_preset
from .batch_augment import ViewsAugment
from .crops import CropsDataset, host_to
from .inmemory import IndexBatchLoader, InMemoryImages, NotHeldInMemory
from .sampler import ResumableDistributedSampler, StepBatchSampler

logger = logging.getLogger(__name__)

AUG_BACKENDS = ("auto", "batched", "memory", "reference")
# "auto" holds a folder in memory when its images are at most SMALL_IMAGE_MAX pixels and take
# at most this many bytes.
AUTO_MEMORY_MAX_BYTES = 2 << 30


@dataclass
class Pipeline:
    loader: Iterable
    sampler: ResumableDistributedSampler
    views: Callable[..., list[list[torch.Tensor]]]  # (batch, epoch, step) -> micro-batches of [view, ...]
    num_images: int
    description: str
    backend: str = "reference"
    # What the data is, independent of where it lies: a fingerprint of the files (relative paths
    # and labels) or of the arrays - part of what defines a run (selfsup.resume.run_definition).
    data_id: str = ""


def files_id(samples: Sequence[tuple[str, int]], root: str | Path) -> str:
    """`N images, C labels, files <hash>` of an image folder, from the paths relative to `root`
    (so a copy elsewhere, or ROOT against ROOT/train, is the same data)."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return f"{len(samples)} images, {len({label for _, label in samples})} labels, files {h.hexdigest()[:16]}"


def arrays_id(data: InMemoryImages) -> str:
    """`N images, C labels, arrays <hash>` of images held in memory, from their bytes."""
    h = hashlib.sha256(data.images.numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    return f"{len(data)} images, {len(set(data.labels.tolist()))} labels, arrays {h.hexdigest()[:16]}"


def split_micro(views: list[torch.Tensor], k: int) -> list[list[torch.Tensor]]:
    """A batch's views (N x ... each) as its k micro-batches' views (N/k x ... each, in order)."""
    return [list(part) for part in zip(*(v.chunk(k) for v in views))] if k > 1 else [list(views)]


def copied_views(device: torch.device, channels_last: bool, k: int = 1) -> Callable[..., list[list[torch.Tensor]]]:
    """`views` for batches whose views are ready - the whole batch's (then split into k
    micro-batches) or already each micro-batch's: copy them to the device."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def views(batch: list, epoch: int, step: int) -> list[list[torch.Tensor]]:
        micro = split_micro(batch, k) if isinstance(batch[0], torch.Tensor) else batch
        return [[v.to(device, non_blocking=True).contiguous(memory_format=memory_format) for v in part]
                for part in micro]

    return views


def _augmented(augment: ViewsAugment, device: torch.device, seed: int, rank: int,
               k: int = 1) -> Callable[..., list[list[torch.Tensor]]]:
    """`views` for uint8 crops: the batched colour half on the device, micro-batch j as virtual rank
    rank*k + j."""

    def views(batch: list[torch.Tensor], epoch: int, step: int) -> list[list[torch.Tensor]]:
        return [augment([v.to(device, non_blocking=True) for v in part],
                        augment_generator(seed, epoch, step, rank * k + j))
                for j, part in enumerate(split_micro(batch, k))]

    return views


def small_images(samples: Sequence[tuple[str, int]], probe: int = 16) -> bool:
    """Whether the first `probe` images are at most SMALL_IMAGE_MAX pixels on each side (read
    from the headers only)."""
    for path, _ in samples[:probe]:
        try:
            with Image.open(path) as img:
                if max(img.size) > SMALL_IMAGE_MAX:
                    return False
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            continue
    return True


def build_memory_pipeline(
    data: InMemoryImages,
    *,
    aug: str,
    image_size: int,
    batch_size: int,
    dist: DistInfo,
    seed: int,
    workers: int = 0,
    channels_last: bool = False,
    out_dtype: torch.dtype = torch.float32,
    description: str = "",
    data_id: str = "",
    accum: int = 1,
    aug_options: Mapping[str, Any] | None = None,
) -> Pipeline:
    """The pretraining data path over images held in memory (`InMemoryImages`, e.g. built from
    numpy arrays); crop, flip and colour all run batched on `dist.device`.

    `batch_size` is the per-process batch (`accum` micro-batches); `aug_options` the preset's run
    options (get_preset's keywords: the dino preset's local crops and scales). Each process holds
    the whole dataset (on its device). On a CPU-only run with `workers` > 0 the batches are
    augmented in that many loader workers instead, overlapping with the training step (same views).
    """
    sampler = ResumableDistributedSampler(len(data), batch_size, dist.world_size, dist.rank, seed=seed, accum=accum)
    preset = get_preset(aug, image_size, **(aug_options or {}))
    augment = ViewsAugment(preset, image_size, out_dtype=out_dtype, channels_last=channels_last).to(dist.device)
    if dist.device.type == "cpu" and workers > 0:
        loader = training_loader(InMemoryBatches(data, augment, seed, dist.rank, accum), StepBatchSampler(sampler),
                                 batch_size=None, workers=workers, seed=seed, pin_memory=False)
        views = copied_views(dist.device, channels_last)
        where = f"in {workers} worker(s)"
    else:
        loader = IndexBatchLoader(sampler, data.labels)
        on_device = data.to(dist.device)

        def views(indices: torch.Tensor, epoch: int, step: int) -> list[list[torch.Tensor]]:
            return [augment.forward_from_images(on_device.images[host_to(part, dist.device)],
                                                augment_generator(seed, epoch, step, dist.rank * accum + j))
                    for j, part in enumerate(indices.chunk(accum))]

        where = f"on {dist.device}"
    c, h, w = data.image_shape
    head = description or (f"{len(data)} images" + (f" ({data.skipped} unreadable left out)" if data.skipped else ""))
    description = (
        f"{head}; aug {aug} {preset.describe(image_size)}, held in memory ({c}x{h}x{w} uint8, "
        f"{data.images.numel() / 2**20:.0f} MiB), crops and colour batched {where}"
    )
    return Pipeline(loader, sampler, views, len(data), description, "memory", data_id or arrays_id(data))


def build_pretrain_pipeline(
    data_dir: str,
    *,
    aug: str,
    image_size: int,
    batch_size: int,
    workers: int,
    dist: DistInfo,
    seed: int,
    backend: str = "reference",
    channels_last: bool = False,
    out_dtype: torch.dtype = torch.float32,
    accum: int = 1,
    aug_options: Mapping[str, Any] | None = None,
) -> Pipeline:
    """The pretraining data path over the images of `data_dir` (class folders or flat).

    `batch_size` is the per-process batch, `accum` its micro-batches (--accum-iter); `backend` one
    of AUG_BACKENDS; `out_dtype` the dtype of the views the batched and memory backends return
    (e.g. torch.bfloat16 under bf16 autocast); `aug_options` the preset's run options, get_preset's
    keywords (dino: local_crops_number, local_size, global_scale, local_scale).
    """
    preset = get_preset(aug, image_size, **(aug_options or {}))  # unknown names and options fail here
    if backend not in AUG_BACKENDS:
        raise ValueError(f"unknown augmentation backend '{backend}'; valid: {', '.join(AUG_BACKENDS)}")
    fmnist = fashion_mnist_root(data_dir)
    if fmnist is not None:  # idx files: held in memory whatever the backend
        x, y = load_fashion_mnist(fmnist, "train")
        return build_memory_pipeline(InMemoryImages(x, y, FASHION_MNIST_CLASSES), aug=aug, image_size=image_size,
                                     batch_size=batch_size, dist=dist, seed=seed, workers=workers,
                                     channels_last=channels_last, out_dtype=out_dtype, accum=accum,
                                     aug_options=aug_options,
                                     description=f"Fashion-MNIST training set ({len(x)} images) from {fmnist}")
    samples, classes = find_samples(data_dir)
    what = f"{len(samples)} images ({len(classes) or 'no'} classes) from {data_dir}"
    auto = backend == "auto"
    if auto:
        backend = "memory" if small_images(samples) else "batched"
    if backend == "memory":
        try:
            data = InMemoryImages.from_samples(samples, classes, AUTO_MEMORY_MAX_BYTES if auto else 4 << 30)
        except NotHeldInMemory as e:
            if not auto:
                raise
            logger.info("not holding the images in memory (%s): the batched backend instead", e.reason)
            backend = "batched"
        else:  # the images it holds: the readable ones, the count every later message uses
            held = f"{len(data)} images ({len(classes) or 'no'} classes) from {data_dir}" + (
                f" ({data.skipped} unreadable of {len(samples)} left out)" if data.skipped else "")
            return build_memory_pipeline(data, aug=aug, image_size=image_size, batch_size=batch_size, dist=dist,
                                         seed=seed, workers=workers, channels_last=channels_last, out_dtype=out_dtype,
                                         description=held, data_id=files_id(samples, data_dir), accum=accum,
                                         aug_options=aug_options)

    sampler = ResumableDistributedSampler(len(samples), batch_size, dist.world_size, dist.rank, seed=seed, accum=accum)
    pin = dist.device.type == "cuda"
    if backend == "reference":
        dataset = ImageDataset(samples, build_multi_crop_transform(preset, image_size), classes)
        loader = training_loader(dataset, sampler, batch_size=batch_size, workers=workers, seed=seed, pin_memory=pin,
                                 drop_last=True)
        views = copied_views(dist.device, channels_last, accum)
        how = f"reference per-image pipeline in {workers} worker(s)"
    else:
        augment = ViewsAugment(preset, image_size, out_dtype=out_dtype, channels_last=channels_last)
        crops = CropsDataset(samples, preset, image_size, classes)
        if dist.device.type == "cpu":
            # No accelerator: the batched colour half runs in the workers, next to the crops.
            batches = CropsBatches(crops, augment, seed, dist.rank, accum)
            views = copied_views(dist.device, channels_last)
            how = f"decode + crops + batched colour in {workers} worker(s)"
        else:
            batches = CropsBatches(crops)
            views = _augmented(augment.to(dist.device), dist.device, seed, dist.rank, accum)
            how = f"decode + crops in {workers} worker(s), colour batched on {dist.device}"
        loader = training_loader(batches, StepBatchSampler(sampler), batch_size=None, workers=workers, seed=seed,
                                 pin_memory=pin)
    description = f"{what}; aug {aug} {preset.describe(image_size)}, {how}"
    return Pipeline(loader, sampler, views, len(samples), description, backend, files_id(samples, data_dir))


# ----------------------------------------------------------------------------------------------
# Whole batches made in a loader worker
# ----------------------------------------------------------------------------------------------


class CropsBatches(torch.utils.data.Dataset):
    """Whole batches of a CropsDataset, fetched by `(epoch, step, [(index, seed), ...])` keys
    (sampler.StepBatchSampler): `([view, ...], labels, skipped)`, one N x 3 x S_v x S_v batch per
    view of the preset, in its order.

    With `augment`, the batched colour half runs here too, with the generator the device would
    use for that step (augment_generator(seed, epoch, step, rank), micro-batch j of `accum` as
    virtual rank rank*accum + j), and the views come as each micro-batch's: what a CPU-only run
    does, so that the colour work stays in the loader workers, in parallel with the training step,
    at the batched cost per image. Without it the views stay uint8 for the device.
    """

    def __init__(self, dataset: CropsDataset, augment: ViewsAugment | None = None, seed: int = 0,
                 rank: int = 0, accum: int = 1) -> None:
        self.dataset, self.augment, self.seed, self.rank, self.accum = dataset, augment, seed, rank, accum

    def __getitem__(self, key: tuple[int, int, list[tuple[int, int]]]):
        epoch, step, items = key
        out = [self.dataset[item] for item in items]
        views = [torch.stack([o[0][k] for o in out]) for k in range(len(self.dataset.specs))]
        labels = torch.tensor([o[1] for o in out])
        skipped = torch.tensor([o[2] for o in out])
        if self.augment is not None:
            views = [self.augment(part, augment_generator(self.seed, epoch, step, self.rank * self.accum + j))
                     for j, part in enumerate(split_micro(views, self.accum))]
        return views, labels, skipped


class InMemoryBatches(torch.utils.data.Dataset):
    """Augmented batches of images held in memory, fetched by `(epoch, step, [(index, seed), ...])`
    keys (sampler.StepBatchSampler): `(micro-batches of [view, ...], labels, skipped)`.

    What a CPU-only run's loader workers make, so that the augmentation overlaps with the
    training step; the generators are the ones the device would use for that step, so the views
    are those of `build_memory_pipeline(...).views`.
    """

    def __init__(self, data: InMemoryImages, augment: ViewsAugment, seed: int, rank: int, accum: int = 1) -> None:
        self.data, self.augment, self.seed, self.rank, self.accum = data, augment, seed, rank, accum

    def __getitem__(self, key: tuple[int, int, list[tuple[int, int]]]):
        epoch, step, items = key
        index = torch.tensor([i for i, _ in items])
        views = [self.augment.forward_from_images(self.data.images[part],
                                                  augment_generator(self.seed, epoch, step, self.rank * self.accum + j))
                 for j, part in enumerate(index.chunk(self.accum))]
        return views, self.data.labels[index], torch.zeros(len(index), dtype=torch.long)
