"""How a pretraining configuration is made: four layers, each overriding the ones before it.

    COMMON            the values every method starts from (facebookresearch/moco's defaults)
    Method.defaults   the method's own hyperparameters (selfsup.methods)
    the recipe        a preset (`--preset`, Method.presets), or the demo (DEMO, then Method.demo)
    flags             what the command line gives explicitly

Everything here is in main_pretrain.py's flag names. The recipes themselves live with their
methods; selfsup.recipes gathers them into the tables the scripts read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .methods.base import Method

# Used whatever the method, unless something above overrides them (facebookresearch/moco's defaults).
COMMON: dict[str, Any] = {
    "arch": "resnet50",
    "epochs": 200,
    "batch_size": 256,
    "lr": 0.03,
    "schedule": [120, 160],
    "momentum": 0.9,
    "wd": 1e-4,
    "optimizer": "sgd",
    "warmup_epochs": 0.0,
    "cos": False,
    "image_size": 224,
    "small_stem": False,
    "stop_grad_conv1": False,  # ViTs: a frozen random patch projection (moco-v3)
    "zero_init_residual": False,  # ResNets: torchvision's default init (moco-v3 zeroes each block's last BN)
    "vit_init": "mocov3",  # ViTs: moco-v3's fixed sin-cos position embedding and init (dino: DINO's, learned)
    "drop_path_rate": 0.0,  # ViTs: stochastic depth (DINO's student: 0.1)
    "min_lr": 0.0,  # the cosine schedule's floor (DINO: 1e-6)
    "weight_decay_end": None,  # a cosine from --wd to this (DINO: 0.04 -> 0.4); None: constant
    "wd_exclude": "none",  # every parameter decays (selfsup.optim.WD_EXCLUDE)
    "bn_splits": 1,
    "sync_bn": False,
    "classic_momentum": False,
    "lars_eta": 0.001,  # LARS's trust coefficient: BYOL's and SimCLR's (and their ImageNet recipes')
    "knn_every": 0,
    "amp": "none",  # mixed precision (the GPU recipes that use it set it: DINO's fp16)
}

# What every small-image preset (`small-<method>`: 28-32 px, Fashion-MNIST or CIFAR, a few epochs)
# starts from: ResNet-18 with the standard stem at 32 px (the small stem costs about 8x the
# compute), half an epoch of warmup and a cosine decay over the planned epochs.
SMALL_IMAGE: dict[str, Any] = {"arch": "resnet18", "small_stem": False, "image_size": 32, "epochs": 10,
                               "batch_size": 128, "cos": True, "warmup_epochs": 0.5}

# `python main_pretrain.py` without a data argument: the embedded Fashion-MNIST demo, sized to
# finish on a laptop CPU in a couple of minutes; each method adds its own (Method.demo). The
# standard (ImageNet) stem keeps a ResNet-18 step at 32 px about 8x cheaper than the small stem
# on a CPU; the demo is about seeing the whole pipeline run, not the best accuracy.
DEMO: dict[str, Any] = {
    "arch": "resnet18", "small_stem": False, "image_size": 32, "epochs": 3, "batch_size": 128,
    "lr": 0.06, "cos": True, "wd": 5e-4, "warmup_epochs": 0.0, "workers": 1, "knn_every": 1,
}

# Keys of a recipe that document it rather than configure it. `lr_per_256` (in any layer): lr =
# lr_per_256 x batch_size / 256 unless a higher layer sets lr (the papers' linear scaling rule).
INFO_KEYS = ("title", "source", "reported", "lr_per_256")


def merge(method: type[Method], recipe: Mapping[str, Any] | None, demo: bool,
          explicit: Mapping[str, Any], recipe_name: str | None = None) -> dict[str, Any]:
    """The configuration of `method` from the layers, lowest first: COMMON, the method's
    defaults, the demo's settings (when `demo`) and then the recipe (a preset, or None), and the
    flags in `explicit` (only those the user set). A layer's `lr_per_256` sets lr = lr_per_256 x
    batch_size / 256 unless a higher layer sets lr or lr_per_256 itself. `config_sources` says which
    layer each value comes from (for the start line)."""
    layers = [("common", COMMON), (f"{method.name}'s defaults", method.defaults)]
    if demo:
        layers += [("the demo", DEMO), ("the demo", method.demo)]
    layers += [(f"--preset {recipe_name or ''}".strip(), recipe or {}), ("the command line", explicit)]
    cfg: dict[str, Any] = {}
    sources: dict[str, str] = {}
    lr_rule: tuple[str, float, str] | None = None  # ("lr" | "lr_per_256", value, layer)
    for name, layer in layers:
        for key, value in layer.items():
            if key in ("lr", "lr_per_256"):
                lr_rule = (key, value, name)
            elif key not in INFO_KEYS:
                cfg[key], sources[key] = value, name
    cfg["method"] = method.name
    kind, value, name = lr_rule
    cfg["lr"] = value if kind == "lr" else value * cfg["batch_size"] / 256
    sources["lr"] = name if kind == "lr" else f"{name}: {value:g} x batch / 256"
    cfg["config_sources"] = sources
    return cfg
