"""Backbones behind one small interface: nothing outside this package reaches into a network's
layers, so a new family of networks (a Vision Transformer) serves the methods, the evaluations,
the checkpoints and the detection converter without touching them.

    build_backbone(arch, num_classes, small_stem=False, **kwargs) -> nn.Module
    feature_dim(net) -> int               width of the features the head receives
    head_name(net) -> str                 the head's attribute: "fc" for ResNets ("head" for a ViT)
    get_head(net) -> nn.Module            the classifier, or the projection head a method put there
    set_head(net, module) -> None         replace it (nn.Identity() removes it)
    forward_features(net, x) -> Tensor    N x feature_dim, the head left out
    forward_features(net, x, n_last_blocks=4, avgpool=False), feature_dim(net, ...)
                                          an evaluation's other features (DINO's linear
                                          evaluation of ViTs; FEATURE_OPTIONS)
    set_drop_path(net, rate) -> None      the stochastic depth of a built network (DINO's teacher: 0)

A family is one module of this package, registered in FAMILIES. It provides:

    ARCHS                      the names `build_backbone` takes
    TITLE                      how messages name the family ("ResNet")
    HEAD                       the head's attribute name (dotted for a nested one: "heads.head")
    MARKER                     a state-dict key every network of the family has, e.g.
                               "conv1.weight": how a checkpoint's backbone is found and named
    build(arch, num_classes, small_stem=False, **kwargs) -> nn.Module
    owns(net) -> bool          whether `net` belongs to the family
    feature_dim(net) -> int
    forward_features(net, x) -> Tensor
    describe(weights) -> dict  what the weights say about how to rebuild the net (e.g. small_stem)
and optionally rebuild_options(weights) -> dict (constructor keywords that rebuild the net from
its weights), flag_options(flags) -> dict (constructor keywords from main_pretrain.py's flags),
FEATURE_OPTIONS (the keywords beyond x its forward_features and feature_dim take: a ViT's
n_last_blocks and avgpool), set_drop_path(net, rate) (stochastic depth),
FOREIGN_MARKER and from_timm_names(state, prefix): another library's names for the
family's networks (moco-v3's timm ViTs), translated when a checkpoint holds them; and, for a
family whose variants the weights cannot tell apart (ViT-S with 6 or 12 heads), record(net) ->
dict (what a checkpoint stores beside the weights) and identify(weights, arch, recorded, origin)
-> arch (the variant, from that record, the checkpoint's publisher, or an error naming the choices).
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from . import resnet, vit

# name -> family module; a new family: its module and one line here.
FAMILIES: dict[str, ModuleType] = {"resnet": resnet, "vit": vit}

# Every architecture any family builds (the choices of -a).
ARCHS: tuple[str, ...] = tuple(arch for family in FAMILIES.values() for arch in family.ARCHS)
# What -a's help says about names that two publishers use for two networks.
ARCH_HELP = ("ViT-S: vit_small is moco-v3's (12 heads), deit_small DeiT/DINO/timm's (6 heads); vit_base has 12 in "
             "both; _p8 / _p4: patch 8 / patch 4 (for 32-pixel images)")


def family_of_arch(arch: str) -> ModuleType:
    """The family that builds `arch`; a ValueError listing the valid names otherwise."""
    for family in FAMILIES.values():
        if arch in family.ARCHS:
            return family
    raise ValueError(f"unknown arch '{arch}'; valid: {', '.join(ARCHS)}")


def family_of(net: nn.Module) -> ModuleType:
    """The family `net` belongs to; a TypeError naming the families otherwise."""
    for family in FAMILIES.values():
        if family.owns(net):
            return family
    raise TypeError(
        f"{type(net).__name__} belongs to no backbone family ({', '.join(FAMILIES)}): a base_encoder must build "
        "a torchvision-style ResNet whose head is `fc`, or a network of another family in selfsup.backbones"
    )


def build_backbone(arch: str, num_classes: int, small_stem: bool = False, **kwargs: Any) -> nn.Module:
    """A randomly initialised `arch` whose head outputs `num_classes` values. `small_stem`: the
    small-image variant (ResNets: a 3x3 stride-1 first convolution, no max-pool)."""
    return family_of_arch(arch).build(arch, num_classes, small_stem, **kwargs)


def backbone_constructor(arch: str, small_stem: bool = False, **kwargs: Any) -> Callable[..., nn.Module]:
    """A torchvision-style constructor `f(num_classes) -> nn.Module` for `arch` (what the methods
    take as `base_encoder`); an unknown `arch` is a ValueError here, not at the first call."""
    family_of_arch(arch)
    return partial(build_backbone, arch, small_stem=small_stem, **kwargs)


# The features every evaluation reads unless its protocol says otherwise: the ones the head
# receives (a ResNet's pooled last stage, a ViT's final cls token).
DEFAULT_FEATURES: dict[str, Any] = {"n_last_blocks": 1, "avgpool": False}


def feature_options(features: Mapping[str, Any] | None) -> dict[str, Any]:
    """`features` (a linear protocol's "features", a classifier checkpoint's record) completed with
    DEFAULT_FEATURES: {"n_last_blocks": int, "avgpool": bool}. An unknown key is a ValueError."""
    unknown = sorted(set(features or {}) - set(DEFAULT_FEATURES))
    if unknown:
        raise ValueError(f"unknown feature options {unknown}; valid: {', '.join(DEFAULT_FEATURES)}")
    out = {**DEFAULT_FEATURES, **(features or {})}
    return {"n_last_blocks": int(out["n_last_blocks"]), "avgpool": bool(out["avgpool"])}


def _family_for_features(net: nn.Module, n_last_blocks: int, avgpool: bool) -> tuple[ModuleType, dict[str, Any]]:
    """`net`'s family and the keywords beyond x to call its forward_features / feature_dim with
    (none for the default features: every family takes those)."""
    family = family_of(net)
    options = {"n_last_blocks": n_last_blocks, "avgpool": avgpool}
    if options == DEFAULT_FEATURES:
        return family, {}
    if set(getattr(family, "FEATURE_OPTIONS", ())) != set(options):
        raise ValueError(f"a {family.TITLE}'s features are the ones its head receives: n_last_blocks={n_last_blocks}, "
                         f"avgpool={avgpool} are options of a Vision Transformer's (DINO's linear evaluation); "
                         "give them per backbone family or architecture in a linear protocol")
    return family, options


def feature_dim(net: nn.Module, n_last_blocks: int = 1, avgpool: bool = False) -> int:
    """Width of the features `net` hands its head - or, with `n_last_blocks` / `avgpool`, of
    those forward_features gives with them."""
    family, options = _family_for_features(net, n_last_blocks, avgpool)
    return family.feature_dim(net, **options)


def head_name(net: nn.Module) -> str:
    """The attribute (and state-dict prefix) of `net`'s head: "fc" for ResNets."""
    return family_of(net).HEAD


