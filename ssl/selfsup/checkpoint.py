"""Checkpoints: atomic writes, safe loads, and the one backbone extraction every consumer uses
(the backbone found and named through selfsup.backbones).

Checkpoints hold plain types only (tensors, numbers, strings, lists, dicts), so they load with
`torch.load(..., weights_only=True)`; a file carrying pickled code is refused, never executed.
One class is let through: argparse.Namespace, the `args` of DINO's checkpoints, read as the dict
of its attributes (`SAFE_CLASSES`).
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from .backbones import FAMILIES, find_in_state, get_head, head_name, identify, translate_foreign
from .errors import CheckpointError


def plain_args(args: argparse.Namespace | dict) -> dict[str, Any]:
    """The arguments that are plain values (numbers, strings, lists, None): what a checkpoint may
    hold (it loads with weights_only=True)."""
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()
    return {k: v for k, v in items if isinstance(v, (int, float, str, bool, list, type(None)))}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(folder: str | os.PathLike, create: bool = True) -> Path:
    """Make sure files can be created in `folder`: created if needed - or, without `create`, left
    as it is, its nearest existing parent checked instead (a run refused later leaves no folder)."""
    folder = Path(folder)
    try:
        if not create and not folder.exists():
            parent = next(p for p in folder.absolute().parents if p.exists())
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, f"'{parent}' is not a folder this process may create folders in")
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CheckpointError(
            f"cannot write to the output folder '{folder}' ({e.strerror or e}). "
            "Choose another --output-dir or fix its permissions."
        ) from e
    return folder


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` so that `path` is always either the old file or the new one.

    Writes a temporary file in the same folder, fsyncs it, renames it over `path` and fsyncs the
    folder. If anything fails (a full disk, a permission error) the temporary file is removed,
    the previous checkpoint at `path` is untouched, and a CheckpointError says so.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            kept = "the previous checkpoint there is intact" if path.exists() else "nothing was written"
            raise CheckpointError(f"could not write checkpoint '{path}': {reason}; {kept}.") from e
        raise


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


# The classes a weights-only load lets through besides plain types: argparse.Namespace, which
# facebookresearch/dino's main_dino.py saves as its checkpoints' `args`. Letting it through runs
# no code of the file: the weights-only unpickler still refuses every other global (a function to
# call, another class), makes a Namespace with object.__new__ (NEWOBJ; Namespace has no __new__,
# __reduce__ or __setstate__ of its own) and fills its __dict__ (BUILD) with values it admits
# anyway - numbers, strings, tuples, lists, dicts, tensors; called instead (REDUCE), its only code,
# __init__(**kwargs), takes no positional argument. Allowed for the loads of load_checkpoint only.
SAFE_CLASSES: tuple[type, ...] = (argparse.Namespace,)


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (PK...) or, in the legacy format, a pickle (protocol 2+: 0x80)."""
    return _head(path).startswith((b"PK", b"\x80"))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True` and explain every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (or is not a file)")
    if path.stat().st_size and not _looks_like_torch_file(path):  # an image, a text file, ...
        raise CheckpointError(
            f"'{path}' is not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with "
            f"{_head(path)!r}). Pass the .pth/.pth.tar file that torch.save wrote."
        )
    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"'{path}' holds pickled Python objects that a weights-only load refuses, so it was NOT "
            "loaded and none of its code ran. Checkpoints of this project hold plain types only (and "
            "DINO's, an argparse.Namespace besides); if the file comes from a source you trust, load "
            f"it yourself and re-save its tensors. (torch said: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # whatever else torch.load raises on a damaged file
        raise CheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint: it is truncated, corrupt or another kind "
            f"of file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Use an intact checkpoint (an interrupted save never replaces the previous one)."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dictionary")
    # DINO's `args`: a plain dict as this project's, so every reader of "args" sees one type.
    return {k: dict(vars(v)) if isinstance(v, argparse.Namespace) else v for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------
# Backbone extraction (linear evaluation, kNN, detection transfer)
# ----------------------------------------------------------------------------------------------

# Where the trained backbone lives, most specific first: this project and facebookresearch/moco
# (DDP-wrapped and not), moco-v3, DINO (its MultiCropWrapper's `backbone`, DDP-wrapped in a
# network with BatchNorm), then a bare model. A checkpoint of this project that names the network
# its evaluations read (`evaluated`: DINO's teacher, encoder_k) has that one's first.
_BACKBONE_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.", "module.backbone.",
                      "backbone.", "module.", "")
# The keys of facebookresearch/dino's full checkpoints (main_dino.py's save_dict) that tell one.
_DINO_KEYS = ("student", "teacher", "dino_loss")
# DINO's published backbone-only files (its README and hubconf.py): bare state dicts - a ViT under
# timm's names, a ResNet-50 under torchvision's, no head - that nothing inside tells from timm's
# or torchvision's own; their published names do. File name -> the network here.
DINO_BACKBONE_FILES = {"dino_deitsmall16_pretrain.pth": "deit_small", "dino_deitsmall8_pretrain.pth": "deit_small_p8",
                       "dino_vitbase16_pretrain.pth": "vit_base", "dino_vitbase8_pretrain.pth": "vit_base_p8",
                       "dino_resnet50_pretrain.pth": "resnet50"}
# Saved beside a classifier's head: main_lincls.py --feature-bn's standardisation of the features.
# Dropped with the head (the projection head inside encoder_q, or a linear classifier): linear
# evaluation adds its own.
_CLASSIFIER_EXTRAS = ("norm.",)


def is_dino_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether `checkpoint` is one of facebookresearch/dino's full checkpoints ({'student',
    'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'}, main_dino.py)."""
    return all(key in checkpoint for key in _DINO_KEYS) and isinstance(checkpoint["teacher"], Mapping)


def backbone_prefixes(checkpoint: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Where to look for the backbone in `checkpoint`'s weights, first the network it names as
    evaluated (this project's DINO: the teacher, encoder_k)."""
    evaluated = (checkpoint or {}).get("evaluated")
    if isinstance(evaluated, str) and evaluated:
        return (f"module.{evaluated}.", f"{evaluated}.", *_BACKBONE_PREFIXES)
    return _BACKBONE_PREFIXES


def model_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The model weights of a checkpoint: its 'state_dict' (this project, MoCo), 'model'
    (torchvision references, DeiT), the teacher of a full DINO checkpoint (what DINO's eval_linear.py
    and eval_knn.py read, their --checkpoint_key teacher), or the mapping itself when it already
    is one (DINO's and timm's backbone-only files)."""
    if is_dino_checkpoint(checkpoint):
        return checkpoint["teacher"]
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(
        f"no model weights found: the checkpoint has keys {sorted(checkpoint)[:10]}, none of them "
        "'state_dict' or 'model'"
    )


def extract_backbone(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The trained backbone's weights under its family's names (torchvision's for a ResNet:
    conv1.weight, layer1.0...).

    Keeps the network the checkpoint's method evaluates (`evaluated`: DINO's teacher; else
    `encoder_q`, the network being trained), strips its prefix and drops
    the projection/prediction heads, the key/target network and the MoCo queue. Works for this
    project's checkpoints, facebookresearch/moco's, moco-v3's and a plain torchvision state dict.
    """
    prefixes = backbone_prefixes(checkpoint)
    state = translate_foreign(model_state_dict(checkpoint), prefixes)  # moco-v3's and DINO's timm ViTs
    prefix, family = find_backbone(state, prefixes)
    dropped = (f"{family.HEAD}.", *_CLASSIFIER_EXTRAS)
    return {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(dropped)
    }


def find_backbone(state: Mapping[str, Any], prefixes: tuple[str, ...] = _BACKBONE_PREFIXES) -> tuple[str, ModuleType]:
    """The key prefix under which `state` (model weights) holds the trained backbone, e.g.
    'module.encoder_q.', and the backbone's family (selfsup.backbones)."""
    found = find_in_state(translate_foreign(state, prefixes), prefixes)
    if found is None:
        families = FAMILIES.values()
        expected = " or ".join(f"'module.encoder_q.{f.MARKER}' (this project, facebookresearch/moco) or '{f.MARKER}'"
                               for f in families)
        raise CheckpointError(
            f"no {' or '.join(f.TITLE for f in families)} backbone found in the checkpoint: expected keys like "
            f"{expected}; first keys are {list(state)[:5]}"
        )
    return found


def backbone_prefix(state: Mapping[str, Any]) -> str:
    """The key prefix under which `state` holds the trained backbone (see find_backbone); lets a
    tool report what `extract_backbone` left out."""
    return find_backbone(state)[0]


def load_backbone(model: nn.Module, backbone: Mapping[str, torch.Tensor],
                  allowed_missing: Iterable[str] | None = None) -> None:
    """Load backbone weights into `model`, whose head is new.

    The only keys allowed to be missing are `allowed_missing` (default: the head's, e.g. fc.weight
    and fc.bias); anything else missing, any unexpected key and any shape mismatch is an error that
    lists them, so a silently random backbone is impossible.
    """
    if allowed_missing is None:
        allowed_missing = [f"{head_name(model)}.{k}" for k in get_head(model).state_dict()]
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in backbone.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            "the checkpoint's backbone does not fit this architecture (was it trained with another "
            "--arch or without/with the small-image stem?): " + "; ".join(mismatched[:8])
            + (f" ... and {len(mismatched) - 8} more" if len(mismatched) > 8 else "")
        )
    result = model.load_state_dict(backbone, strict=False)
    missing = sorted(set(result.missing_keys) - set(allowed_missing))
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            "the checkpoint's backbone does not match the model. "
            f"Missing keys: {missing or 'none'}. Unexpected keys: {unexpected or 'none'}."
        )


# moco-v3's checkpoints keep the trained network as `base_encoder` (its moco/builder.py).
_MOCOV3_PREFIXES = ("module.base_encoder.", "base_encoder.")


def checkpoint_origin(state: Mapping[str, Any]) -> str | None:
    """Who wrote the model weights `state`, where their layout tells: 'moco-v3' (its `base_encoder`,
    or a ViT under timm's names whose position embedding is moco-v3's fixed sin-cos one, as its
    convert_to_deit.py writes it), 'timm' (a ViT under timm's names with a learned position
    embedding: timm's, DeiT's and DINO's backbone-only files), or None (this project,
    facebookresearch/moco, torchvision). DINO's checkpoints are told by what holds the weights
    (infer_arch_info)."""
    if any(k.startswith(_MOCOV3_PREFIXES) for k in state):
        return "moco-v3"
    for prefix in ("module.", ""):
        for family in FAMILIES.values():
            marker = getattr(family, "FOREIGN_MARKER", None)
            if marker and f"{prefix}{marker}" in state and hasattr(family, "foreign_origin"):
                return family.foreign_origin(state, prefix)
    return None


def infer_arch_info(checkpoint: Mapping[str, Any], arch: str | None = None,
                    file_name: str | None = None) -> dict[str, Any]:
    """What a checkpoint says about how to rebuild its backbone: arch, method, small stem, and who
    wrote it (`origin`, checkpoint_origin; 'dino' for facebookresearch/dino's full checkpoints and
    its published backbone-only files, recognised by `file_name`, which are DINO's method). `arch`
    (the user's -a) must agree with the checkpoint's record; for a ViT it names the variant when
    the checkpoint cannot (selfsup.backbones.identify). Raises ValueError naming the choices when
    the variant cannot be told."""
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), Mapping) else {}
    state = model_state_dict(checkpoint)
    origin = checkpoint_origin(state)
    recorded = checkpoint.get("arch") or args.get("arch")
    bare = all(isinstance(v, torch.Tensor) for v in checkpoint.values())  # a backbone-only file
    dino_file = DINO_BACKBONE_FILES.get(file_name or "") if bare else None
    if is_dino_checkpoint(checkpoint) or dino_file:
        # DINO's args.arch names its 6-head ViT-S `vit_small` (12 heads here): its layout and DeiT's
        # head counts tell the variant (PUBLISHED_HEADS['dino']), its name only a ResNet's.
        origin, recorded = "dino", dino_file or args.get("arch")
    info = {
        "arch": recorded,
        "method": checkpoint.get("method") or args.get("method")
        or {"moco-v3": "mocov3", "dino": "dino"}.get(origin or ""),
        "small_stem": args.get("small_stem"),
        "origin": origin,
    }
    try:
        family = find_backbone(state, backbone_prefixes(checkpoint))[1]
    except CheckpointError:
        family = None
    if family is not None and hasattr(family, "identify"):
        # A name alone does not say which variant: this project's ViT-S had 6 heads before its
        # checkpoints recorded the count, moco-v3's has 12, DINO's `vit_small` 6; trust it with the
        # record or from moco-v3 - DINO's variant comes from its layout, identify's origin 'dino'.
        variant = checkpoint.get("backbone_variant")
        trusted = recorded if (variant is not None or origin == "moco-v3") else None
        if arch is not None and trusted is not None and arch != trusted:
            raise ValueError(f"the checkpoint holds a {trusted} backbone but -a {arch} was given; leave -a out to use "
                             "the checkpoint's architecture")
        info["arch"] = identify(family, extract_backbone(checkpoint), arch or trusted, variant, origin)
    elif arch is not None and recorded is not None and arch != recorded:
        raise ValueError(f"the checkpoint holds a {recorded} backbone but -a {arch} was given; leave -a out to use "
                         "the checkpoint's architecture")
    elif arch is not None:
        info["arch"] = arch
    if info["small_stem"] is None and family is not None:  # what the weights say
        info["small_stem"] = family.describe(extract_backbone(checkpoint)).get("small_stem")
    return info
