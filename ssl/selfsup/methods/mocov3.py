"""MoCo v3."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import feature_dim, set_head
from ..backbones import vit as vit_family
from ..accumulation import Accumulation
from ..config import SMALL_IMAGE
from ..losses import at_least_fp32, full_precision, infonce_against
from ..networks import build_mlp, convert_split_batchnorm, freeze
from .base import MomentumMethod, Plan


@dataclass
class MoCoV3Plan(Plan):
    k1: torch.Tensor  # the first view's keys of every (virtual) process, (world x N) x dim, normalised
    k2: torch.Tensor  # the second view's


class MoCoV3(MomentumMethod):
    """MoCo v3: a query encoder (backbone + projector) with a predictor, and a momentum encoder
    (backbone + projector) as an exponential moving average of it; no queue - the keys are the
    other view's, from every process.

    Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV
    2021 (arXiv:2104.02057); facebookresearch/moco-v3.

    `encoder_q` is the backbone with the projector in its head's place (so `module.encoder_q.*`
    feeds linear evaluation and detection as for the other methods), `predictor` the predictor,
    `encoder_k` the momentum encoder, which never receives gradients. The MLPs are moco-v3's:
    Linear without bias, BN, ReLU; the projector has 2 layers on a ResNet and 3 on a ViT, its
    output a BN without affine parameters; the predictor has 2 layers and keeps that output BN on a
    ViT only. `forward(x1, x2)` returns ctr(q1, k2) + ctr(q2, k1), each a cross-entropy of the
    queries against the keys of all processes scaled by 2T (losses.infonce_against). The
    momentum rises from `m` to 1 along a cosine over training with `m_cos` (moco-v3's --moco-m-cos).
    `bn_splits` > 1 normalises both encoders' BatchNorm2d layers over that many sub-batches.
    """

    name = "mocov3"
    # moco-v3's ResNet-50 recipe: main_moco.py's defaults (LARS, lr 0.6 x B/256, wd 1e-6, 10 warmup
    # epochs, cosine, 100 epochs, m 0.99, T 1.0; every ResNet built with zero_init_residual=True) with
    # CONFIG.md's --moco-m-cos --crop-min=.2.
    defaults = {"moco_dim": 256, "mlp_dim": 4096, "moco_m": 0.99, "moco_t": 1.0, "moco_m_cos": True,
                "aug": "mocov3_resnet", "zero_init_residual": True, "optimizer": "lars", "lr_per_256": 0.6,
                "wd": 1e-6, "warmup_epochs": 10, "cos": True, "epochs": 100}
    networks = ("encoder_q", "encoder_k", "predictor")
    flag_options = {"moco_dim": "dim", "mlp_dim": "mlp_dim", "moco_m": "m", "moco_t": "T", "moco_m_cos": "m_cos",
                    "bn_splits": "bn_splits"}
    run_defining = ("moco_dim", "mlp_dim", "moco_m", "moco_t", "moco_m_cos", "bn_splits", "stop_grad_conv1")
    _RESNET = {"arch": "resnet50", "batch_size": 4096, "optimizer": "lars", "lr_per_256": 0.6, "wd": 1e-6,
               "warmup_epochs": 10, "cos": True, "moco_dim": 256, "mlp_dim": 4096, "moco_m": 0.99,
               "moco_m_cos": True, "moco_t": 1.0, "aug": "mocov3_resnet", "sync_bn": True}
    _VIT = {"epochs": 300, "batch_size": 4096, "optimizer": "adamw", "lr_per_256": 1.5e-4, "wd": 0.1,
            "warmup_epochs": 40, "cos": True, "moco_dim": 256, "mlp_dim": 4096, "moco_m": 0.99, "moco_m_cos": True,
            "moco_t": 0.2, "stop_grad_conv1": True, "aug": "byol", "sync_bn": True, "wd_exclude": "none"}
    presets = {
        # moco-v3's CONFIG.md: ResNet-50 with `--moco-m-cos --crop-min=.2` on top of main_moco.py's defaults.
        "mocov3-resnet50": {
            **_RESNET, "title": "MoCo v3 ResNet-50", "epochs": 100,
            "source": "facebookresearch/moco-v3 CONFIG.md, ResNet-50 100-epoch (main_moco.py defaults, "
                      "--moco-m-cos --crop-min=.2)",
            "reported": "68.9%, ResNet-50, 100 epochs, batch 4096 (moco-v3 CONFIG.md)",
        },
        "mocov3-resnet50-300ep": {
            **_RESNET, "title": "MoCo v3 ResNet-50", "epochs": 300, "lr_per_256": 0.3,
            "source": "facebookresearch/moco-v3 CONFIG.md, ResNet-50 300-epoch (--lr=.3 --epochs=300)",
            "reported": "72.8%, ResNet-50, 300 epochs, batch 4096 (moco-v3 CONFIG.md)",
        },
        "mocov3-resnet50-1000ep": {
            **_RESNET, "title": "MoCo v3 ResNet-50", "epochs": 1000, "lr_per_256": 0.3, "wd": 1.5e-6,
            "moco_m": 0.996,
            "source": "facebookresearch/moco-v3 CONFIG.md, ResNet-50 1000-epoch (--lr=.3 --wd=1.5e-6 --moco-m=0.996)",
            "reported": "74.6%, ResNet-50, 1000 epochs, batch 4096 (moco-v3 CONFIG.md)",
        },
        # ViTs: moco-v3's vits.py vit_small / vit_base (12 heads both), AdamW decaying every
        # parameter as its main_moco.py builds it (AdamW(model.parameters(), ...)).
        "mocov3-vit-small": {
            **_VIT, "title": "MoCo v3 ViT-Small", "arch": "vit_small",
            "source": "facebookresearch/moco-v3 CONFIG.md, ViT-Small 4-node (32-GPU) pre-training",
            "reported": "73.2%, ViT-Small, 300 epochs, batch 4096 (moco-v3 CONFIG.md)",
        },
        "mocov3-vit-small-b1024": {
            **_VIT, "title": "MoCo v3 ViT-Small", "arch": "vit_small", "batch_size": 1024,
            "source": "facebookresearch/moco-v3 CONFIG.md, ViT-Small 1-node (8-GPU) 1024-batch pre-training",
            "reported": "not reported (moco-v3 gives it for ease of debugging)",
        },
        "mocov3-vit-base": {
            **_VIT, "title": "MoCo v3 ViT-Base", "arch": "vit_base",
            "source": "facebookresearch/moco-v3 CONFIG.md, ViT-Base 8-node (64-GPU) pre-training",
            "reported": "76.7%, ViT-Base, 300 epochs, batch 4096 (moco-v3 CONFIG.md)",
        },
        # Fashion-MNIST: the ResNet-18 recipe of the other small presets with SGD (LARS at the
        # papers' trust coefficient barely moves the weights in a few thousand steps), moco-v3's
        # T = 1 replaced by SimCLR's small-image 0.2, torchvision's init as measured (docs/RESULTS.md).
        "small-mocov3": {
            **SMALL_IMAGE, "title": "MoCo v3", "lr_per_256": 0.06, "optimizer": "sgd", "wd": 5e-4, "moco_dim": 128,
            "zero_init_residual": False,
            "mlp_dim": 1024, "moco_m": 0.99, "moco_m_cos": True, "moco_t": 0.2, "aug": "byol",
            "source": "MoCo v3 at the other small-image presets' scale (ResNet-18, SGD, batch 128)",
            "reported": "docs/RESULTS.md, Fashion-MNIST",
        },
    }
    demo = {"moco_dim": 128, "mlp_dim": 512, "moco_m": 0.99, "moco_t": 0.2, "aug": "byol", "optimizer": "sgd",
            "lr": 0.06, "warmup_epochs": 0.3}
    # moco-v3's main_lincls.py: SGD, lr x B/256 (its default 0.1 for ResNets; CONFIG.md's --lr=3 for
    # ViTs), wd 0, 90 epochs, cosine; the head is the family's (`fc` / `head`).
    linear = {"optimizer": "sgd", "lr_per_256": 0.1, "nesterov": False, "wd": 0.0, "cos": True, "schedule": [],
              "epochs": 90, "source": "facebookresearch/moco-v3's main_lincls.py defaults (ResNets)",
              "by_family": {"vit": {"lr_per_256": 3.0, "source": "facebookresearch/moco-v3 CONFIG.md, ViT "
                                                                 "linear classification (--lr=3)"}}}

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 256,
        mlp_dim: int = 4096,
        m: float = 0.99,
        T: float = 1.0,
        *,
        m_cos: bool = True,
        bn_splits: int = 1,
    ) -> None:
        super().__init__(m, m_cos)
        self.T = T
        self.encoder_q = base_encoder(num_classes=mlp_dim)
        is_vit = vit_family.owns(self.encoder_q)
        width = feature_dim(self.encoder_q)
        set_head(self.encoder_q, build_mlp(3 if is_vit else 2, width, mlp_dim, dim, last_norm="bn"))  # projector
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_norm="bn" if is_vit else None, last_bias=False)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # the same initial weights, as moco-v3 copies them
        freeze(self.encoder_k)
        # One process emulating per-device BatchNorm (bn_splits devices), as BYOL's and MoCo's do.
        convert_split_batchnorm(self.encoder_q, bn_splits)
        convert_split_batchnorm(self.encoder_k, bn_splits)

    def prepare(self, micro: list[list[torch.Tensor]], acc: Accumulation) -> MoCoV3Plan:
        """The momentum update, then the keys of both views of every micro-batch, gathered from
        every (virtual) process in rank order."""
        self._momentum_update_key_encoder()
        keys: list[list[torch.Tensor]] = [[], []]
        for j, views in enumerate(micro):
            with acc.micro(j, self.encoder_k):
                for view, out in zip(views, keys):
                    k = self.encoder_k(view)  # N x dim
                    with full_precision(k):
                        out.append(F.normalize(at_least_fp32(k), dim=1))
        return MoCoV3Plan(acc, acc.gather(keys[0]), acc.gather(keys[1]))

    def objective(self, views: list[torch.Tensor], plan: MoCoV3Plan, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x1, x2: N x 3 x H x W, two views: ctr(q1, k2) + ctr(q2, k1), the keys of every process."""
        x1, x2 = views
        q1 = self.predictor(self.encoder_q(x1))  # N x dim
        q2 = self.predictor(self.encoder_q(x2))
        if j == 0:
            self.last_z = F.normalize(q1.detach().float(), dim=1)
        first = plan.acc.rank(j) * q1.shape[0]  # this micro-batch's positives among the gathered keys
        loss1, acc1 = infonce_against(q1, plan.k2, self.T, first)
        loss2, acc2 = infonce_against(q2, plan.k1, self.T, first)
        self.last_pretext = {k: (acc1[k] + acc2[k]) / 2 for k in acc1}  # the positive key among the global batch's
        loss = loss1 + loss2
        return loss, loss.detach()
