"""Small datasets held in memory as one uint8 tensor, augmented fully batched on the device.

At 28-64 pixels a per-image loader spends more time on Python and PIL overhead per image than
the network spends on it. Held as N x C x H x W uint8 (60k Fashion-MNIST images are 47 MB, 50k
CIFAR images 150 MB), a batch is one indexing operation, and crop, flip and colour run batched
(`selfsup.data.batch_augment.ViewsAugment.forward_from_images`).

    data = InMemoryImages(images, labels)   # numpy or torch uint8: N x H x W, N x C x H x W
    pipeline = build_memory_pipeline(data, aug="simclr", image_size=32, batch_size=256, dist=DistInfo(), seed=0)

The loader yields the sampler's indices (ResumableDistributedSampler order, so resume is exact);
`pipeline.views(indices, epoch, step)` gathers, crops and augments them with a generator
seeded from (seed, epoch, step, rank).
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from . import find_samples
from .augmentations import to_rgb
from .sampler import ResumableDistributedSampler

logger = logging.getLogger(__name__)


class NotHeldInMemory(ValueError):
    """Images that cannot be held in memory: `reason` says why, the message adds the fix (the
    batched backend), which a caller that switches to it by itself leaves out."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; use --aug-backend batched")
        self.reason = reason


class InMemoryImages:
    """Images (uint8, N x C x H x W with C = 1 or 3) and labels (N int64, -1 when unknown).

    Args:
        images: uint8 numpy array or tensor, N x H x W (grayscale) or N x C x H x W; pass
            `channels_last_input=True` for N x H x W x C arrays (CIFAR's pickles, PIL stacks).
        labels: N integers, or None.
        classes: class names, if any.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        classes: Sequence[str] = (),
        channels_last_input: bool = False,
    ) -> None:
        x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        if x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0-255); got {x.dtype}. Convert with (x * 255).round().to(uint8).")
        if x.dim() == 3:
            x = x.unsqueeze(1)
        elif x.dim() == 4 and channels_last_input:
            x = x.permute(0, 3, 1, 2)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be N x H x W or N x C x H x W with C = 1 or 3; got shape {tuple(images.shape)}"
                + ("" if channels_last_input else " (for N x H x W x C arrays pass channels_last_input=True)")
            )
        self.images = x.contiguous()
        n = x.shape[0]
        if labels is None:
            self.labels = torch.full((n,), -1, dtype=torch.long)
        else:
            self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
            if len(self.labels) != n:
                raise ValueError(f"{n} images but {len(self.labels)} labels")
        self.classes = list(classes)
        self.skipped = 0  # unreadable files left out by from_folder / from_samples

    @classmethod
    def from_folder(cls, root: str | os.PathLike, max_bytes: int = 4 << 30) -> "InMemoryImages":
        """Decode every image of an ImageFolder (or flat folder) once; grayscale files stay one
        channel unless some file has colour. Unreadable files are skipped with a warning.
        Raises NotHeldInMemory if the images differ in size or would need more than `max_bytes`."""
        samples, classes = find_samples(root)
        return cls.from_samples(samples, classes, max_bytes)

    @classmethod
    def from_samples(
        cls, samples: Sequence[tuple[str, int]], classes: Sequence[str] = (), max_bytes: int = 4 << 30
    ) -> "InMemoryImages":
        """`from_folder` for a list of (path, label) from `find_samples`."""
        arrays, labels, size, skipped = [], [], None, 0
        for path, label in samples:
            try:
                with open(path, "rb") as f:
                    img = Image.open(f)
                    img.load()
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
                logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                skipped += 1
                continue
            img = img if img.mode == "L" else to_rgb(img)
            if size is None:
                size = img.size
                need = len(samples) * size[0] * size[1] * len(img.getbands())
                if need > max_bytes:
                    raise NotHeldInMemory(f"{len(samples)} images of {size[0]}x{size[1]} need {need / 2**30:.1f} GiB "
                                          f"in memory, more than the {max_bytes / 2**30:.1f} GiB allowed")
            if img.size != size:
                raise NotHeldInMemory(f"images held in memory must share one size: {path} is "
                                      f"{img.size[0]}x{img.size[1]}, the first was {size[0]}x{size[1]}")
            arrays.append(np.asarray(img))
            labels.append(label)
        if not arrays:
            raise RuntimeError(f"none of the {len(samples)} files could be read as an image")
        if all(a.ndim == 2 for a in arrays):
            out = cls(np.stack(arrays), labels, classes)
        else:
            arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
            out = cls(np.stack(arrays), labels, classes, channels_last_input=True)
        out.skipped = skipped
        return out

    def to(self, device: torch.device | str) -> "InMemoryImages":
        out = InMemoryImages.__new__(InMemoryImages)
        out.images, out.labels = self.images.to(device), self.labels
        out.classes, out.skipped = self.classes, self.skipped
        return out

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


class IndexBatchLoader:
    """Batches of dataset indices in a ResumableDistributedSampler's order, as
    `(indices, labels, skipped)` - the loader of the in-memory pipeline.

    The same batches a DataLoader over the sampler would form (the sampler's positions, cut
    into per-process batches), computed as tensors instead of one Python item at a time.
    """

    def __init__(self, sampler: ResumableDistributedSampler, labels: torch.Tensor) -> None:
        self.sampler = sampler
        self.labels = labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        index = self.sampler.permutation()[self.sampler.positions()]
        zeros = torch.zeros(self.sampler.batch_size, dtype=torch.long)
        for batch in index.split(self.sampler.batch_size):
            yield batch, self.labels[batch], zeros

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size
