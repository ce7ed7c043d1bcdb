"""SimCLR."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import SMALL_IMAGE
from ..losses import nt_xent
from ..backbones import feature_dim, set_head
from ..networks import build_mlp, convert_split_batchnorm
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
    run_defining = ("moco_dim", "mlp_dim", "moco_t", "bn_splits")
    presets = {
        "simclr": {
            "title": "SimCLR", "arch": "resnet50", "epochs": 1000, "batch_size": 4096, "lr_per_256": 0.3,
            "wd": 1e-6, "optimizer": "lars", "warmup_epochs": 10, "cos": True, "moco_dim": 128,
            "mlp_dim": 2048, "moco_t": 0.1, "aug": "simclr", "sync_bn": True,
            "source": "Chen et al. 2020 (arXiv:2002.05709), Sec. 2.3 and Appendix B.1",
            "reported": "69.3%, ResNet-50, 1000 epochs, batch 4096",
        },
        # SimCLR keeps its own paper's LARS (google-research/simclr's form: the lr inside the
        # momentum, no clipping of the per-layer rate) with solo-learn's CIFAR settings (trust
        # coefficient 0.02, lr 0.4 x B/256, wd 1e-5) - not solo-learn's LARS, which clips the
        # per-layer rate at the lr and keeps the lr outside the momentum. With the papers' 0.001 a
        # step moves a weight by lr x 0.1% of its norm, too little for a few thousand steps.
        "small-simclr": {
            **SMALL_IMAGE, "title": "SimCLR", "lr_per_256": 0.4, "optimizer": "lars", "lars_eta": 0.02, "wd": 1e-5,
            "moco_dim": 128, "mlp_dim": 1024, "moco_t": 0.2, "aug": "simclr",
            "source": "SimCLR's LARS (classic momentum) with solo-learn's CIFAR settings (eta 0.02, "
                      "lr 0.4 x B/256, wd 1e-5), at batch 128",
            "reported": "docs/RESULTS.md, Fashion-MNIST",
        },
    }
    demo = {"lr": 0.3, "optimizer": "lars", "wd": 1e-6, "mlp_dim": 512, "moco_t": 0.2}
    linear = {"optimizer": "sgd", "lr_per_256": 0.1, "nesterov": True, "wd": 0.0, "cos": True, "schedule": [],
              "epochs": 90, "source": "google-research/simclr's linear evaluation (Chen et al. 2020, appendix)"}

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
        set_head(self.encoder_q, build_mlp(2, feature_dim(self.encoder_q), hidden_dim, dim, last_norm="bn_scale"))
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
