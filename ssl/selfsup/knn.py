"""Frozen features, exactly once per sample on any number of processes, and weighted k-NN.

The k-NN classifier is the non-parametric one of InstDisc (Wu et al., "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", CVPR 2018, Sec. 3.4), used the same way by
DINO's eval_knn.py: features are L2-normalised, each test sample takes its k most similar
training samples (cosine similarity s), each neighbour votes for its class with weight
exp(s / T), and the class scores are the summed votes.

Exactness under DDP: `ShardSampler` gives each process a contiguous, disjoint block of the
dataset (no padding, no dropped samples), so every sample is seen exactly once and gathering
the blocks in rank order restores dataset order. Results equal those of one process for any
dataset size and any number of processes.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from .distributed import all_reduce_sum, concat_all_gather, get_rank, get_world_size
from .meters import accuracy
from .data.sampler import ShardSampler, shard_range
from .stopping import ignore_stop_signals

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Exact sharding
# ----------------------------------------------------------------------------------------------


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader over this process's `ShardSampler` block of `dataset`; `batch_size` per process."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset)),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,  # a Ctrl-C is the main process's to handle
    )


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (n_r x ...) from every process in rank order; n_r may differ between
    processes (even be 0). Identity at world size 1."""
    world_size = get_world_size()
    if world_size == 1:
        return x
    sizes = concat_all_gather(torch.tensor([x.shape[0]], device=x.device))  # world_size
    largest = int(sizes.max())
    padded = torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    everything = concat_all_gather(padded)  # (world_size * largest) x ...
    return torch.cat([everything[r * largest : r * largest + int(sizes[r])] for r in range(world_size)])


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


