"""MoCo, MoCo v3, BYOL, SimCLR and DINO around any backbone of selfsup.backbones, behind one builder.

    from selfsup.builder import MoCo, MoCoV3, BYOL, SimCLR, DINO, build_model
    model = build_model("byol", "resnet18", small_stem=True)

The methods live in selfsup.methods (one module each), the backbones in selfsup.backbones, the
heads and helpers they are made of in selfsup.networks; this module is the one entry point the
README documents.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from .methods import BYOL, DINO, METHODS, Method, MoCo, MoCoV3, SimCLR
from .backbones import ARCHS, backbone_constructor
from .networks import SplitBatchNorm, compile_networks

if TYPE_CHECKING:
    from .distributed import DistInfo

__all__ = ["ARCHS", "BYOL", "DINO", "METHODS", "Method", "MoCo", "MoCoV3", "SimCLR", "SplitBatchNorm", "backbone_constructor",
           "build_model", "check_sync_bn", "compile_networks", "method_options"]


def method_options(method: str) -> set[str]:
    """The keyword options of a method's constructor (everything but base_encoder)."""
    params = inspect.signature(METHODS[method].__init__).parameters
    return {name for name in params if name not in ("self", "base_encoder")}


def build_model(
    method: str, arch: str, small_stem: bool = False, sync_bn: bool = False,
    backbone_options: dict[str, Any] | None = None, **options
) -> Method:
    """Build a method of METHODS around a backbone of selfsup.backbones.

    Args:
        method: a name of METHODS ('moco', 'byol', 'simclr', 'mocov3', 'dino').
        arch: a backbone name (see ARCHS), e.g. a torchvision ResNet's.
        small_stem: the small-image variant (ResNets: 3x3 stride-1 first conv and no max-pool,
            for 28-64 pixel images).
        sync_bn: convert every BatchNorm to SyncBatchNorm (needs a process group; CUDA only).
        backbone_options: keywords for the backbone's constructor (build_backbone's kwargs).
        **options: the method's constructor arguments (e.g. dim, K, m, T, mlp, hidden_dim,
            bn_splits); `None` values are ignored so callers can pass optional flags through.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; valid: {', '.join(METHODS)}")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - method_options(method)
    if unknown:
        raise ValueError(
            f"method '{method}' does not take option(s) {sorted(unknown)}; "
            f"it takes {sorted(method_options(method))}"
        )
    model = METHODS[method](backbone_constructor(arch, small_stem, **(backbone_options or {})), **options)
    if sync_bn:
        if options.get("bn_splits", 1) > 1:
            raise ValueError("sync_bn and bn_splits > 1 are alternatives; choose one")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def check_sync_bn(requested: bool, accum_iter: int, dist: "DistInfo") -> bool:
    """Whether the run's BatchNorm is SyncBatchNorm (--sync-bn): in one process without a process
    group it is plain BatchNorm (a byol/simclr preset on a laptop), which the run records. A
    UsageError naming the fix where it cannot work: with micro-batches (--accum-iter), which no
    SyncBN spans, and with several gloo or CPU processes."""
    from .errors import UsageError

    if requested and accum_iter > 1:
        raise UsageError(f"--sync-bn normalises over the whole global batch, which {accum_iter} micro-batches never "
                         "see at once: add --no-sync-bn (each micro-batch then normalises as one GPU's, and the run "
                         f"equals {dist.world_size * accum_iter} processes without SyncBN)")
    sync = bool(requested and dist.distributed)
    if sync and dist.world_size > 1 and (dist.device.type != "cuda" or dist.backend == "gloo"):
        raise UsageError("--sync-bn (the byol and simclr presets' cross-replica BatchNorm) needs CUDA devices and NCCL; "
                         "with gloo processes add --no-sync-bn (per-process BatchNorm), or train in one process, "
                         "whose BatchNorm already sees the whole batch")
    return sync
