"""BYOL."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import byol_loss
from ..networks import build_mlp, convert_split_batchnorm, feature_dim, freeze
from .base import MomentumMethod


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
    defaults = {"moco_dim": 256, "mlp_dim": 4096, "moco_m": 0.996, "aug": "byol", "moco_m_cos": True}
    networks = ("encoder_q", "encoder_k", "predictor")
    flag_options = {"moco_dim": "dim", "mlp_dim": "hidden_dim", "moco_m": "m", "moco_m_cos": "m_cos",
                    "bn_splits": "bn_splits"}

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
        self.encoder_q.fc = build_mlp(2, feature_dim(self.encoder_q), hidden_dim, dim)
        self.predictor = build_mlp(2, dim, hidden_dim, dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        freeze(self.encoder_k)
        convert_split_batchnorm(self.encoder_q, bn_splits)
        convert_split_batchnorm(self.encoder_k, bn_splits)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, return_loss: bool = True) -> torch.Tensor:
        """x1, x2: N x 3 x H x W, two views. Returns the loss (whatever `return_loss` says)."""
        z1 = self.encoder_q(x1)  # N x dim
        z2 = self.encoder_q(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        self.last_z = F.normalize(z1.detach(), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            t1, t2 = self.encoder_k(x1), self.encoder_k(x2)
        return byol_loss(p1, t2).mean() + byol_loss(p2, t1).mean()
