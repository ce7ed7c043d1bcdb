"""How pretraining batches reach the device: dataset, sampler, loader and the device-side step.

`build_pretrain_pipeline` returns a `Pipeline` whose loader yields `(views, labels, skipped)`
and whose `to_device(views, epoch, step)` turns the loader's views into the normalised float
batches the model takes. With the reference backend the workers do everything (per-image PIL +
torchvision, as facebookresearch/moco) and `to_device` only copies.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader

from .data import ImageDataset, find_samples
from .distributed import DistInfo
from .loader import build_two_crops_transform
from .sampler import ResumableDistributedSampler

BACKENDS = ("reference",)


@dataclass
class Pipeline:
    loader: DataLoader
    sampler: ResumableDistributedSampler
    to_device: Callable[[list[torch.Tensor], int, int], list[torch.Tensor]]
    num_images: int
    description: str


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


def _reference_to_device(device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def to_device(views: list[torch.Tensor], epoch: int, step: int) -> list[torch.Tensor]:
        return [v.to(device, non_blocking=True).contiguous(memory_format=memory_format) for v in views]

    return to_device


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
) -> Pipeline:
    """The pretraining data path over the images of `data_dir` (class folders or flat).

    `batch_size` is the per-process batch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown augmentation backend '{backend}'; valid: {', '.join(BACKENDS)}")
    samples, classes = find_samples(data_dir)
    transform = build_two_crops_transform(aug, image_size)
    dataset = ImageDataset(samples, transform, classes)
    sampler = ResumableDistributedSampler(len(dataset), batch_size, dist.world_size, dist.rank, seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
        worker_init_fn=ignore_stop_signals,
        # Augmentation is seeded per sample by the sampler; this generator only keeps the loader
        # from drawing its worker seeds out of the global stream (which would shift on resume).
        generator=torch.Generator().manual_seed(seed),
    )
    description = (
        f"{len(dataset)} images ({len(classes) or 'no'} classes) from {data_dir}; "
        f"aug {aug} at {image_size}px, reference per-image pipeline in {workers} worker(s)"
    )
    return Pipeline(loader, sampler, _reference_to_device(dist.device, channels_last), len(dataset), description)
