"""Hyperparameters: the papers' recipes (--preset), the demo recipe, and how they combine.

Precedence when main_pretrain.py resolves its configuration, lowest first:
common defaults < the method's defaults (`Method.defaults`, selfsup.methods) < the preset (or the
demo recipe) < flags on the command line.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from .data import fashion_mnist_root
from .methods import METHODS

logger = logging.getLogger(__name__)

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
    "bn_splits": 1,
    "sync_bn": False,
    "classic_momentum": False,
    "lars_eta": 0.001,  # LARS's trust coefficient: BYOL's and SimCLR's (and their ImageNet recipes')
    "knn_every": 0,
}

# The papers' ImageNet recipes. `lr_per_256` means lr = lr_per_256 * batch_size / 256 unless
# --lr is given. `reported` is the paper's ResNet-50 ImageNet linear top-1, for the README.
PRESETS: dict[str, dict[str, Any]] = {
    "mocov1": {
        "method": "moco", "arch": "resnet50", "epochs": 200, "batch_size": 256, "lr": 0.03,
        "schedule": [120, 160], "wd": 1e-4, "moco_dim": 128, "moco_k": 65536, "moco_m": 0.999,
        "moco_t": 0.07, "mlp": False, "aug": "moco_v1", "cos": False,
        "source": "He et al. 2020 (arXiv:1911.05722) and facebookresearch/moco README",
        "reported": "60.6% (paper), 60.8% (facebookresearch/moco), ResNet-50, 200 epochs",
    },
    "mocov2": {
        "method": "moco", "arch": "resnet50", "epochs": 200, "batch_size": 256, "lr": 0.03,
        "wd": 1e-4, "moco_dim": 128, "moco_k": 65536, "moco_m": 0.999, "moco_t": 0.2,
        "mlp": True, "aug": "moco_v2", "cos": True,
        "source": "Chen et al. 2020 (arXiv:2003.04297); moco --mlp --moco-t 0.2 --aug-plus --cos",
        "reported": "67.5% (paper), 67.7% (facebookresearch/moco), ResNet-50, 200 epochs; 71.1% at 800 epochs",
    },
    "byol": {
        "method": "byol", "arch": "resnet50", "epochs": 1000, "batch_size": 4096, "lr_per_256": 0.2,
        "wd": 1.5e-6, "optimizer": "lars", "warmup_epochs": 10, "cos": True, "moco_dim": 256,
        "mlp_dim": 4096, "moco_m": 0.996, "moco_m_cos": True, "aug": "byol", "sync_bn": True,
        "source": "Grill et al. 2020 (arXiv:2006.07733), Sec. 3.2 and Appendix C",
        "reported": "74.3%, ResNet-50, 1000 epochs, batch 4096",
    },
    "simclr": {
        "method": "simclr", "arch": "resnet50", "epochs": 1000, "batch_size": 4096, "lr_per_256": 0.3,
        "wd": 1e-6, "optimizer": "lars", "warmup_epochs": 10, "cos": True, "moco_dim": 128,
        "mlp_dim": 2048, "moco_t": 0.1, "aug": "simclr", "sync_bn": True,
        "source": "Chen et al. 2020 (arXiv:2002.05709), Sec. 2.3 and Appendix B.1",
        "reported": "69.3%, ResNet-50, 1000 epochs, batch 4096",
    },
}

# Small images (28-32 px: Fashion-MNIST, CIFAR), for a few epochs: ResNet-18 with the standard
# stem at 32 px (the small stem costs about 8x the compute), each method's augmentation, half
# an epoch of warmup and a cosine decay over the planned epochs. SimCLR keeps its own paper's LARS
# (google-research/simclr's form: the lr inside the momentum, no clipping of the per-layer rate)
# with solo-learn's CIFAR settings (trust coefficient 0.02, lr 0.4 x B/256, wd 1e-5) - not
# solo-learn's LARS, which clips the per-layer rate at the lr and keeps the lr outside the
# momentum. With the papers' 0.001 a step moves a weight by lr x 0.1% of its norm, too little for
# a few thousand steps. BYOL takes SGD as MoCo
# does (lightly's CIFAR BYOL: lr 0.06 at batch 128, wd 5e-4): with solo-learn's LARS (lr 1.0 x
# B/256, eta 0.02, wd 1e-5) its online kNN on Fashion-MNIST was 59.4 / 60.9 / 62.2 after epochs
# 1-3, with this recipe 66.9 after the first (same machine and monitor; one seed, not an ablation).
# What they reach on Fashion-MNIST in 10 epochs: README, "Does it learn?" (tools/fmnist_benchmark.py).
# The papers' recipes above stay as they are.
_SMALL = {"arch": "resnet18", "small_stem": False, "image_size": 32, "epochs": 10, "batch_size": 128, "cos": True,
          "warmup_epochs": 0.5}
PRESETS.update({
    "small-moco": {**_SMALL, "method": "moco", "lr_per_256": 0.06, "wd": 5e-4, "moco_dim": 128, "moco_k": 8192,
                   "moco_m": 0.99, "moco_t": 0.2, "mlp": True, "aug": "moco_v2", "bn_splits": 8,
                   "source": "MoCo v2 scaled to 60k images and a few thousand steps (lr, K, m, T chosen by measurement)",
                   "reported": "see README, Does it learn?"},
    "small-byol": {**_SMALL, "method": "byol", "lr_per_256": 0.12, "optimizer": "sgd", "wd": 5e-4,
                   "moco_dim": 128, "mlp_dim": 1024, "moco_m": 0.99, "moco_m_cos": True, "aug": "byol",
                   "source": "BYOL with lightly's CIFAR optimiser (SGD), at batch 128",
                   "reported": "see README, Does it learn?"},
    "small-simclr": {**_SMALL, "method": "simclr", "lr_per_256": 0.4, "optimizer": "lars", "lars_eta": 0.02, "wd": 1e-5,
                     "moco_dim": 128, "mlp_dim": 1024, "moco_t": 0.2, "aug": "simclr",
                     "source": "SimCLR's LARS (classic momentum) with solo-learn's CIFAR settings (eta 0.02, "
                               "lr 0.4 x B/256, wd 1e-5), at batch 128",
                     "reported": "see README, Does it learn?"},
})

# `python main_pretrain.py` without a data argument: the embedded Fashion-MNIST demo, sized to
# finish on a laptop CPU in a couple of minutes. Per method, on top of the method's defaults.
# The standard (ImageNet) stem keeps a ResNet-18 step at 32 px about 8x cheaper than the small
# stem on a CPU; the demo is about seeing the whole pipeline run, not the best accuracy.
DEMO: dict[str, Any] = {
    "arch": "resnet18", "small_stem": False, "image_size": 32, "epochs": 3, "batch_size": 128,
    "lr": 0.06, "cos": True, "wd": 5e-4, "workers": 1, "knn_every": 1,
}
DEMO_METHOD: dict[str, dict[str, Any]] = {
    # The queue must stay well below the 3,000 images, or it holds the positive's own older keys
    # as negatives; one process needs the shuffle-BN emulation (bn_splits), else BatchNorm lets
    # the keys be told apart by batch statistics. lr 0.06 without warmup drove the embeddings
    # towards one point (std 0.004) on this data; these settings keep them spread.
    "moco": {"moco_k": 1024, "moco_m": 0.99, "moco_t": 0.2, "mlp": True, "aug": "moco_v2", "bn_splits": 8,
             "lr": 0.03, "warmup_epochs": 0.3},
    "byol": {"lr": 0.2, "optimizer": "lars", "wd": 1.5e-6, "mlp_dim": 512, "moco_dim": 128},
    "simclr": {"lr": 0.3, "optimizer": "lars", "wd": 1e-6, "mlp_dim": 512, "moco_t": 0.2},
}

# Keys of the recipes that are documentation, not configuration.
INFO_KEYS = ("source", "reported", "lr_per_256")


def resolve(method: str | None, preset: str | None, demo: bool, explicit: dict[str, Any]) -> dict[str, Any]:
    """Merge the layers into one configuration. `explicit` holds only the flags the user set."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown --preset '{preset}'; valid: {', '.join(PRESETS)}")
    recipe = PRESETS.get(preset, {})
    if method is not None and preset is not None and recipe["method"] != method:
        raise ValueError(f"--preset {preset} is a {recipe['method']} recipe but --method {method} was given")
    method = method or recipe.get("method") or "moco"
    if method not in METHODS:
        raise ValueError(f"unknown --method '{method}'; valid: {', '.join(METHODS)}")
    cfg: dict[str, Any] = {**COMMON, **METHODS[method].defaults}
    if demo:
        cfg.update(DEMO)
        cfg.update(DEMO_METHOD.get(method, {}))
    cfg.update({k: v for k, v in recipe.items() if k not in INFO_KEYS})
    cfg.update(explicit)
    cfg["method"] = method
    if "lr" not in explicit and "lr_per_256" in recipe:
        cfg["lr"] = recipe["lr_per_256"] * cfg["batch_size"] / 256
    return cfg


