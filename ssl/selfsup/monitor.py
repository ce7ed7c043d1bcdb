"""Watching a pretraining run: online kNN accuracy and the collapse signal.

A loss can look fine while the features die. Two cheap signals catch it early:
- kNN top-1 of the backbone (frozen, eval mode) on a labelled split, every N epochs - the same
  weighted kNN as main_knn.py, computed exactly once per image over all processes;
- the per-dimension std of the L2-normalised embeddings (SimSiam, Chen & He 2021, Sec. 4.1):
  about 1/sqrt(dim) when the embeddings spread over the sphere, 0 when they collapse to a point.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .backbones import Features
from .knn import extract_features, knn_evaluate, make_eval_loader

logger = logging.getLogger(__name__)

# Warn when the embedding std falls below this fraction of 1/sqrt(dim).
COLLAPSE_FRACTION = 0.1


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalised embeddings (SimSiam, Sec. 4.1).

    About 1/sqrt(dim) for well-spread embeddings; 0 when they collapse to one point. A 0-dim
    tensor on z's device (reading it would make the host wait for the accelerator).
    """
    z = F.normalize(z.float(), dim=1)  # N x dim
    return z.std(dim=0).mean()


def collapse_ratio(embed_std: float, dim: int) -> float:
    """embed_std relative to the 1/sqrt(dim) of well-spread embeddings (1 healthy, 0 collapsed)."""
    return embed_std * math.sqrt(dim)


def check_collapse(embed_std: float | None, dim: int, epoch: int) -> bool:
    """Log a warning when the embeddings are collapsing; returns True then."""
    if embed_std is None:
        return False
    ratio = collapse_ratio(embed_std, dim)
    if ratio < COLLAPSE_FRACTION:
        logger.warning(
            "epoch %d: embedding std %.2e is %.3f of the 1/sqrt(%d) of well-spread embeddings - the "
            "representation is collapsing (all images map close to one point). Check the learning rate, "
            "the momentum schedule and the augmentation; watch the kNN accuracy.", epoch, embed_std, ratio, dim)
        return True
    return False


class KNNMonitor:
    """kNN top-1/top-5 of a training backbone on (train, val) labelled datasets.

    Args:
        train, val: datasets yielding (image tensor, label, ...) with labels in [0, num_classes).
        num_classes: number of classes. batch_size: per process. k, T: as main_knn.py.
    """

    def __init__(self, train: Dataset, val: Dataset, num_classes: int, batch_size: int, device: torch.device,
                 workers: int = 0, k: int = 200, T: float = 0.07) -> None:
        self.train, self.val, self.num_classes = train, val, num_classes
        self.batch_size, self.device, self.workers = batch_size, device, workers
        self.k, self.T = k, T

    @torch.no_grad()
    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """Evaluate `encoder` without its head (the projection head during pretraining)."""
        backbone = Features(encoder)
        pin = self.device.type == "cuda"
        train_f, train_y = extract_features(backbone, make_eval_loader(self.train, self.batch_size, self.workers, pin),
                                            self.device)
        val_f, val_y = extract_features(backbone, make_eval_loader(self.val, self.batch_size, self.workers, pin),
                                        self.device)
        r = knn_evaluate(train_f, train_y, val_f, val_y, self.num_classes, (self.k,), self.T)[self.k]
        return {"knn_top1": r["top1"], "knn_top5": r["top5"]}


def folder_monitor(root: str | Path, image_size: int, batch_size: int, device: torch.device, workers: int = 0,
                   k: int = 200, T: float = 0.07, transform: Callable | None = None,
                   subset: int | None = None) -> KNNMonitor:
    """A KNNMonitor over ROOT/train and ROOT/val class folders (the layout main_knn.py reads), or
    Fashion-MNIST. `subset`: at most that many bank images and a fifth as many queries, drawn once
    with a fixed seed - an online curve at a fraction of a full evaluation's cost."""
    from .probe import eval_transform, linear_eval_datasets

    tf = transform or eval_transform(image_size)
    train, val, classes = linear_eval_datasets(root, tf, tf)
    if subset:
        g = torch.Generator().manual_seed(0)
        train = Subset(train, torch.randperm(len(train), generator=g)[:subset].tolist())
        val = Subset(val, torch.randperm(len(val), generator=g)[: max(1, subset // 5)].tolist())
    return KNNMonitor(train, val, len(classes), batch_size, device, workers, k, T)
