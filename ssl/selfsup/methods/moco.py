"""MoCo v1/v2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..accumulation import Accumulation
from ..config import SMALL_IMAGE
from ..distributed import broadcast
from ..losses import at_least_fp32, full_precision, pretext_accuracy
from ..backbones import feature_dim, get_head, set_head
from ..networks import convert_split_batchnorm
from .base import MomentumMethod, Plan


@dataclass
class MoCoPlan(Plan):
    keys: list[torch.Tensor]  # each micro-batch's keys, N x dim
    all_keys: torch.Tensor  # every (virtual) process's keys in rank order, (world x N) x dim
    queue: torch.Tensor  # the queue at the start of the step, dim x K


def _forget_host_queue_ptr(module: nn.Module, incompatible_keys) -> None:
    """After a load, MoCo re-reads its queue pointer from the buffer (a function, not a lambda,
    so the model still pickles)."""
    module._ptr = None


def _fitting_queue(num_images: int) -> int:
    """A queue well below the dataset size: the largest power of two at most a third of it."""
    return 1 << max(0, (num_images // 3).bit_length() - 1)


class MoCo(MomentumMethod):
    """Momentum Contrast: a query encoder, a momentum key encoder and a queue of negative keys.

    MoCo v1: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
    CVPR 2020 (arXiv:1911.05722). MoCo v2 (mlp=True plus stronger augmentation and a cosine
    schedule): Chen et al., arXiv:2003.04297.

    The constructor signature, attribute names and forward contract are those of
    facebookresearch/moco: `forward(im_q, im_k)` returns `(logits, labels)`; the engine asks for
    the loss with `return_loss=True`. Beyond it: any queue size K works (the queue wraps around),
    shuffle BN works on one process (`bn_splits`), and nothing requires CUDA or a process group.

    Args:
        base_encoder: constructor taking `num_classes`, e.g. torchvision.models.resnet50.
        dim: feature dimension. K: queue size. m: key-encoder momentum. T: softmax temperature.
        mlp: MoCo v2's 2-layer projection head.
        m_cos: raise m to 1 along a cosine over training (moco-v3's schedule; off in MoCo v1/v2).
        shuffle_bn: shuffle the key batch across processes before the key encoder (MoCo's
            shuffle BN). On a single process it only matters together with `bn_splits`.
        bn_splits: > 1 emulates that many devices on each process: both encoders normalise over
            `bn_splits` sub-batches and the keys are shuffled before being split.
        global_batch_size: if given, K is checked against it here rather than at the first step.
    """

    name = "moco"
    # facebookresearch/moco main_moco.py's defaults (MoCo v1).
    defaults = {"moco_dim": 128, "moco_k": 65536, "moco_m": 0.999, "moco_t": 0.07, "mlp": False, "aug": "moco_v1",
                "moco_m_cos": False}
    networks = ("encoder_q", "encoder_k")
    flag_options = {"moco_dim": "dim", "moco_k": "K", "moco_m": "m", "moco_t": "T", "mlp": "mlp",
                    "moco_m_cos": "m_cos", "shuffle_bn": "shuffle_bn", "bn_splits": "bn_splits",
                    "batch_size": "global_batch_size"}
    run_defining = ("moco_dim", "moco_k", "moco_m", "moco_t", "moco_m_cos", "mlp", "bn_splits", "shuffle_bn")
    presets = {
        "mocov1": {
            "title": "MoCo v1", "arch": "resnet50", "epochs": 200, "batch_size": 256, "lr": 0.03,
            "schedule": [120, 160], "wd": 1e-4, "moco_dim": 128, "moco_k": 65536, "moco_m": 0.999,
            "moco_t": 0.07, "mlp": False, "aug": "moco_v1", "cos": False,
            "source": "He et al. 2020 (arXiv:1911.05722) and facebookresearch/moco README",
            "reported": "60.6% (paper), 60.8% (facebookresearch/moco), ResNet-50, 200 epochs",
        },
        "mocov2": {
            "title": "MoCo v2", "arch": "resnet50", "epochs": 200, "batch_size": 256, "lr": 0.03,
            "wd": 1e-4, "moco_dim": 128, "moco_k": 65536, "moco_m": 0.999, "moco_t": 0.2,
            "mlp": True, "aug": "moco_v2", "cos": True,
            "source": "Chen et al. 2020 (arXiv:2003.04297); moco --mlp --moco-t 0.2 --aug-plus --cos",
            "reported": "67.5% (paper), 67.7% (facebookresearch/moco), ResNet-50, 200 epochs; 71.1% at 800 epochs",
        },
        # MoCo v2 for 60k small images and a few thousand steps; lr, K, m and T chosen by measurement.
        "small-moco": {
            **SMALL_IMAGE, "title": "MoCo v2", "lr_per_256": 0.06, "wd": 5e-4, "moco_dim": 128, "moco_k": 8192,
            "moco_m": 0.99, "moco_t": 0.2, "mlp": True, "aug": "moco_v2", "bn_splits": 8,
            "source": "MoCo v2 scaled to 60k images and a few thousand steps (lr, K, m, T chosen by measurement)",
            "reported": "docs/RESULTS.md, Fashion-MNIST",
        },
    }
    # The queue must stay well below the demo's 3,000 images, or it holds the positive's own older
    # keys as negatives; one process needs the shuffle-BN emulation (bn_splits), else BatchNorm lets
    # the keys be told apart by batch statistics. lr 0.06 without warmup drove the embeddings
    # towards one point (std 0.004) on this data; these settings keep them spread.
    demo = {"moco_k": 1024, "moco_m": 0.99, "moco_t": 0.2, "mlp": True, "aug": "moco_v2", "bn_splits": 8,
            "lr": 0.03, "warmup_epochs": 0.3}
    # main_lincls.py's defaults are these, as facebookresearch/moco's.
    linear = {"optimizer": "sgd", "lr": 30.0, "nesterov": False, "wd": 0.0, "cos": False, "schedule": [60, 80],
              "epochs": 100, "source": "facebookresearch/moco's main_lincls.py (He et al. 2020, Sec. 4.1)"}

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        *,
        m_cos: bool = False,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__(m, m_cos)
        if global_batch_size is not None and K < global_batch_size:
            raise ValueError(
                f"MoCo queue size K={K} is smaller than the global batch size {global_batch_size}: "
                "one step's keys would not fit in the queue. Use K >= the global batch size "
                f"(e.g. --moco-k {max(global_batch_size, 4096)}) or a smaller batch."
            )
        self.K = K
        self.T = T
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits

        # Construction order as facebookresearch/moco, so a seed gives the same initial weights.
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            dim_mlp = feature_dim(self.encoder_q)
            for encoder in (self.encoder_q, self.encoder_k):  # the classifier becomes the MLP's last layer
                set_head(encoder, nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), get_head(encoder)))
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False  # updated by momentum, never by gradients

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # dim x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # A host copy of queue_ptr: reading the buffer on a GPU every step would make the host
        # wait for the accelerator. Re-read once after construction and after every load.
        self._ptr: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_queue_ptr)

        convert_split_batchnorm(self.encoder_q, bn_splits)
        convert_split_batchnorm(self.encoder_k, bn_splits)

    def data_warnings(self, num_images: int) -> list[str]:
        if self.K < num_images:
            return []
        mib = self.queue.numel() * self.queue.element_size() / 2**20
        return [f"the MoCo queue holds {self.K} keys but the data has {num_images} images: each image's own older "
                f"keys sit in the queue as negatives, which contradicts the contrastive task (and the queue adds "
                f"{mib:.0f} MiB to every checkpoint); use --moco-k below {num_images}, e.g. {_fitting_queue(num_images)}"]

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """keys: (world x N) x dim, every process's in rank order (virtual processes under
        --accum-iter), written into the queue after its pointer."""
        batch = keys.shape[0]
        if batch > self.K:
            raise ValueError(
                f"MoCo queue size K={self.K} is smaller than the global batch size {batch}; "
                "use K >= the global batch size."
            )
        ptr = int(self.queue_ptr) if self._ptr is None else self._ptr
        end = ptr + batch
        keys = keys.to(self.queue.dtype)
        if end <= self.K:
            self.queue[:, ptr:end] = keys.T
        else:  # wrap around: fill the tail, then the head
            first = self.K - ptr
            self.queue[:, ptr:] = keys[:first].T
            self.queue[:, : batch - first] = keys[first:].T
        self.queue_ptr.fill_(end % self.K)
        self._ptr = end % self.K

    def _keys(self, im_ks: list[torch.Tensor], acc: Accumulation) -> list[torch.Tensor]:
        """Each micro-batch's keys (N x dim, normalised, float32 also under --amp), as each process
        of the run would compute them: with shuffle BN the key batches of every (virtual) process
        are gathered, permuted by rank 0's permutation (every process draws one, as each process of
        facebookresearch/moco's does), encoded in the permuted groups and put back in order."""
        world = acc.world_size
        shuffle_across = self.shuffle_bn and world > 1
        inputs = im_ks
        if shuffle_across:
            n = im_ks[0].shape[0]
            x_all = acc.gather(im_ks)  # (world x N) x ...
            perms = []
            for j in range(len(im_ks)):
                with acc.micro(j):
                    perms.append(torch.randperm(x_all.shape[0], device=x_all.device))
            perm = broadcast(perms[0], src=0)  # virtual rank 0's
            idx_unshuffle = torch.argsort(perm)
            inputs = [x_all[perm.view(world, n)[acc.rank(j)]] for j in range(len(im_ks))]
        keys = []
        for j, x in enumerate(inputs):
            with acc.micro(j, self.encoder_k):
                if self.bn_splits > 1 and self.shuffle_bn:
                    # Within the process: a fresh permutation so that each key sub-batch holds other
                    # samples than the matching query sub-batch.
                    perm = torch.randperm(x.shape[0], device=x.device)
                    k = self.encoder_k(x[perm])[torch.argsort(perm)]
                else:
                    k = self.encoder_k(x)
            with full_precision(k):
                keys.append(F.normalize(at_least_fp32(k), dim=1))  # N x dim
        if shuffle_across:
            k_all = acc.gather(keys)
            keys = [k_all[idx_unshuffle.view(world, n)[acc.rank(j)]] for j in range(len(keys))]
        return keys

    def prepare(self, micro: list[list[torch.Tensor]], acc: Accumulation) -> MoCoPlan:
        """The momentum update, then every micro-batch's keys (`views[1]`, im_k) and the queue as
        it is at the start of the step, which every micro-batch's queries see."""
        self._momentum_update_key_encoder()
        keys = self._keys([views[1] for views in micro], acc)
        return MoCoPlan(acc, keys, acc.gather(keys), self.queue.clone().detach())

    def logits(self, im_q: torch.Tensor, plan: MoCoPlan, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch j's queries against its keys and the queue: logits N x (1+K) (positive in
        column 0, divided by T, float32 also under --amp) and labels N (all zero)."""
        q = self.encoder_q(im_q)  # N x dim
        with full_precision(q):
            q = F.normalize(at_least_fp32(q), dim=1)
            if j == 0:
                self.last_z = q.detach()
            l_pos = torch.einsum("nc,nc->n", [q, plan.keys[j]]).unsqueeze(-1)  # N x 1
            l_neg = torch.einsum("nc,ck->nk", [q, plan.queue])  # N x K
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # N x (1+K)
        return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    def objective(self, views: list[torch.Tensor], plan: MoCoPlan, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self.logits(views[0], plan, j)
        self.last_pretext = pretext_accuracy(logits, labels)  # the positive key among 1 + K candidates
        loss = F.cross_entropy(logits, labels)
        return loss, loss.detach()

    def finish(self, plan: MoCoPlan) -> None:
        """Enqueue every (virtual) process's keys, in rank order, once per step."""
        self._dequeue_and_enqueue(plan.all_keys)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor | None = None, return_loss: bool = False,
                plan: MoCoPlan | None = None, micro: int = 0):
        """im_q, im_k: N x 3 x H x W. Returns logits N x (1+K) (positive in column 0, divided by T)
        and labels N (all zero) - or, with `return_loss`, their cross-entropy, the training loss.
        The logits are float32 also under --amp (see selfsup.losses.full_precision). With `plan`
        (the engine): micro-batch `micro`'s (objective, loss)."""
        if plan is not None:
            return self.objective([im_q, im_k], plan, micro)
        with torch.no_grad():
            plan = self.prepare([[im_q, im_k]], Accumulation())
        logits, labels = self.logits(im_q, plan, 0)
        self.finish(plan)
        if return_loss:
            return F.cross_entropy(logits, labels)
        return logits, labels
