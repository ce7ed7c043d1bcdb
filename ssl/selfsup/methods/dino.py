"""DINO."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..accumulation import Accumulation
from ..backbones import feature_dim, forward_features, get_head, set_head
from ..backbones import vit as vit_family
from ..config import SMALL_IMAGE
from ..distributed import all_reduce_sum
from ..losses import at_least_fp32, full_precision
from ..networks import convert_split_batchnorm, freeze
from .base import MomentumMethod, Plan


class WeightNormLinear(nn.Module):
    """A Linear without bias whose weight is g * v / |v| row by row (Salimans and Kingma 2016),
    with the parameter names of torch.nn.utils.weight_norm that DINO's checkpoints hold
    (`weight_g`: out x 1, `weight_v`: out x in). Initialised as DINO's last layer: v a Linear's
    default initialisation, g = 1."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        v = nn.Linear(in_features, out_features, bias=False).weight.detach()
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # out x in
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINO's projection head (its vision_transformer.py DINOHead): an MLP of `nlayers` Linear
    layers (hidden_dim wide, GELU, optional BatchNorm) down to `bottleneck_dim`, L2 normalisation,
    and a weight-normalised last layer of `out_dim` prototypes whose norm is frozen at 1 with
    `norm_last_layer`. The MLP's Linear layers start trunc_normal(std .02) with zero bias."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers += ([nn.BatchNorm1d(d_out)] if use_bn else []) + [nn.GELU()]
        self.mlp = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor, embedding: bool = False):
        """x: N x in_dim -> N x out_dim logits (and, with `embedding`, the normalised bottleneck N x 256)."""
        z = F.normalize(self.mlp(x), dim=-1, p=2)
        out = self.last_layer(z)
        return (out, z) if embedding else out


def teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """DINO's teacher temperature at integer `epoch`: linear from `warmup` to `final` over the first
    `warmup_epochs` (np.linspace, both ends included), then `final` (main_dino.py DINOLoss)."""
    if epoch >= warmup_epochs:
        return final
    return warmup + (final - warmup) * (epoch / (warmup_epochs - 1) if warmup_epochs > 1 else 0.0)


@dataclass
class DINOPlan(Plan):
    targets: list[torch.Tensor]  # each micro-batch's teacher probabilities, 2 x N x out_dim (global crops)
    center_sum: torch.Tensor  # 1 x out_dim: the sum of this process's teacher outputs, all micro-batches
    count: int  # how many outputs that sum holds (2 global crops x samples)