# Linear evaluation: each method's published protocol on ImageNet (docs/EVALUATION.md gives the
# sources and the reasoning). main_lincls.py takes the checkpoint's method's; each flag given
# replaces its own value only (linear_protocol). `lr_per_256` scales with --batch-size.
LINEAR: dict[str, dict[str, Any]] = {
    "moco": {"optimizer": "sgd", "lr": 30.0, "nesterov": False, "wd": 0.0, "cos": False, "schedule": [60, 80],
             "epochs": 100, "source": "facebookresearch/moco's main_lincls.py (He et al. 2020, Sec. 4.1)"},
    "simclr": {"optimizer": "sgd", "lr_per_256": 0.1, "nesterov": True, "wd": 0.0, "cos": True, "schedule": [],
               "epochs": 90, "source": "google-research/simclr's linear evaluation (Chen et al. 2020, appendix)"},
    "byol": {"optimizer": "sgd", "lr_per_256": 0.2, "nesterov": True, "wd": 0.0, "cos": True, "schedule": [],
             "epochs": 80, "source": "deepmind-research's byol/configs/eval.py (Grill et al. 2020, Appendix C)"},
}


def linear_protocol(args: argparse.Namespace, method: str | None) -> str:
    """Fill main_lincls.py's unset optimisation flags in place from the protocol in LINEAR of the
    checkpoint's `method` (MoCo's, the script's defaults as facebookresearch/moco's, when none is
    recorded). Each flag given on the command line wins on its own; the others keep the protocol's.
    Returns a line saying what was chosen and why, for the log."""
    name = method if method in LINEAR else "moco"
    protocol = LINEAR[name]
    given = [key for key in ("optimizer", "lr", "nesterov", "wd", "cos", "schedule", "epochs")
             if getattr(args, key) is not None]  # set on the command line, or by the run resumed
    for key in ("optimizer", "nesterov", "wd", "cos", "schedule", "epochs"):
        if getattr(args, key) is None:
            setattr(args, key, protocol[key])
    if args.lr is None:
        args.lr = protocol.get("lr") or protocol["lr_per_256"] * args.batch_size / 256
    if not args.cos and any(m >= args.epochs for m in args.schedule):
        logger.warning("--schedule %s has milestones at or past --epochs %d: those lr drops never happen",
                       args.schedule, args.epochs)
    how = (f"{args.optimizer}{' nesterov' if args.nesterov else ''}, lr {args.lr:g}, "
           + ("cosine" if args.cos else f"x0.1 at {args.schedule}") + f", wd {args.wd:g}, {args.epochs} epochs")
    why = (f"{name}'s protocol, from {protocol['source']}" if name == method
           else "MoCo's protocol (the checkpoint records no method)")
    given_text = f" ({', '.join('--' + k for k in given)} given)" if given else ""
    return f"linear evaluation: {how} - {why}{given_text}; docs/EVALUATION.md"


