"""What a self-supervised method is to the rest of the project: one `Method` subclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from ..accumulation import Accumulation
from ..networks import ema_update_, params_of
from ..optim import cosine_momentum


@dataclass
class Plan:
    """What a method's `prepare` computed for one optimizer step; each method adds its fields."""

    acc: Accumulation


class Method(nn.Module):
    """The protocol between a method and the rest of the project: the engine, the builder, the
    recipes, main_pretrain.py, main_lincls.py and the tools read only this.

    A method owns, in its own module:

    * `name`, and `defaults`: its hyperparameters in main_pretrain.py's flag names - the layer of
      the configuration between the common defaults and a preset (selfsup.config);
    * `flag_options`: which flags are its constructor's options, and under which keyword;
    * `presets`: its recipes for --preset (the papers' and `small-<name>`, the small-image one),
      each with its `source` and `title`, and `reported` accuracies where a paper gives them;
    * `demo`: its settings for the embedded demo, on top of selfsup.config.DEMO;
    * `linear`: its published linear-evaluation protocol (main_lincls.py's optimisation flags,
      `lr` or `lr_per_256`) and its `source`;
    * `run_defining`: its flags that change the weights it trains - with the common ones
      (selfsup.resume.RUN_DEFINING) what a run folder refuses to continue with other values;
    * its step, in three parts (selfsup.accumulation: K micro-batches stand for K processes):
      `prepare(micro, acc)` computes, without gradient, what the loss needs from the whole
      global batch (the momentum update, MoCo's keys, BYOL's targets; `micro` holds this
      process's micro-batches, each a list of views) and returns a `Plan`; `objective(views,
      plan, j)` gives micro-batch j's `(objective, loss)` - what to backpropagate and the loss
      to report (the same tensor but for SimCLR's embedding-gradient cache); `finish(plan)`
      does what follows the step once (MoCo's enqueue). The engine calls `objective` through
      DDP's wrapper (`model(*views, plan=plan, micro=j)`), which must see the call that makes
      the loss. A plain `forward(x1, x2)` runs the three for one batch and returns the loss
      (MoCo's keeps facebookresearch/moco's `(logits, labels)` unless `return_loss`);
    * its momentum schedule: `momentum_at(progress)`, None without a momentum network;
    * `last_z`: detached, L2-normalised embeddings (N x dim) of the last step's micro-batch 0,
      which the engine reads for the collapse signal (selfsup.monitor);
    * `last_pretext`: how well its pretext task is solved on the last micro-batch, as
      `{name: scalar tensor}` without gradient (`pretext`: the names and how to print them) - the
      instance-discrimination Acc@1/Acc@5 facebookresearch/moco's progress line shows, BYOL's
      cosine agreement - which the progress line and metrics.jsonl report;
    * `networks`: the submodules that --compile compiles (the method's own logic stays eager).

    Every method keeps the network being trained (backbone + projection head) as `encoder_q`,
    the head put in place through selfsup.backbones (`set_head`), so `module.encoder_q.*` feeds
    linear evaluation and detection transfer the same way. Adding a method: its module in this
    package and its line in `selfsup.methods.METHODS`; a registered method missing a piece is an
    error at import (`protocol_problems`).
    """

    # Placeholders: each method sets its own (protocol_problems names what one leaves unset).
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    flag_options: ClassVar[dict[str, str]] = {}  # main_pretrain flag -> constructor keyword
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    demo: ClassVar[dict[str, Any]] = {}
    linear: ClassVar[dict[str, Any]] = {}
    run_defining: ClassVar[tuple[str, ...]] = ()
    networks: ClassVar[tuple[str, ...]] = ("encoder_q",)  # what --compile compiles
    # The network evaluations read (online kNN, checkpoints for main_lincls.py / main_knn.py):
    # the one trained by gradients, but for DINO, whose evaluations take its teacher.
    evaluated: ClassVar[str] = "encoder_q"
    # Its own flags beyond the common ones: (flag, argparse keywords), added to main_pretrain.py.
    flags: ClassVar[tuple[tuple[str, dict], ...]] = ()
    # The pretext metrics of `last_pretext`: name -> label of the progress line.
    pretext: ClassVar[dict[str, str]] = {"acc1": "Acc@1", "acc5": "Acc@5"}

    def __init__(self) -> None:
        super().__init__()
        self.last_z: torch.Tensor | None = None
        self.last_pretext: dict[str, torch.Tensor] = {}

    def prepare(self, micro: list[list[torch.Tensor]], acc: Accumulation) -> "Plan":
        """What the step's loss needs from every micro-batch, without gradient (called under
        torch.no_grad); the momentum update happens here, once per step."""
        return Plan(acc)

    def objective(self, views: list[torch.Tensor], plan: "Plan", j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch j's (objective to backpropagate, loss to report) given the step's `plan`."""
        raise NotImplementedError

    def finish(self, plan: "Plan") -> None:
        """What follows the step once every micro-batch's objective was computed."""

    def forward(self, *views: torch.Tensor, plan: "Plan | None" = None, micro: int = 0, return_loss: bool = True):
        """With `plan`: micro-batch `micro`'s (objective, loss). Without: one whole step on these
        views (x1, x2: N x 3 x H x W), the loss."""
        if plan is not None:
            return self.objective(list(views), plan, micro)
        with torch.no_grad():
            plan = self.prepare([list(views)], Accumulation())
        loss, _ = self.objective(list(views), plan, 0)
        self.finish(plan)
        return loss

    def set_epoch(self, epoch: float) -> None:
        """The method's schedules by epoch (fractional), set before each step (DINO's teacher
        temperature); nothing by default."""

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer,
                              scaler: torch.amp.GradScaler | None = None) -> None:
        """What the method does to the step's gradients before the optimizer applies them (DINO
        clips each one and drops its last layer's in the first epoch); nothing by default. `scaler`:
        the step's fp16 GradScaler, if any (its gradients are unscaled first)."""

    def after_optimizer_step(self) -> None:
        """What follows the optimizer step (DINO's teacher EMA); nothing by default."""

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


