"""How pretraining batches reach the device: dataset, sampler, loader and the device-side step.

`build_pretrain_pipeline` returns a `Pipeline` whose loader yields `(views, labels, skipped)`
and whose `to_device(views, epoch, step)` turns the loader's views into the normalised batches
the model takes. Backends (docs/PERFORMANCE.md):

* reference: the workers do everything per image (PIL + torchvision v1, as facebookresearch/moco);
  `to_device` only copies.
* batched: the workers decode once and cut both crops as uint8 (`selfsup.crops`); colour, blur,
  solarize and normalisation run batched (`selfsup.augment`) on the accelerator - or, on a
  CPU-only run, in the workers too, so that they overlap with the training step.
* memory: the whole dataset is one uint8 tensor; the loader yields indices and everything,
  crops included, runs batched on the device (`selfsup.inmemory`).
* auto: memory for small images (<= 64 pixels, as the small-image recipes) that fit in memory,
  otherwise batched.

Every backend keeps exact resume: the data order comes from ResumableDistributedSampler, the
workers' randomness from its per-sample seeds, the device's from (seed, epoch, step, rank).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader

from .augment import TwoViewAugment, augment_generator, host_to
from .crops import TwoCropsBatches, TwoCropsDataset
from .data import ImageDataset, find_samples
from .distributed import DistInfo
from .inmemory import IndexBatchLoader, InMemoryBatches, InMemoryImages
from .loader import SMALL_IMAGE_MAX, build_two_crops_transform, get_preset
from .sampler import ResumableDistributedSampler

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "batched", "memory", "reference")
# "auto" holds a folder in memory when its images are at most SMALL_IMAGE_MAX pixels and take
# at most this many bytes.
AUTO_MEMORY_MAX_BYTES = 2 << 30


@dataclass
class Pipeline:
    loader: Iterable
    sampler: ResumableDistributedSampler
    to_device: Callable[[list[torch.Tensor], int, int], list[torch.Tensor]]
    num_images: int
    description: str
    backend: str = "reference"


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave SIGTERM/SIGUSR1 to the main process.

    Pre-emption signals often reach the whole process group (SLURM, torchrun's shutdown). A
    worker killed by one makes the main process fail at once; ignoring them lets the main process
    finish its step and write a checkpoint. Workers still exit when the loader shuts down or the
    main process dies.
    """
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _copy_to_device(device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def to_device(views: list[torch.Tensor], epoch: int, step: int) -> list[torch.Tensor]:
        return [v.to(device, non_blocking=True).contiguous(memory_format=memory_format) for v in views]

    return to_device


def _batched_to_device(augment: TwoViewAugment, device: torch.device, seed: int, rank: int):
    def to_device(views: list[torch.Tensor], epoch: int, step: int) -> list[torch.Tensor]:
        g = augment_generator(seed, epoch, step, rank)
        return augment([v.to(device, non_blocking=True) for v in views], g)

    return to_device


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
    aug: str,
    image_size: int,
    batch_size: int,
    dist: DistInfo,
    seed: int,
    channels_last: bool = False,
    out_dtype: torch.dtype = torch.float32,
    description: str = "",
    workers: int = 0,
) -> Pipeline:
    """The pretraining data path over images held in memory (`InMemoryImages`, e.g. built from
    numpy arrays); crop, flip and colour all run batched on `dist.device`.

    `batch_size` is the per-process batch. Each process holds the whole dataset (on its device).
    On a CPU-only run with `workers` > 0 the batches are augmented in that many loader workers
    instead, overlapping with the training step (same views).
    """
    sampler = ResumableDistributedSampler(len(data), batch_size, dist.world_size, dist.rank, seed=seed)
    augment = TwoViewAugment(get_preset(aug, image_size), image_size, out_dtype=out_dtype,
                             channels_last=channels_last).to(dist.device)
    if dist.device.type == "cpu" and workers > 0:
        loader = DataLoader(InMemoryBatches(data, augment, seed, dist.rank), batch_size=None,
                            sampler=StepBatchSampler(sampler), num_workers=workers, persistent_workers=True,
                            worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(seed))
        to_device = _copy_to_device(dist.device, channels_last)
        where = f"in {workers} worker(s)"
    else:
        loader = IndexBatchLoader(sampler, data.labels)
        on_device = data.to(dist.device)

        def to_device(indices: torch.Tensor, epoch: int, step: int) -> list[torch.Tensor]:
            g = augment_generator(seed, epoch, step, dist.rank)
            return augment.forward_from_images(on_device.images[host_to(indices, dist.device)], g)

        where = f"on {dist.device}"
    c, h, w = data.image_shape
    head = (description or f"{len(data)} images") + (f" ({data.skipped} unreadable left out)" if data.skipped else "")
    description = (
        f"{head}; aug {aug} at {image_size}px, held in memory ({c}x{h}x{w} uint8, "
        f"{data.images.numel() / 2**20:.0f} MiB), crops and colour batched {where}"
    )
    return Pipeline(loader, sampler, to_device, len(data), description, "memory")