def _check_exact_loader(loader: DataLoader) -> None:
    sampler = loader.sampler
    if isinstance(sampler, ShardSampler):
        if sampler.n != len(loader.dataset) or sampler.num_replicas != get_world_size():
            raise ValueError(
                f"the loader's ShardSampler covers {sampler.n} samples over {sampler.num_replicas} processes, "
                f"but the dataset has {len(loader.dataset)} and there are {get_world_size()} processes"
            )
        return
    if isinstance(sampler, SequentialSampler) and get_world_size() == 1:
        return
    raise ValueError(
        f"extract_features needs a loader that visits every sample once in dataset order: one built by "
        f"selfsup.knn.make_eval_loader (a ShardSampler), or an unshuffled loader on a single process; "
        f"got a {type(sampler).__name__} on {get_world_size()} process(es). A DistributedSampler pads "
        "(duplicates samples) and a shuffled loader loses the order."
    )


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: DataLoader, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of `loader.dataset`, in dataset order, on every process.

    Args:
        backbone: maps a batch N x 3 x H x W to features N x D (e.g. a network whose head is
            nn.Identity(), or `selfsup.backbones.Features(net)`). It runs in eval mode (BatchNorm uses
            its running statistics); its previous mode is restored afterwards.
        loader: from `make_eval_loader` (or unshuffled, on one process). Its batches are
            (images, labels, ...) as ImageDataset or torchvision's ImageFolder give them.
        device: where the backbone runs; the results stay there.

    Returns:
        features: N x D float32, not normalised; labels: N int64. Each sample is computed once
        by one process and the blocks are gathered, so every process gets the same tensors as a
        single process would. Works without a process group (world size 1). Items an
        ImageDataset marks as replacements of unreadable files are left out (and counted).
    """
    _check_exact_loader(loader)
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    replaced: list[torch.Tensor] = []
    try:
        for batch in loader:
            images, target = batch[0], batch[1]
            feats.append(backbone(images.to(device, non_blocking=True)).float().flatten(1))  # B x D
            labels.append(torch.as_tensor(target).to(device=device, dtype=torch.long))
            # ImageDataset's third value: 1 where the item's own file was unreadable
            replaced.append(torch.as_tensor(batch[2] if len(batch) > 2 else torch.zeros(len(target))).to(device).bool())
    finally:
        backbone.train(was_training)
    # A process with an empty block still has to take part in the gathers with the right width.
    dim = torch.tensor([feats[0].shape[1] if feats else -1], device=device)
    dim = int(concat_all_gather(dim).max())
    if dim < 0:  # the dataset is empty
        raise ValueError("extract_features: the dataset has no samples")
    local = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    local_replaced = torch.cat(replaced) if replaced else torch.zeros(0, dtype=torch.bool, device=device)
    features, all_labels = gather_rows(local), gather_rows(local_labels)
    all_replaced = gather_rows(local_replaced.to(torch.uint8)).bool()
    if features.shape[0] != len(loader.dataset):
        raise RuntimeError(
            f"extract_features gathered {features.shape[0]} rows for a dataset of {len(loader.dataset)} samples"
        )
    if all_replaced.any():  # unreadable files: left out, so that every readable image counts once
        if get_rank() == 0:
            logger.warning("left out %d unreadable image(s) of %d", int(all_replaced.sum()), len(all_replaced))
        return features[~all_replaced], all_labels[~all_replaced]
    return features, all_labels


# ----------------------------------------------------------------------------------------------
# Weighted k-NN
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    T: float = 0.07,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-NN on L2-normalised features (InstDisc, DINO).

    Args:
        train_features: N x D, train_labels: N (0 <= label < num_classes), test_features: M x D.
            Features are L2-normalised here (normalising twice changes nothing).
        k: neighbours per test sample (at most N are used). T: temperature of the vote weights.
        chunk_size: test rows per similarity block; by default blocks of about 2^26 similarities
            (256 MB in float32), so e.g. 60k x 10k runs in a few hundred MB.

    Returns:
        predictions: M, the class with the largest score (the lowest class index on a tie);
        scores: M x num_classes, the summed weights exp(similarity / T) of the k neighbours.
    """
    n, m = train_features.shape[0], test_features.shape[0]
    if train_labels.shape != (n,):
        raise ValueError(f"train_labels has shape {tuple(train_labels.shape)}, expected ({n},)")
    if n == 0:
        raise ValueError("knn_classify: no training samples")
    if k < 1 or T <= 0:
        raise ValueError(f"knn_classify needs k >= 1 and T > 0; got k={k}, T={T}")
    train_labels = train_labels.to(train_features.device, torch.long)
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(
            f"training labels must lie in [0, {num_classes}); got [{int(train_labels.min())}, "
            f"{int(train_labels.max())}] (unlabelled images have label -1)"
        )
    k = min(k, n)
    chunk_size = chunk_size or max(1, (1 << 26) // n)
    train = F.normalize(train_features.float(), dim=1)  # N x D
    scores = torch.zeros(m, num_classes, dtype=torch.float32, device=train.device)
    for start in range(0, m, chunk_size):
        query = F.normalize(test_features[start : start + chunk_size].to(train.device).float(), dim=1)  # c x D
        similarity = query @ train.T  # c x N
        top_sim, top_idx = similarity.topk(k, dim=1)  # c x k
        weights = (top_sim / T).exp()  # c x k
        scores[start : start + chunk_size].scatter_add_(1, train_labels[top_idx], weights)
    return scores.argmax(dim=1), scores


@torch.no_grad()
def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (200,),
    T: float = 0.07,
    chunk_size: int | None = None,
) -> dict[int, dict[str, float]]:
    """Top-1/top-5 k-NN accuracy over the whole test set for each k in `ks`.

    Every process passes the full (gathered) features; each classifies its `shard_range` block
    of the test rows and the correct counts are summed over processes, so the figures are those
    of one process. Returns {k: {"top1", "top5" (percent), "correct1", "correct5", "n"}}.
    """
    m = test_features.shape[0]
    if max(ks) > train_features.shape[0] and get_rank() == 0:
        logger.warning("k=%d is more than the %d images of the bank: every bank image votes for every query, so the "
                       "kNN measures little; use a smaller k (--k, --knn-k)", max(ks), train_features.shape[0])
    start, end = shard_range(m, get_world_size(), get_rank())
    results = {}
    for k in ks:
        _, scores = knn_classify(train_features, train_labels, test_features[start:end], num_classes, k, T,
                                 chunk_size)
        correct1, correct5 = accuracy(scores, test_labels[start:end].to(scores.device), topk=(1, 5))
        counts = all_reduce_sum(torch.stack([correct1, correct5]).to(torch.float64))
        results[k] = {
            "top1": 100.0 * counts[0].item() / m,
            "top5": 100.0 * counts[1].item() / m,
            "correct1": int(counts[0].item()),
            "correct5": int(counts[1].item()),
            "n": m,
        }
    return results
