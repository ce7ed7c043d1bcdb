"""SimCLR."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import nt_xent
from ..networks import build_mlp, convert_split_batchnorm, feature_dim
from .base import Method


class SimCLR(Method):
    """A Simple Framework for Contrastive Learning: one encoder with a projection MLP and the
    NT-Xent loss over the global batch (negatives come from every process).

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020 (arXiv:2002.05709).

    As google-research/simclr's code, which the paper's numbers come from: the projection head's
    last layer is a Linear without bias followed by a BatchNorm with a scale and no shift
    (`center=False`), and the loss is the sum of the two directions' mean cross-entropies
    (`loss_a + loss_b` in its objective.py): twice the mean over the 2N anchors of NT-Xent
    (selfsup.losses.nt_xent, the paper's formula). The factor is kept because LARS and weight
    decay do not ignore it: the trust ratio eta |w| / |g + wd w| balances the gradient against
    the decay, and biases and BatchNorm parameters (no trust ratio) take steps proportional to it.
    """

    name = "simclr"
    # classic_momentum: its LARS puts the learning rate inside the momentum (selfsup.optim.LARS).
    defaults = {"moco_dim": 128, "mlp_dim": 2048, "moco_t": 0.1, "aug": "simclr", "classic_momentum": True}
    flag_options = {"moco_dim": "dim", "mlp_dim": "hidden_dim", "moco_t": "T", "bn_splits": "bn_splits"}

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        hidden_dim: int = 2048,
        T: float = 0.1,
        *,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        self.T = T
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_q.fc = build_mlp(2, feature_dim(self.encoder_q), hidden_dim, dim, last_norm="bn_scale")
        convert_split_batchnorm(self.encoder_q, bn_splits)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, return_loss: bool = True) -> torch.Tensor:
        """x1, x2: N x 3 x H x W, two views. Returns the loss (whatever `return_loss` says):
        2 x NT-Xent's mean over the 2N anchors of the global batch, as SimCLR's code computes it."""
        n = x1.shape[0]
        # Both views in one batch, as SimCLR's own code: BatchNorm sees all 2N samples.
        z = self.encoder_q(torch.cat([x1, x2], dim=0))  # 2N x dim
        z1, z2 = z[:n], z[n:]
        self.last_z = F.normalize(z1.detach(), dim=1)
        return 2 * nt_xent(z1, z2, self.T, distributed=True)
