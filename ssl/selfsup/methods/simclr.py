"""SimCLR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..accumulation import Accumulation
from ..config import SMALL_IMAGE
from ..distributed import all_reduce_sum
from ..losses import at_least_fp32, full_precision, nt_xent, nt_xent_of
from ..backbones import feature_dim, set_head
from ..networks import build_mlp, convert_split_batchnorm
from .base import Method, Plan


@dataclass
class SimCLRPlan(Plan):
    grads: list[torch.Tensor] | None = None  # K > 1: each micro-batch's d(loss)/d(embeddings), 2N x dim
    losses: list[torch.Tensor] | None = None  # and its loss over the global batch
    accuracy: list[dict[str, torch.Tensor]] | None = None  # and its pretext accuracy


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
    # google-research/simclr tf2/run.py's defaults: LARS, lr 0.3 x B/256, wd 1e-6, 10 warmup epochs,
    # cosine, 100 epochs, T 0.1; classic_momentum: its LARS puts the learning rate inside the
    # momentum (selfsup.optim.LARS).
    defaults = {"moco_dim": 128, "mlp_dim": 2048, "moco_t": 0.1, "aug": "simclr", "classic_momentum": True,
                "optimizer": "lars", "lr_per_256": 0.3, "wd": 1e-6, "warmup_epochs": 10, "cos": True, "epochs": 100}
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
    # The embedded demo's method (selfsup.recipes.DEMO_METHOD): at batch 64 for 5 epochs (180
    # steps, about a minute on 2 cores) its loss falls and Acc@1 and the online kNN rise every
    # epoch or two, the kNN above the random network's (docs/EVALUATION.md, "The demo, measured").
    demo = {"lr": 0.3, "optimizer": "lars", "wd": 1e-6, "mlp_dim": 512, "moco_t": 0.2, "batch_size": 64, "epochs": 5}
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

    def prepare(self, micro: list[list[torch.Tensor]], acc: Accumulation) -> SimCLRPlan:
        """Nothing for one micro-batch. For K > 1 the embedding-gradient cache (Gao et al. 2021,
        "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): every
        micro-batch's embeddings without gradient, gathered from every (virtual) process; the loss
        of each of this process's micro-batches over that global batch and its gradient with respect
        to every embedding, summed over processes (what the gather's backward sums); each
        micro-batch's slice of it, which `objective` backpropagates through a second forward pass."""
        if acc.k == 1:
            return SimCLRPlan(acc)
        n = micro[0][0].shape[0]
        z1s, z2s = [], []
        for j, (x1, x2) in enumerate(micro):
            with acc.micro(j, self.encoder_q, keep_statistics=True):  # the second pass updates them
                z = self.encoder_q(torch.cat([x1, x2], dim=0))  # 2N x dim
            z1s.append(z[:n])
            z2s.append(z[n:])
        z1_all = at_least_fp32(acc.gather(z1s)).requires_grad_()  # (world x N) x dim
        z2_all = at_least_fp32(acc.gather(z2s)).requires_grad_()
        with torch.enable_grad():
            out = [nt_xent_of(z1_all, z2_all, acc.rank(j) * n, n, self.T) for j in range(len(micro))]
            losses = [2 * loss for loss, _ in out]
            g1, g2 = torch.autograd.grad(sum(losses), [z1_all, z2_all])
        g1, g2 = all_reduce_sum(g1), all_reduce_sum(g2)  # d(the loss of every process) / d(embeddings)
        rows = [slice(acc.rank(j) * n, (acc.rank(j) + 1) * n) for j in range(len(micro))]
        return SimCLRPlan(acc, [torch.cat([g1[r], g2[r]]) for r in rows], [loss.detach() for loss in losses],
                          [accuracy for _, accuracy in out])

    def objective(self, views: list[torch.Tensor], plan: SimCLRPlan, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x1, x2: N x 3 x H x W, two views: 2 x NT-Xent's mean over the 2N anchors of the global
        batch, as SimCLR's code computes it - or, from the cache, a surrogate whose gradient with
        respect to the embeddings is the cached one."""
        x1, x2 = views
        n = x1.shape[0]
        # Both views in one batch, as SimCLR's own code: BatchNorm sees all 2N samples.
        z = self.encoder_q(torch.cat([x1, x2], dim=0))  # 2N x dim
        if j == 0:
            self.last_z = F.normalize(z[:n].detach(), dim=1)
        if plan.grads is None:
            loss, self.last_pretext = nt_xent(z[:n], z[n:], self.T, distributed=True, with_accuracy=True)
            return 2 * loss, 2 * loss.detach()
        self.last_pretext = plan.accuracy[j]
        with full_precision(z):
            surrogate = (at_least_fp32(z) * plan.grads[j]).sum()
        return surrogate, plan.losses[j]
