"""What a self-supervised method is to the rest of the project: one `Method` subclass."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from ..networks import ema_update_, params_of
from ..optim import cosine_momentum


class Method(nn.Module):
    """The protocol between a method and the engine, the builder and main_pretrain.py.

    A method owns:

    * `name`, and `defaults`: its hyperparameters in main_pretrain.py's flag names - the layer of
      the configuration between the common defaults and a preset (selfsup.recipes);
    * `flag_options`: which flags are its constructor's options, and under which keyword;
    * its loss: `forward(x1, x2, return_loss=True)` returns the training loss, a scalar tensor.
      The engine calls it through DDP's wrapper, which must see the call that makes the loss.
      (`return_loss` exists for MoCo, whose plain forward keeps facebookresearch/moco's
      `(logits, labels)`; the other methods return the loss either way);
    * its momentum schedule: `momentum_at(progress)`, None without a momentum network;
    * `last_z`: detached, L2-normalised embeddings (N x dim) of the last step, which the engine
      reads for the collapse signal (selfsup.monitor);
    * `networks`: the submodules that --compile compiles (the method's own logic stays eager).

    Every method keeps the network being trained (backbone + projection head) as `encoder_q`, so
    `module.encoder_q.*` feeds linear evaluation and detection transfer the same way. Adding a
    method: a subclass in this package, listed in `selfsup.methods.METHODS`, plus its recipe in
    selfsup.recipes.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    flag_options: ClassVar[dict[str, str]] = {}  # main_pretrain flag -> constructor keyword
    networks: ClassVar[tuple[str, ...]] = ("encoder_q",)  # what --compile compiles

    def __init__(self) -> None:
        super().__init__()
        self.last_z: torch.Tensor | None = None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, return_loss: bool = True):
        raise NotImplementedError

    def momentum_at(self, progress: float) -> float | None:
        """Set and return the momentum for training `progress` (the fraction of all steps done,
        0..1); None for a method without a momentum network."""
        return None

    def data_warnings(self, num_images: int) -> list[str]:
        """What is wrong with training this model on `num_images` images (a warning each)."""
        return []

    @classmethod
    def options(cls, flags: Mapping[str, Any]) -> dict[str, Any]:
        """This method's constructor keywords from main_pretrain.py's flags (unset flags left out)."""
        return {keyword: flags[flag] for flag, keyword in cls.flag_options.items() if flags.get(flag) is not None}


class MomentumMethod(Method):
    """A method whose `encoder_k` is an exponential moving average of `encoder_q` (MoCo's key
    encoder, BYOL's target): `m` is constant, or with `m_cos` rises from its base value to 1 along
    a half cosine over training (BYOL, Sec. 3.2; moco-v3)."""

    def __init__(self, m: float, m_cos: bool) -> None:
        super().__init__()
        self.base_m, self.m, self.m_cos = m, m, m_cos

    def momentum_at(self, progress: float) -> float:
        if self.m_cos:
            self.m = cosine_momentum(self.base_m, progress, 1.0)
        return self.m

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """encoder_k <- m * encoder_k + (1 - m) * encoder_q, parameter by parameter (not buffers)."""
        ema_update_(params_of(self.encoder_k), params_of(self.encoder_q), self.m)