# What defines a pretraining run: the data and every hyperparameter that changes the weights it
# trains. A run folder records them (run.json and every checkpoint); resuming with other values
# is refused unless asked for (--accept-changes). --epochs is not among them: extending a run is
# allowed. Nor are what only changes speed or reporting (workers, devices, print and save rates).
RUN_DEFINING = ("data", "method", "arch", "small_stem", "image_size", "aug", "batch_size", "lr", "optimizer",
                "momentum", "wd", "cos", "schedule", "warmup_epochs", "classic_momentum", "lars_eta", "moco_dim", "moco_k",
                "moco_m", "moco_t", "moco_m_cos", "mlp", "mlp_dim", "bn_splits", "shuffle_bn", "sync_bn", "amp", "seed")


def run_definition(args: dict[str, Any]) -> dict[str, Any]:
    """The values of RUN_DEFINING in `args` (a pretraining command's, or the plain args an older
    checkpoint saved). The data is what the files are (`data_id`, selfsup.pipeline.files_id), not
    where they lie, so a copy on a job's local disk resumes the same run; older checkpoints, which
    did not record it, compare the absolute path ('demo' for the embedded demo)."""
    out = {k: args.get(k) for k in RUN_DEFINING}
    if args.get("data_id"):
        out["data"] = args["data_id"]
    elif args.get("demo"):
        out["data"] = "demo"
    elif out["data"] is not None:
        out["data"] = str((fashion_mnist_root(out["data"]) or Path(out["data"])).resolve())
    return out


