"""The recipes of every method, gathered from the methods (selfsup.methods): the --preset table,
the linear-evaluation protocols, and how a pretraining command's configuration is resolved
(layers: selfsup.config).

Nothing here is written per method: a method's module holds its recipes, and a method without
one of them fails at import (selfsup.methods.base.protocol_problems).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .config import COMMON, DEMO, INFO_KEYS, merge
from .errors import UsageError
from .backbones import DEFAULT_FEATURES, FAMILIES, feature_options
from .methods import METHODS

logger = logging.getLogger(__name__)

# The method of a command that names none (and of a checkpoint that records none:
# facebookresearch/moco's), as facebookresearch/moco's scripts are MoCo's.
DEFAULT_METHOD = "moco"
# The method of the embedded demo (no data folder, no --method): the one that visibly learns on its
# 3,000 small images within its default run on 2 CPU cores - SimCLR's online kNN rises above the
# random network's, MoCo v2's stays below it for its first 10 epochs there (docs/EVALUATION.md,
# "The demo, measured"). `--method moco` runs MoCo v2's demo.
DEMO_METHOD = "simclr"


def _gather_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for method in METHODS.values():
        for name, recipe in method.presets.items():
            if name in presets:
                raise TypeError(f"--preset {name} is both {presets[name]['method']}'s and {method.name}'s")
            presets[name] = {"method": method.name, **recipe}
    return dict(sorted(presets.items(), key=lambda item: item[0].startswith("small-")))  # the papers' first


# --preset name -> recipe (flag values, with "method" and the INFO_KEYS): the papers' recipes, then the
# small-image ones, each in the order of METHODS.
PRESETS: dict[str, dict[str, Any]] = _gather_presets()

# method -> its published linear-evaluation protocol (docs/EVALUATION.md gives the reasoning).
LINEAR: dict[str, dict[str, Any]] = {name: method.linear for name, method in METHODS.items()}

# Every flag some layer sets: a flag the command line leaves unset (None) takes its value from
# the layers, one given wins over all of them.
CONFIG_KEYS: tuple[str, ...] = tuple(dict.fromkeys(
    [*COMMON, *DEMO]
    + [key for method in METHODS.values() for layer in (method.defaults, method.demo, *method.presets.values())
       for key in layer if key not in INFO_KEYS]))


def defaults_by_method(flag: str) -> str:
    """Each method's default of `flag`, for a flag's help: 'moco 128, byol 256, simclr 128'."""
    return ", ".join(f"{name} {cls.defaults[flag]}" for name, cls in METHODS.items() if flag in cls.defaults)


def protocols_by_method(key: str) -> str:
    """Each method's linear protocol for `key`, for a flag's help: 'moco 30, byol 0.2 x B/256, ...'."""
    def value(protocol: dict) -> str:
        if key == "lr" and "lr" not in protocol:
            return f"{protocol['lr_per_256']:g} x B/256"
        return f"{protocol[key]:g}" if isinstance(protocol[key], float) else str(protocol[key])
    return ", ".join(f"{name} {value(protocol)}" for name, protocol in LINEAR.items())


def small_preset(method: str) -> str:
    """The name of `method`'s small-image preset (every method has one: `small-<method>`)."""
    return f"small-{method}"


