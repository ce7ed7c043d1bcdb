"""Optimizers and schedules: LARS, the one optimizer builder (SGD, LARS, AdamW with its no-decay
set), learning-rate warmup + cosine, MoCo's step schedule and the cosine momentum schedule of
BYOL / moco-v3."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., arXiv:1708.03888), as used by SimCLR, BYOL
    and moco-v3.

    For each parameter with more than one dimension: g <- g + wd * p, then g <- g * eta * |p| / |g|
    (the trust ratio, 1 when either norm is 0); then heavy-ball momentum. Biases and BatchNorm
    parameters (ndim == 1) get neither weight decay nor the trust ratio, as in those papers.

    The momentum comes in the two forms the papers' code uses. By default the learning rate
    multiplies the momentum buffer, mu <- m mu + g; p <- p - lr mu (BYOL's optax chain in
    deepmind-research, moco-v3). With `classic_momentum` it enters the buffer, mu <- m mu + lr g;
    p <- p - mu (google-research/simclr's default, "classic momentum"): under a schedule each
    step's gradient then keeps the lr of its own step. The two agree while the lr is constant.

    `foreach=True` (default) does each step for all parameters of a group with multi-tensor
    kernels (torch._foreach_*), a handful of launches per step instead of ~10 per parameter;
    `foreach=False` is the plain per-parameter loop (same results up to float rounding).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        classic_momentum: bool = False,
        foreach: bool = True,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient,
                        classic_momentum=classic_momentum)
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.foreach:
                self._foreach_step(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.norm(p), torch.norm(g)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(
                        p_norm > 0,
                        torch.where(g_norm > 0, group["trust_coefficient"] * p_norm / g_norm, one),
                        one,
                    )
                    g = g.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                if group.get("classic_momentum", False):  # absent in older checkpoints
                    mu.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                    p.sub_(mu)
                else:
                    mu.mul_(group["momentum"]).add_(g)
                    p.add_(mu, alpha=-group["lr"])
        return loss

    def _foreach_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if "mu" not in self.state[p]:
                self.state[p]["mu"] = torch.zeros_like(p)
        scaled = [p for p in params if p.ndim > 1]
        if scaled:
            grads = torch._foreach_add([p.grad for p in scaled], scaled, alpha=group["weight_decay"])
            p_norm = torch.stack(torch._foreach_norm(scaled))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = torch.where(
                (p_norm > 0) & (g_norm > 0), group["trust_coefficient"] * p_norm / g_norm, torch.ones_like(p_norm)
            )
            torch._foreach_mul_(grads, list(ratio.unbind()))
            update = dict(zip(map(id, scaled), grads))
        else:
            update = {}
        grads = [update.get(id(p), p.grad) for p in params]
        mus = [self.state[p]["mu"] for p in params]
        torch._foreach_mul_(mus, group["momentum"])
        if group.get("classic_momentum", False):  # absent in older checkpoints
            torch._foreach_add_(mus, grads, alpha=group["lr"])
            torch._foreach_sub_(params, mus)
        else:
            torch._foreach_add_(mus, grads)
            torch._foreach_add_(params, mus, alpha=-group["lr"])


# Which parameters weight decay leaves out (--wd-exclude), as the references build their optimizers:
#   none              every parameter decays: moco-v3's AdamW (main_moco.py: AdamW(model.parameters(), ...))
#                     and facebookresearch/moco's SGD;
#   bias-norm         biases and other 1-D parameters (norms) do not: DINO (utils.get_params_groups:
#                     `name.endswith(".bias") or len(param.shape) == 1`);
#   bias-norm-tokens  nor do a ViT's position embedding and tokens (timm's `no_weight_decay`, MAE).
# LARS never decays 1-D parameters whatever this says: that is LARS itself (see LARS).
WD_EXCLUDE = ("none", "bias-norm", "bias-norm-tokens")
# The parameters bias-norm-tokens adds, matched against the last part of the parameter's name.
NO_DECAY_NAMES = ("pos_embed", "pos_embedding", "cls_token", "class_token", "dist_token", "mask_token",
                  "register_tokens")


def takes_weight_decay(name: str, param: torch.Tensor, exclude: str = "bias-norm-tokens") -> bool:
    """Whether parameter `name` takes weight decay under `exclude` (WD_EXCLUDE)."""
    if exclude not in WD_EXCLUDE:
        raise ValueError(f"unknown --wd-exclude '{exclude}'; valid: {', '.join(WD_EXCLUDE)}")
    if exclude == "none":
        return True
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return exclude == "bias-norm" or name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def decay_groups(named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float,
                 exclude: str = "bias-norm-tokens") -> list[dict]:
    """Two parameter groups: those that take `weight_decay` and those that take none (see
    takes_weight_decay), in the order given; an empty group is left out."""
    named = list(named_params)
    # "decays": which group a weight decay schedule moves (DINO's), whatever the starting value
    groups = [{"params": [p for n, p in named if takes_weight_decay(n, p, exclude)], "weight_decay": weight_decay,
               "decays": True},
              {"params": [p for n, p in named if not takes_weight_decay(n, p, exclude)], "weight_decay": 0.0,
               "decays": False}]
    return [g for g in groups if g["params"]]


OPTIMIZERS = ("sgd", "lars", "adamw")


def build_optimizer(
    name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
    classic_momentum: bool = False, trust_coefficient: float = 0.001, betas: tuple[float, float] = (0.9, 0.999),
    wd_exclude: str = "none",
) -> torch.optim.Optimizer:
    """'sgd' (torch SGD with multi-tensor 'foreach' kernels, optionally Nesterov: SimCLR's and
    BYOL's linear protocols), 'lars', or 'adamw' (moco-v3's ViT optimizer; `momentum` unused),
    with weight decay on the parameters `wd_exclude` leaves in (WD_EXCLUDE; default: all).

    `params`: tensors, parameter groups (e.g. detection's, without weight decay on normalisation
    layers), or (name, tensor) pairs as `model.named_parameters()` gives them - bias-norm-tokens
    needs the names; given bare tensors the exclusion goes by shape alone. Every script builds its
    optimizer here.
    """
    params = list(params)
    if params and not isinstance(params[0], dict):
        named = params if isinstance(params[0], tuple) else [(str(i), p) for i, p in enumerate(params)]
        params = decay_groups(named, weight_decay, wd_exclude)
    if name in ("adamw", "lars") and nesterov:
        raise ValueError("--nesterov applies to --optimizer sgd only")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                               foreach=True)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, classic_momentum=classic_momentum,
                    trust_coefficient=trust_coefficient)
    raise ValueError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")


def cosine_lr(base_lr: float, epoch: float, epochs: float, warmup_epochs: float = 0.0, final: float = 0.0) -> float:
    """Linear warmup from 0 over `warmup_epochs`, then half-cosine decay to `final` (0; DINO's
    min_lr, or its weight decay's end value) at `epochs`.

    `epoch` is fractional (epoch + step / steps_per_epoch) so the schedule moves every step.
    """
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    if not final:  # bit for bit the form the other recipes were measured with
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return final + (base_lr - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def step_lr(base_lr: float, epoch: float, schedule: Sequence[int], warmup_epochs: float = 0.0) -> float:
    """MoCo's schedule: multiply by 0.1 at each epoch listed in `schedule` (after any warmup)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    return base_lr * 0.1 ** sum(int(epoch) >= milestone for milestone in schedule)


def learning_rate(base_lr: float, epoch: float, epochs: float, cos: bool, schedule: Sequence[int] = (),
                  warmup_epochs: float = 0.0, min_lr: float = 0.0) -> float:
    """The learning rate at fractional `epoch`: warmup + cosine down to `min_lr` (`cos`), else
    MoCo's steps."""
    if cos:
        return cosine_lr(base_lr, epoch, epochs, warmup_epochs, min_lr)
    return step_lr(base_lr, epoch, schedule, warmup_epochs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def cosine_momentum(base_m: float, epoch: float, epochs: float) -> float:
    """EMA momentum rising from `base_m` to 1 along a half cosine (BYOL, Sec. 3.2; moco-v3)."""
    return 1.0 - (1.0 - base_m) * 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0)))
