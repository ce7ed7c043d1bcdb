"""BYOL."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..accumulation import Accumulation
from ..config import SMALL_IMAGE
from ..losses import byol_loss
from ..backbones import feature_dim, set_head
from ..networks import build_mlp, convert_split_batchnorm, freeze
from .base import MomentumMethod, Plan


@dataclass
class BYOLPlan(Plan):
    targets: list[tuple[torch.Tensor, torch.Tensor]]  # each micro-batch's target projections of both views


class BYOL(MomentumMethod):
    """Bootstrap Your Own Latent: an online network with a predictor regresses the projections
    of a target network that is an exponential moving average of the online one.

    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020 (arXiv:2006.07733).

    `encoder_q` is the online backbone + projector, `predictor` the online predictor and
    `encoder_k` the target (backbone + projector), which never receives gradients.
    `forward(x1, x2)` returns the symmetric loss: mean(2 - 2cos) over each view order, summed.
    The momentum rises from `m` to 1 along a cosine over training unless `m_cos=False`.
    """

    name = "byol"
    # deepmind-research's byol: main_loop.py (1000 epochs) and configs/byol.py's presets for them
    # (LARS, lr 0.2 x B/256, wd 1.5e-6, 10 warmup epochs, cosine, EMA 0.996).
    defaults = {"moco_dim": 256, "mlp_dim": 4096, "moco_m": 0.996, "aug": "byol", "moco_m_cos": True,
                "optimizer": "lars", "lr_per_256": 0.2, "wd": 1.5e-6, "warmup_epochs": 10, "cos": True, "epochs": 1000}
    networks = ("encoder_q", "encoder_k", "predictor")
    pretext = {"cos": "cos(p, z')"}  # the predictions' cosine agreement with the targets, both views
    flag_options = {"moco_dim": "dim", "mlp_dim": "hidden_dim", "moco_m": "m", "moco_m_cos": "m_cos",
                    "bn_splits": "bn_splits"}
    run_defining = ("moco_dim", "mlp_dim", "moco_m", "moco_m_cos", "bn_splits")
    presets = {
        "byol": {
            "title": "BYOL", "arch": "resnet50", "epochs": 1000, "batch_size": 4096, "lr_per_256": 0.2,
            "wd": 1.5e-6, "optimizer": "lars", "warmup_epochs": 10, "cos": True, "moco_dim": 256,
            "mlp_dim": 4096, "moco_m": 0.996, "moco_m_cos": True, "aug": "byol", "sync_bn": True,
            "source": "Grill et al. 2020 (arXiv:2006.07733), Sec. 3.2 and Appendix C",
            "reported": "74.3%, ResNet-50, 1000 epochs, batch 4096",
        },
        # SGD as MoCo (lightly's CIFAR BYOL: lr 0.06 at batch 128, wd 5e-4): with solo-learn's CIFAR
        # LARS (lr 1.0 x B/256, eta 0.02, wd 1e-5) the online kNN on Fashion-MNIST was 59.4 / 60.9 /
        # 62.2 after epochs 1-3, with this recipe 66.9 after the first (same machine and monitor; one
        # seed, not an ablation).
        "small-byol": {
            **SMALL_IMAGE, "title": "BYOL", "lr_per_256": 0.12, "optimizer": "sgd", "wd": 5e-4,
            "moco_dim": 128, "mlp_dim": 1024, "moco_m": 0.99, "moco_m_cos": True, "aug": "byol",
            "source": "BYOL with lightly's CIFAR optimiser (SGD), at batch 128",
            "reported": "docs/RESULTS.md, Fashion-MNIST",
        },
    }
    demo = {"lr": 0.2, "optimizer": "lars", "wd": 1.5e-6, "mlp_dim": 512, "moco_dim": 128}
    linear = {"optimizer": "sgd", "lr_per_256": 0.2, "nesterov": True, "wd": 0.0, "cos": True, "schedule": [],
              "epochs": 80, "source": "deepmind-research's byol/configs/eval.py (Grill et al. 2020, Appendix C)"}

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 256,
        hidden_dim: int = 4096,
        m: float = 0.996,
        *,
        m_cos: bool = True,
        bn_splits: int = 1,
    ) -> None:
        super().__init__(m, m_cos)
        self.encoder_q = base_encoder(num_classes=dim)
        set_head(self.encoder_q, build_mlp(2, feature_dim(self.encoder_q), hidden_dim, dim))  # the projector
        self.predictor = build_mlp(2, dim, hidden_dim, dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        freeze(self.encoder_k)
        convert_split_batchnorm(self.encoder_q, bn_splits)
        convert_split_batchnorm(self.encoder_k, bn_splits)

    def prepare(self, micro: list[list[torch.Tensor]], acc: Accumulation) -> BYOLPlan:
        """The momentum update, then the target network's projections of every micro-batch's views."""
        self._momentum_update_key_encoder()
        targets = []
        for j, (x1, x2) in enumerate(micro):
            with acc.micro(j, self.encoder_k):
                targets.append((self.encoder_k(x1), self.encoder_k(x2)))  # N x dim each
        return BYOLPlan(acc, targets)

    def objective(self, views: list[torch.Tensor], plan: BYOLPlan, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x1, x2: N x 3 x H x W, two views: the symmetric loss against the targets of the other view."""
        x1, x2 = views
        z1 = self.encoder_q(x1)  # N x dim
        z2 = self.encoder_q(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if j == 0:
            self.last_z = F.normalize(z1.detach(), dim=1)
        t1, t2 = plan.targets[j]
        loss = byol_loss(p1, t2).mean() + byol_loss(p2, t1).mean()
        # Its pretext task: predict the target's projection; each term is 2 - 2 cos(p, z').
        self.last_pretext = {"cos": 1 - loss.detach() / 4}
        return loss, loss.detach()