def resolve(method: str | None, preset: str | None, demo: bool, explicit: dict[str, Any]) -> dict[str, Any]:
    """Merge the layers into one configuration (selfsup.config.merge). `explicit` holds only the
    flags the user set. Raises ValueError on an unknown or contradictory method or preset."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown --preset '{preset}'; valid: {', '.join(PRESETS)}")
    recipe = PRESETS.get(preset)
    if method is not None and recipe is not None and recipe["method"] != method:
        raise ValueError(f"--preset {preset} is a {recipe['method']} recipe but --method {method} was given")
    method = method or (recipe or {}).get("method") or (DEMO_METHOD if demo else DEFAULT_METHOD)
    if method not in METHODS:
        raise ValueError(f"unknown --method '{method}'; valid: {', '.join(METHODS)}")
    cfg = merge(METHODS[method], recipe, demo, explicit, preset)
    crops = [f"--{k.replace('_', '-')}" for k in MULTI_CROP_KEYS if k in explicit]
    if crops and cfg.get("aug") != "dino":
        raise ValueError(f"{', '.join(crops)}: options of the dino augmentation's multi-crop, and this run's "
                         f"augmentation is {cfg.get('aug')}; add --aug dino or drop them")
    return cfg


# DINO's multi-crop flags: they shape the dino augmentation's views (aug_options), no other's.
MULTI_CROP_KEYS = ("local_crops_number", "local_crops_size", "global_crops_scale", "local_crops_scale")


# main_lincls.py's optimisation flags, which a linear protocol fills.
PROTOCOL_FLAGS = ("optimizer", "lr", "nesterov", "wd", "cos", "schedule", "epochs")


def linear_protocol(args: argparse.Namespace, method: str | None, arch: str | None = None) -> str:
    """Fill main_lincls.py's unset optimisation flags in place from the protocol of the
    checkpoint's `method` (MoCo's, the script's defaults as facebookresearch/moco's, when none is
    recorded), for the family of `arch` where the protocol differs by backbone family
    ("by_family") and for `arch` itself where it differs by network ("by_arch", over the
    family's). Each flag given on the command line wins on its own; the others keep the protocol's.
    `args.features`, unless already set (a trained classifier's own), becomes the protocol's
    "features" (selfsup.backbones.feature_options: {"n_last_blocks", "avgpool"}; none: the
    features the backbone's head receives).
    A recorded method this project does not know is a UsageError unless every flag is given.
    Returns a line saying what was chosen and why, for the log."""
    given = [key for key in PROTOCOL_FLAGS if getattr(args, key) is not None]  # by the command line or the run resumed
    if method is None or method in LINEAR:
        name = method or DEFAULT_METHOD
        protocol = LINEAR[name]
        if arch is not None:  # a protocol per backbone family (moco-v3: ResNets and ViTs)
            family = next(key for key, module in FAMILIES.items() if arch in module.ARCHS)
            protocol = {**protocol, **protocol.get("by_family", {}).get(family, {}),
                        **protocol.get("by_arch", {}).get(arch, {})}
        why = (f"{name}'s protocol, from {protocol['source']}" if method
               else "MoCo's protocol (the checkpoint records no method)")
    elif len(given) < len(PROTOCOL_FLAGS):
        missing = [f"--{key}" for key in PROTOCOL_FLAGS if key not in given]
        raise UsageError(f"the checkpoint was pretrained with '{method}', which has no linear-evaluation protocol here "
                         f"(known: {', '.join(LINEAR)}); give its protocol's flags: {' '.join(missing)}")
    else:
        protocol, why = {}, f"the flags given (the checkpoint's method '{method}' has no protocol here)"
    for key in PROTOCOL_FLAGS:
        if getattr(args, key) is None and key != "lr":
            setattr(args, key, protocol[key])
    if args.lr is None:
        args.lr = protocol.get("lr") or protocol["lr_per_256"] * args.batch_size / 256
    if getattr(args, "features", None) is None:
        args.features = feature_options(protocol.get("features"))
    features = feature_options(args.features)
    if not args.cos and any(m >= args.epochs for m in args.schedule):
        logger.warning("--schedule %s has milestones at or past --epochs %d: those lr drops never happen",
                       args.schedule, args.epochs)
    how = (f"{args.optimizer}{' nesterov' if args.nesterov else ''}, lr {args.lr:g}, "
           + ("cosine" if args.cos else f"x0.1 at {args.schedule}") + f", wd {args.wd:g}, {args.epochs} epochs"
           + ("" if features == DEFAULT_FEATURES else
              f", features: the cls tokens of the last {features['n_last_blocks']} block(s)"
              + (" and the mean patch token" if features["avgpool"] else "")))
    given_text = f" ({', '.join('--' + k for k in given)} given)" if given else ""
    return f"linear evaluation: {how} - {why}{given_text}; docs/EVALUATION.md"


# The optimisation values the start line accounts for, and how it shows each.
_OPTIMISATION = (("optimizer", "{}"), ("lr", "lr {:g}"), ("wd", "wd {:g}"), ("cos", None), ("warmup_epochs", "warmup {:g}"),
                 ("epochs", "{} epochs"), ("batch_size", "batch {}"))
_LAYER_NAMES = {"common": "the common defaults (facebookresearch/moco's main_moco.py)"}


def optimisation_line(cfg: dict[str, Any], preset: str | None) -> str:
    """Where each optimisation value of a run comes from, for the start line: 'optimisation: lars,
    lr 0.2, wd 1.5e-06, cosine, warmup 10, 1000 epochs: byol's defaults (lr 0.2 x batch / 256);
    batch 256: the common defaults (...); --preset byol is the paper's recipe'."""
    sources = cfg.get("config_sources", {})
    groups: dict[str, list[str]] = {}
    for key, fmt in _OPTIMISATION:
        if key == "cos":
            text = "cosine" if cfg["cos"] else f"x0.1 at {cfg['schedule']}"
        else:
            text = fmt.format(cfg[key])
        layer = sources.get(key if key != "cos" or cfg["cos"] else "schedule", "common")
        name, _, rule = layer.partition(": ")
        groups.setdefault(_LAYER_NAMES.get(name, name), []).append(text + (f" = {rule}" if rule else ""))
    line = "; ".join(f"{', '.join(values)}: {layer}" for layer, values in groups.items())
    papers = [name for name, recipe in PRESETS.items() if recipe["method"] == cfg["method"]
              and not name.startswith("small-")]
    if preset is None and papers:
        line += f"; the paper's whole recipe: --preset {' / '.join(papers)}"
    return f"optimisation: {line}"


def aug_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keywords of selfsup.data.augmentations.get_preset that a run's flags give: DINO's crops
    (--local-crops-number, --local-crops-size - by default 96 at 224 px, in proportion elsewhere -
    and the crops' area ranges) under --aug dino; none for the two-view presets, which DINO can
    train with too (its two global crops only)."""
    if cfg.get("aug") != "dino" or cfg.get("local_crops_number") is None:  # DINO over two views (--aug byol...)
        return {}
    from .data.augmentations import default_local_size

    return {"local_crops_number": cfg["local_crops_number"],
            "local_size": cfg.get("local_crops_size") or default_local_size(cfg["image_size"]),
            "global_scale": tuple(cfg["global_crops_scale"]), "local_scale": tuple(cfg["local_crops_scale"])}