def _parent(net: nn.Module, path: str) -> tuple[nn.Module, str]:
    *outer, last = path.split(".")
    for name in outer:
        net = getattr(net, name)
    return net, last


def get_head(net: nn.Module) -> nn.Module:
    """`net`'s head: its classifier, or the projection head a method put in its place."""
    parent, name = _parent(net, head_name(net))
    return getattr(parent, name)


def set_head(net: nn.Module, module: nn.Module) -> None:
    """Replace `net`'s head by `module` (nn.Identity() removes it: `net(x)` then gives features)."""
    parent, name = _parent(net, head_name(net))
    setattr(parent, name, module)


def forward_features(net: nn.Module, x: torch.Tensor, n_last_blocks: int = 1, avgpool: bool = False) -> torch.Tensor:
    """x: N x 3 x H x W -> N x feature_dim(net): `net` without its head, whatever the head is.
    For a ViT, `n_last_blocks` > 1 concatenates the cls tokens of the last blocks and `avgpool`
    adds the mean patch token (DINO's linear evaluation, selfsup.backbones.vit.forward_features);
    another family takes only the defaults (a ValueError otherwise)."""
    family, options = _family_for_features(net, n_last_blocks, avgpool)
    return family.forward_features(net, x, **options)


class Features(nn.Module):
    """`net` seen without its head, as a module (`extract_features` takes one); it shares `net`'s
    weights and takes its train/eval mode, so an evaluation during training sees the live
    network. `n_last_blocks`, `avgpool`: forward_features' options."""

    def __init__(self, net: nn.Module, n_last_blocks: int = 1, avgpool: bool = False) -> None:
        super().__init__()
        self.net = net
        self.options = {"n_last_blocks": n_last_blocks, "avgpool": avgpool}
        _family_for_features(net, n_last_blocks, avgpool)  # refused here, not at the first batch
        self.train(net.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_features(self.net, x, **self.options)  # N x D


def set_drop_path(net: nn.Module, rate: float) -> None:
    """Set the stochastic depth of the built network `net` (a ViT's, DINO's rule: per sample,
    rising linearly over the blocks to `rate` at the last; 0 turns it off, as in DINO's teacher,
    a copy of its student). A family without stochastic depth takes only 0."""
    hook = getattr(family_of(net), "set_drop_path", None)
    if hook is not None:
        hook(net, rate)
    elif rate:
        raise ValueError(f"a {family_of(net).TITLE} has no stochastic depth (drop path rate {rate})")


def rebuild_options(arch: str, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor keywords beyond small_stem that rebuild `arch` from its `weights` (a ViT's image size)."""
    hook = getattr(family_of_arch(arch), "rebuild_options", None)
    return hook(weights) if hook else {}


def flag_options(arch: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor keywords of `arch` that main_pretrain.py's `flags` give (a ViT's image
    size, --stop-grad-conv1, --vit-init and --drop-path-rate; a ResNet's --zero-init-residual)."""
    hook = getattr(family_of_arch(arch), "flag_options", None)
    return hook(flags) if hook else {}


def record(net: nn.Module) -> dict[str, Any]:
    """What a checkpoint records beside `net`'s weights so that the same network is rebuilt from it
    (a ViT's head count; nothing for a ResNet)."""
    hook = getattr(family_of(net), "record", None)
    return hook(net) if hook else {}


def identify(family: ModuleType, weights: Mapping[str, torch.Tensor], arch: str | None,
             recorded: Mapping[str, Any] | None, origin: str | None) -> str | None:
    """The architecture `weights` (under `family`'s names) belong to: `arch` as named by the
    checkpoint or the user, checked - and for a family whose variants share their shapes, decided -
    by the family from the checkpoint's `record` and its publisher (`origin`: 'moco-v3', 'timm').
    Raises ValueError naming the choices when the weights fit several variants and nothing tells."""
    hook = getattr(family, "identify", None)
    return hook(weights, arch, recorded, origin) if hook else arch


def check_record(net: nn.Module, recorded: Mapping[str, Any] | None, what: str) -> None:
    """A ValueError when `what` (one of this project's checkpoints) holds another variant than
    `net`: same shapes, other network, never loaded silently. A checkpoint written before they
    recorded it holds the family's LEGACY_RECORD (a ViT's 6 heads)."""
    mine = record(net)
    if not mine:
        return
    legacy = recorded is None
    recorded = getattr(family_of(net), "LEGACY_RECORD", None) if legacy else recorded
    if recorded == mine:
        return
    names = getattr(family_of(net), "LEGACY_NAMES", {})
    raise ValueError(
        f"{what} holds a {family_of(net).TITLE} with {dict(recorded or {})}, this model has {mine}"
        + (f" (it was written before checkpoints recorded the head count, when this project's ViT-S had 6 heads: "
           f"continue it with -a {' or -a '.join(names.values())})" if legacy and names else ""))


def translate_foreign(state: Mapping[str, Any], prefixes: tuple[str, ...]) -> Mapping[str, Any]:
    """`state` with a backbone saved under another library's names (moco-v3's timm ViTs) renamed
    to its family's; unchanged otherwise."""
    for prefix in prefixes:
        for family in FAMILIES.values():
            marker = getattr(family, "FOREIGN_MARKER", None)
            if marker and f"{prefix}{marker}" in state and f"{prefix}{family.MARKER}" not in state:
                return family.from_timm_names(state, prefix)
    return state


def find_in_state(state: Mapping[str, Any], prefixes: tuple[str, ...]) -> tuple[str, ModuleType] | None:
    """The first of `prefixes` under which `state` (model weights) holds a backbone of some family,
    and that family (each family's MARKER key tells); None when there is none."""
    for prefix in prefixes:
        for family in FAMILIES.values():
            if f"{prefix}{family.MARKER}" in state:
                return prefix, family
    return None


__all__ = ["ARCHS", "ARCH_HELP", "DEFAULT_FEATURES", "FAMILIES", "Features", "backbone_constructor", "build_backbone",
           "check_record", "family_of", "family_of_arch", "feature_dim", "feature_options", "find_in_state",
           "flag_options", "forward_features", "get_head", "head_name", "identify", "rebuild_options", "record",
           "set_drop_path", "set_head", "translate_foreign"]