def build_pretrain_pipeline(
    data_dir: str,
    aug: str,
    image_size: int,
    batch_size: int,
    workers: int,
    dist: DistInfo,
    seed: int,
    backend: str = "reference",
    channels_last: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> Pipeline:
    """The pretraining data path over the images of `data_dir` (class folders or flat).

    `batch_size` is the per-process batch; `backend` one of BACKENDS; `out_dtype` the dtype of
    the views the batched and memory backends return (e.g. torch.bfloat16 under bf16 autocast).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown augmentation backend '{backend}'; valid: {', '.join(BACKENDS)}")
    samples, classes = find_samples(data_dir)
    what = f"{len(samples)} images ({len(classes) or 'no'} classes) from {data_dir}"
    auto = backend == "auto"
    if auto:
        backend = "memory" if small_images(samples) else "batched"
    if backend == "memory":
        try:
            data = InMemoryImages.from_samples(samples, classes, AUTO_MEMORY_MAX_BYTES if auto else 4 << 30)
        except ValueError as e:
            if not auto:
                raise
            logger.info("not holding the images in memory (%s); using the batched backend", e)
            backend = "batched"
        else:
            return build_memory_pipeline(data, aug, image_size, batch_size, dist, seed, channels_last, out_dtype,
                                         description=what, workers=workers)

    sampler = ResumableDistributedSampler(len(samples), batch_size, dist.world_size, dist.rank, seed=seed)
    loader_args = dict(
        num_workers=workers,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
        # Augmentation is seeded per sample (and per step) from the sampler; this generator only
        # keeps the loader from drawing its worker seeds out of the global stream (which would
        # shift on resume).
        generator=torch.Generator().manual_seed(seed),
    )
    if backend == "reference":
        dataset = ImageDataset(samples, build_two_crops_transform(aug, image_size), classes)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_args)
        to_device = _copy_to_device(dist.device, channels_last)
        how = f"reference per-image pipeline in {workers} worker(s)"
    else:
        preset = get_preset(aug, image_size)
        augment = TwoViewAugment(preset, image_size, out_dtype=out_dtype, channels_last=channels_last)
        crops = TwoCropsDataset(samples, preset, image_size, classes)
        if dist.device.type == "cpu":
            # No accelerator: the batched colour half runs in the workers, next to the crops.
            batches = TwoCropsBatches(crops, augment, seed, dist.rank)
            to_device = _copy_to_device(dist.device, channels_last)
            how = f"decode + crops + batched colour in {workers} worker(s)"
        else:
            batches = TwoCropsBatches(crops)
            to_device = _batched_to_device(augment.to(dist.device), dist.device, seed, dist.rank)
            how = f"decode + crops in {workers} worker(s), colour batched on {dist.device}"
        loader = DataLoader(batches, batch_size=None, sampler=StepBatchSampler(sampler), **loader_args)
    description = f"{what}; aug {aug} at {image_size}px, {how}"
    return Pipeline(loader, sampler, to_device, len(samples), description, backend)


class StepBatchSampler:
    """The per-process batches of a ResumableDistributedSampler, each as
    `(epoch, step, [(index, seed), ...])`, so that a whole batch - and its per-step augmentation
    generator - can be made in a loader worker. The same batches as
    DataLoader(batch_size=sampler.batch_size, drop_last=True) would form."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        items = list(self.sampler)
        b = self.sampler.batch_size
        for i in range(len(items) // b):
            yield self.sampler.epoch, self.sampler.start_step + i, items[i * b : (i + 1) * b]

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size