class DINO(MomentumMethod):
    """DINO: self-distillation with no labels. A student (backbone + DINO head) sees every crop;
    a teacher, an exponential moving average of it updated after each optimizer step, sees the
    two global crops; the teacher's outputs, centred by an EMA of their batch mean over every
    process and sharpened by a low temperature, are the targets of the student's softmax at 0.1,
    in a cross-entropy over every pair of different views, averaged over the pairs.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
    (arXiv:2104.14294); facebookresearch/dino (main_dino.py, utils.py, vision_transformer.py).

    `encoder_q` is the student (its head DINOHead), `encoder_k` the teacher, which never receives
    gradients and is what DINO's evaluations read (`evaluated`). The backbone runs once per crop
    size (BatchNorm over each size group, DINO's MultiCropWrapper). Around the optimizer step, as
    main_dino.py: each parameter's gradient norm clipped at `clip_grad`, the last layer's
    gradients dropped during the first `freeze_last_layer` epochs, and the teacher's EMA after
    the step. The teacher temperature follows its warmup schedule by epoch, the momentum rises to
    1 along a cosine by step.
    """

    name = "dino"
    networks = ("encoder_q", "encoder_k")
    evaluated = "encoder_k"  # eval_knn.py / eval_linear.py take the teacher
    pretext = {"acc1": "Agree"}  # the student's top prototype is the teacher's, over the pairs of views
    # main_dino.py's defaults (its `vit_small` is DeiT-S: 6 heads, `deit_small` here).
    defaults = {"arch": "deit_small", "out_dim": 65536, "moco_dim": 256, "mlp_dim": 2048, "norm_last_layer": True,
                "use_bn_in_head": False,
                "moco_m": 0.996, "moco_m_cos": True, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04,
                "warmup_teacher_temp_epochs": 0, "optimizer": "adamw", "lr_per_256": 0.0005, "min_lr": 1e-6,
                "warmup_epochs": 10, "cos": True, "wd": 0.04, "weight_decay_end": 0.4, "wd_exclude": "bias-norm",
                "clip_grad": 3.0, "freeze_last_layer": 1, "epochs": 100, "drop_path_rate": 0.1, "vit_init": "dino",
                "aug": "dino", "local_crops_number": 8, "global_crops_scale": [0.4, 1.0],
                "local_crops_scale": [0.05, 0.4]}
    flag_options = {"out_dim": "out_dim", "moco_dim": "dim", "mlp_dim": "hidden_dim",
                    "norm_last_layer": "norm_last_layer", "use_bn_in_head": "use_bn",
                    "moco_m": "m", "moco_m_cos": "m_cos", "warmup_teacher_temp": "warmup_teacher_temp",
                    "teacher_temp": "teacher_temp", "warmup_teacher_temp_epochs": "warmup_teacher_temp_epochs",
                    "clip_grad": "clip_grad", "freeze_last_layer": "freeze_last_layer", "bn_splits": "bn_splits"}
    flags = (
        ("--out-dim", dict(type=int, help="DINO: prototypes of the head's last layer (default 65536)")),
        ("--norm-last-layer", dict(action=argparse.BooleanOptionalAction,
                                   help="DINO: the last layer's norm frozen at 1 (default; off: ViT-S only, its README)")),
        ("--use-bn-in-head", dict(action=argparse.BooleanOptionalAction, help="DINO: BatchNorm in the head's MLP")),
        ("--warmup-teacher-temp", dict(type=float, help="DINO: the teacher temperature's start (default 0.04)")),
        ("--teacher-temp", dict(type=float, help="DINO: the teacher temperature after its warmup (default 0.04)")),
        ("--warmup-teacher-temp-epochs", dict(type=int, help="DINO: epochs of that warmup (default 0)")),
        ("--clip-grad", dict(type=float, help="DINO: clip each parameter's gradient norm at this (default 3; 0: off)")),
        ("--freeze-last-layer", dict(type=int, help="DINO: epochs without updates of the last layer (default 1)")),
        ("--local-crops-number", dict(type=int, help="DINO: local crops per image (default 8)")),
        ("--local-crops-size", dict(type=int, help="DINO: their size (default 96 at 224 px, scaled with --image-size)")),
        ("--global-crops-scale", dict(type=float, nargs=2, help="DINO: the global crops' area range (0.4 1)")),
        ("--local-crops-scale", dict(type=float, nargs=2, help="DINO: the local crops' area range (0.05 0.4)")),
    )
    run_defining = ("out_dim", "moco_dim", "mlp_dim", "bn_splits", "norm_last_layer", "use_bn_in_head", "moco_m", "moco_m_cos", "warmup_teacher_temp",
                    "teacher_temp", "warmup_teacher_temp_epochs", "clip_grad", "freeze_last_layer", "local_crops_number",
                    "global_crops_scale", "local_crops_scale", "local_crops_size")
    _VIT_S = {"arch": "deit_small", "image_size": 224, "batch_size": 512, "amp": "fp16", "epochs": 100}
    presets = {
        # facebookresearch/dino README: `main_dino.py --arch vit_small` on 8 GPUs (64 images each), all
        # else main_dino.py's defaults (fp16, AdamW, 8 local crops).
        "dino-vit-small-100ep": {
            **_VIT_S, "title": "DINO ViT-S/16",
            "source": "facebookresearch/dino README, vanilla run: main_dino.py --arch vit_small, 8 GPUs x 64, "
                      "main_dino.py's defaults",
            "reported": "69.3% k-NN, 74.0% linear, ViT-S/16, 100 epochs (facebookresearch/dino README)",
        },
        # Its "boosting DINO performance" command: 300 epochs, teacher temperature 0.07 warmed up over
        # 30 epochs, no last-layer normalisation, on 2 nodes of 8 GPUs (64 images each).
        "dino-vit-small-300ep": {
            **_VIT_S, "title": "DINO ViT-S/16", "epochs": 300, "batch_size": 1024, "teacher_temp": 0.07,
            "warmup_teacher_temp_epochs": 30, "norm_last_layer": False,
            "source": "facebookresearch/dino README, boosted run: --epochs 300 --teacher_temp 0.07 "
                      "--warmup_teacher_temp_epochs 30 --norm_last_layer false, 16 GPUs x 64",
            "reported": "73.3% k-NN, 76.0% linear, ViT-S/16, 300 epochs (facebookresearch/dino README)",
        },
        # Its ResNet-50 command: SGD lr 0.03 (x B/256), weight decay 1e-4 throughout, tighter crops;
        # BatchNorm synchronised, as main_dino.py converts a network with BatchNorm.
        "dino-resnet50": {
            "title": "DINO ResNet-50", "arch": "resnet50", "image_size": 224, "batch_size": 512, "amp": "fp16",
            "epochs": 100, "optimizer": "sgd", "lr_per_256": 0.03, "wd": 1e-4, "weight_decay_end": 1e-4,
            "global_crops_scale": [0.14, 1.0], "local_crops_scale": [0.05, 0.14], "sync_bn": True,
            "source": "facebookresearch/dino README, ResNet-50: --arch resnet50 --optimizer sgd --lr 0.03 "
                      "--weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1 "
                      "--local_crops_scale 0.05 0.14, 8 GPUs x 64",
            "reported": "not given for this 100-epoch command (the README's released ResNet-50, trained with "
                        "other arguments: 67.5% k-NN, 75.3% linear)",
        },
        # Fashion-MNIST: the other small presets' ResNet-18 at 32 px with 2 global crops of 32 px and 6
        # local crops of 16 px; SGD as the ResNet-50 recipe, at the small presets' scale.
        "small-dino": {
            **SMALL_IMAGE, "title": "DINO", "optimizer": "sgd", "lr_per_256": 0.06, "wd": 5e-4,
            "weight_decay_end": 5e-4, "out_dim": 4096, "local_crops_number": 6, "local_crops_size": 16,
            "global_crops_scale": [0.4, 1.0], "local_crops_scale": [0.1, 0.4], "min_lr": 0.0,
            "teacher_temp": 0.04, "freeze_last_layer": 1, "use_bn_in_head": True,
            "source": "DINO at the other small-image presets' scale (ResNet-18, SGD, batch 128), multi-crop 2 x 32 "
                      "+ 6 x 16 px, BatchNorm in the head (without it the demo's bottleneck embeddings collapse to one "
                      "direction: std 0.0012 after 2 epochs against 0.026 with it)",
            "reported": "docs/RESULTS.md, Fashion-MNIST",
        },
    }
    demo = {"out_dim": 1024, "mlp_dim": 512, "use_bn_in_head": True, "local_crops_number": 4, "local_crops_size": 16,
            "optimizer": "sgd", "lr": 0.06, "wd": 5e-4, "weight_decay_end": 5e-4, "min_lr": 0.0, "warmup_epochs": 0.3}
    # eval_linear.py: SGD lr 0.001 x B/256, momentum 0.9, wd 0, cosine, 100 epochs; ViT-S: the cls
    # tokens of the last 4 blocks, ViT-B: the last block's cls token and its patch tokens' mean
    # (eval_linear.py's help of --n_last_blocks and --avgpool_patchtokens).
    linear = {"optimizer": "sgd", "lr_per_256": 0.001, "nesterov": False, "wd": 0.0, "cos": True, "schedule": [],
              "epochs": 100, "source": "facebookresearch/dino's eval_linear.py (lr 0.001 x B/256, 100 epochs, cosine)",
              "by_arch": {"deit_small": {"features": {"n_last_blocks": 4, "avgpool": False}},
                          "deit_small_p8": {"features": {"n_last_blocks": 4, "avgpool": False}},
                          "vit_base": {"features": {"n_last_blocks": 1, "avgpool": True}},
                          "vit_base_p8": {"features": {"n_last_blocks": 1, "avgpool": True}}}}

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        out_dim: int = 65536,
        m: float = 0.996,
        *,
        dim: int = 256,
        hidden_dim: int = 2048,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        m_cos: bool = True,
        bn_splits: int = 1,
    ) -> None:
        super().__init__(m, m_cos)
        self.encoder_q = base_encoder(num_classes=1)
        set_head(self.encoder_q, DINOHead(feature_dim(self.encoder_q), out_dim, use_bn, norm_last_layer,
                                          hidden_dim=hidden_dim, bottleneck_dim=dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)  # the same initial weights (main_dino.py copies them)
        if vit_family.owns(self.encoder_k):
            vit_family.set_drop_path(self.encoder_k, 0.0)  # the teacher is built without stochastic depth
        freeze(self.encoder_k)
        # One process emulating per-device BatchNorm (bn_splits devices), as the other methods'.
        convert_split_batchnorm(self.encoder_q, bn_splits)
        convert_split_batchnorm(self.encoder_k, bn_splits)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self.epoch = 0.0
        self.teacher_temp = teacher_temperature(0, *self.temps)

    def set_epoch(self, epoch: float) -> None:
        """The schedules by epoch: the teacher temperature of the integer epoch (main_dino.py)."""
        self.epoch = epoch
        self.teacher_temp = teacher_temperature(int(epoch), *self.temps)

    @staticmethod
    def _by_size(net: nn.Module, crops: list[torch.Tensor], embedding: bool = False):
        """DINO's MultiCropWrapper: the backbone once per run of crops of one size, then the head on
        every output at once. crops: V tensors of N x 3 x S_v x S_v -> (V*N) x out_dim."""
        outputs, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            outputs.append(forward_features(net, torch.cat(crops[start:end])))  # (run x N) x D
            start = end
        return get_head(net)(torch.cat(outputs), embedding=embedding)

    def prepare(self, micro: list[list[torch.Tensor]], acc: Accumulation) -> DINOPlan:
        """Every micro-batch's teacher outputs on its two global crops, centred with the center as it
        is at the start of the step and sharpened by the teacher temperature; their sum for the
        center's update (after the step's losses, in `finish`)."""
        targets, total, count = [], None, 0
        for j, views in enumerate(micro):
            with acc.micro(j, self.encoder_k):
                out = self._by_size(self.encoder_k, views[:2])  # (2N) x out_dim
            with full_precision(out):
                out = at_least_fp32(out)
                probs = F.softmax((out - self.center) / self.teacher_temp, dim=-1)
            targets.append(probs.view(2, -1, probs.shape[-1]))
            total = out.sum(dim=0, keepdim=True) if total is None else total + out.sum(dim=0, keepdim=True)
            count += out.shape[0]
        return DINOPlan(acc, targets, total, count)

    def objective(self, views: list[torch.Tensor], plan: DINOPlan, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """views: 2 global crops then the local ones (N x 3 x S x S each): the mean over every pair of
        a teacher's global view and another student view of -sum(q log p), student at 0.1."""
        n = views[0].shape[0]
        logits, z = self._by_size(self.encoder_q, views, embedding=True)  # (V*N) x out_dim
        if j == 0:
            self.last_z = z[:n].detach().float()
        loss, self.last_pretext = dino_loss(list(logits.split(n)), list(plan.targets[j]), self.student_temp)
        return loss, loss.detach()

    @torch.no_grad()
    def finish(self, plan: DINOPlan) -> None:
        """The center's EMA from the mean teacher output of the whole global batch (all processes)."""
        total = all_reduce_sum(torch.cat([plan.center_sum, plan.center_sum.new_full((1, 1), float(plan.count))], 1))
        batch_center = total[:, :-1] / total[:, -1:]
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer,
                              scaler: torch.amp.GradScaler | None = None) -> None:
        """main_dino.py between backward and step: each parameter's gradient norm clipped at
        `clip_grad` (utils.clip_gradients, after unscaling fp16 gradients), the last layer's
        gradients dropped in the first `freeze_last_layer` epochs (utils.cancel_gradients_last_layer)."""
        if self.clip_grad:
            if scaler is not None:
                scaler.unscale_(optimizer)
            clip_each_(self.encoder_q.parameters(), self.clip_grad)
        if self.epoch < self.freeze_last_layer:
            for name, p in self.encoder_q.named_parameters():
                if "last_layer" in name:
                    p.grad = None

    def after_optimizer_step(self) -> None:
        """The teacher's EMA with the step's momentum, after the student's step (main_dino.py)."""
        self._momentum_update_key_encoder()


@torch.no_grad()
def clip_each_(params, clip: float) -> None:
    """Scale each parameter's gradient to norm at most `clip` (DINO's utils.clip_gradients: per
    parameter, clip / (norm + 1e-6) when below 1; not torch's global-norm clipping)."""
    for p in params:
        if p.grad is not None:
            coef = clip / (p.grad.norm(2) + 1e-6)
            p.grad.mul_(torch.clamp(coef, max=1.0))


def dino_loss(student: list[torch.Tensor], targets: list[torch.Tensor],
              student_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DINO's loss (main_dino.py DINOLoss.forward): student V x (N x K) logits, targets 2 x (N x K)
    teacher probabilities (global views); the mean over pairs (teacher view iq, student view v != iq)
    of the samples' mean cross-entropy -sum(q log softmax(s / T)). Float32 under autocast. Also the
    pretext agreement: how often the student's top prototype is the teacher's (percent)."""
    with full_precision(student[0]):
        logs = [F.log_softmax(at_least_fp32(s) / student_temp, dim=-1) for s in student]
        with torch.no_grad():  # each view's top prototype, once
            top_s, top_t = [lp.argmax(-1) for lp in logs], [q.argmax(-1) for q in targets]
        total, terms, hits = 0.0, 0, 0.0
        for iq, q in enumerate(targets):
            for v, log_p in enumerate(logs):
                if v == iq:  # a view is not its own target
                    continue
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                terms += 1
                hits = hits + (top_s[v] == top_t[iq]).float().mean()
    return total / terms, {"acc1": hits * 100 / terms}