def is_data_id(data: object) -> bool:
    """Whether a recorded `data` is a fingerprint (selfsup.pipeline.files_id / arrays_id) rather
    than a path or 'demo', as run records before 2026-11-30 held."""
    return isinstance(data, str) and re.fullmatch(r"\d+ images, \d+ labels, (files|arrays) [0-9a-f]+", data) is not None


def default_output_dir(method: str, arch: str, data: str | None) -> str:
    """runs/<method>-<arch>-<name of the data folder> ('demo' for the embedded demo), so that
    another dataset gets another folder instead of resuming the first one's run."""
    name = "demo" if data is None else "fashion-mnist" if fashion_mnist_root(data) else Path(data).resolve().name
    return str(Path("runs") / f"{method}-{arch}-{name}")


def fill_unset(args: argparse.Namespace, recipe: dict[str, Any]) -> argparse.Namespace:
    """A copy of `args` whose unset (None) flags take the recipe's value: how the detection script
    resolves --recipe (explicit flags win)."""
    out = argparse.Namespace(**vars(args))
    for key, value in recipe.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    return out


# ----------------------------------------------------------------------------------------------
# Detection transfer (detection/train_torchvision.py --recipe)
# ----------------------------------------------------------------------------------------------

_VOC_SIZES = tuple(range(480, 801, 32))  # MoCo's VOC MIN_SIZE_TRAIN
_COCO_SIZES = tuple(range(640, 801, 32))
_COMMON = dict(head="c4", norm="syncbn", batch_size=16, lr=0.02, test_size=800, max_size=1333, precise_bn_iters=200,
               roi_batch_size=512, fpn_channels=256, box_head_dim=1024, workers=4, checkpoint_period=5000)
# MoCo's detection configs (facebookresearch/moco detection/configs), written out; explicit flags win.
DETECTION: dict[str, dict[str, Any]] = {
    "voc": dict(_COMMON, train=["voc_2007_trainval", "voc_2012_trainval"], test=["voc_2007_test"], max_iter=24000,
                steps=[18000, 22000], warmup_iters=100, min_size=list(_VOC_SIZES)),
    "coco_1x": dict(_COMMON, train=["coco_2017_train"], test=["coco_2017_val"], max_iter=90000,
                    steps=[60000, 80000], warmup_iters=1000, min_size=list(_COCO_SIZES)),
    "coco_2x": dict(_COMMON, train=["coco_2017_train"], test=["coco_2017_val"], max_iter=180000,
                    steps=[120000, 160000], warmup_iters=1000, min_size=list(_COCO_SIZES)),
    # Minutes on a CPU: ResNet-18 FPN, narrow FPN and box head, on detection/make_synthetic.py's
    # default data (64-pixel images of three shapes); README.md gives the AP and time measured.
    "demo": dict(head="fpn", arch="resnet18", norm="bn", batch_size=8, lr=0.04, train=["voc_2007_trainval"],
                 test=["voc_2007_test"], max_iter=600, steps=[450, 550], warmup_iters=50, min_size=[64],
                 test_size=64, max_size=64, precise_bn_iters=0, roi_batch_size=64, fpn_channels=32,
                 box_head_dim=128, workers=0, checkpoint_period=200),
}