# What a method's linear protocol sets: main_lincls.py's optimisation flags (lr: or lr_per_256).
LINEAR_KEYS = ("optimizer", "nesterov", "wd", "cos", "schedule", "epochs")


def protocol_problems(cls: type[Method]) -> list[str]:
    """What `cls` lacks of the protocol (empty when complete): each missing or malformed piece,
    named, so that a method never borrows another one's recipe by omission. (Its momentum
    schedule is a method: Method's returns None, right for a method without a momentum network;
    tests/test_methods.py checks the schedule of every method that has one.)"""
    problems = [f"no `{attr}`" for attr in ("name", "defaults", "flag_options", "presets", "demo", "linear",
                                            "run_defining") if own(cls, attr) is None]
    if cls.objective is Method.objective:
        problems.append("no `objective` (its loss)")
    presets = own(cls, "presets") or {}
    if presets and f"small-{cls.name}" not in presets:
        problems.append(f"no small-image preset `small-{cls.name}` among its presets {sorted(presets)}")
    for preset, recipe in presets.items():
        problems += [f"preset `{preset}` has no `{key}`" for key in ("title", "source") if not recipe.get(key)]
    linear = own(cls, "linear")
    if linear is not None:
        missing = [key for key in LINEAR_KEYS if key not in linear]
        missing += [] if ("lr" in linear or "lr_per_256" in linear) else ["lr or lr_per_256"]
        missing += [] if linear.get("source") else ["source"]
        if missing:
            problems.append(f"`linear` (its linear-evaluation protocol) lacks {', '.join(missing)}")
    if own(cls, "run_defining") is not None:
        loose = sorted(set(cls.flag_options) - set(cls.run_defining) - {"batch_size"})
        if loose:
            problems.append(f"`run_defining` leaves out options that change the weights it trains: {loose}")
    return problems


def check_complete(methods: Mapping[str, type[Method]]) -> None:
    """A TypeError naming every missing piece when a registered method is incomplete."""
    for name, cls in methods.items():
        problems = protocol_problems(cls)
        if cls.name != name:
            problems.insert(0, f"registered as '{name}' but named '{cls.name}'")
        if problems:
            raise TypeError(f"method '{name}' ({cls.__module__}.{cls.__qualname__}) is incomplete: "
                            f"{'; '.join(problems)} (see selfsup.methods.base.Method)")


def own(cls: type, attr: str) -> Any:
    """`cls.attr` when `cls` (or a class between it and Method) sets it, else None: Method's
    placeholders do not count as the method's own."""
    for klass in cls.__mro__:
        if klass is Method:
            return None
        if attr in vars(klass):
            return vars(klass)[attr]
    return None
