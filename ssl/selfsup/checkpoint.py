"""Checkpoints: atomic writes, safe loads, and the one backbone extraction every consumer uses.

Checkpoints hold plain types only (tensors, numbers, strings, lists, dicts), so they load with
`torch.load(..., weights_only=True)`; a file carrying pickled code is refused, never executed.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the fix."""


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


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and make sure files can be created in it."""
    folder = Path(folder)
    try:
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
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"'{path}' holds pickled Python objects that a weights-only load refuses, so it was NOT "
            "loaded and none of its code ran. Checkpoints of this project hold plain types only; if "
            "the file comes from a source you trust, load it yourself and re-save its tensors. "
            f"(torch said: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # whatever else torch.load raises on a damaged file
        raise CheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint: it is truncated, corrupt or another kind "
            f"of file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Use an intact checkpoint (an interrupted save never replaces the previous one)."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


# ----------------------------------------------------------------------------------------------
# Backbone extraction (linear evaluation, kNN, detection transfer)
# ----------------------------------------------------------------------------------------------

# Where the trained backbone lives, most specific first: this project and facebookresearch/moco
# (DDP-wrapped and not), moco-v3, then a bare model.
_BACKBONE_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.", "module.", "")
# Keys of the projection head inside encoder_q, or of a linear classifier and its feature
# standardisation (main_lincls.py --feature-bn): dropped, linear evaluation adds its own.
_HEAD_PREFIXES = ("fc.", "head.", "norm.")


def model_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The model weights of a checkpoint: its 'state_dict' (this project, MoCo), 'model'
    (torchvision references, DINO), or the mapping itself when it already is one."""
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
    """The trained backbone's weights under torchvision ResNet names (conv1.weight, layer1.0...).

    Keeps `encoder_q` (the network being trained, for every method), strips its prefix and drops
    the projection/prediction heads, the key/target network and the MoCo queue. Works for this
    project's checkpoints, facebookresearch/moco's, moco-v3's and a plain torchvision state dict.
    """
    state = model_state_dict(checkpoint)
    prefix = backbone_prefix(state)
    return {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(_HEAD_PREFIXES)
    }


def backbone_prefix(state: Mapping[str, Any]) -> str:
    """The key prefix under which `state` (model weights) holds the trained backbone, e.g.
    'module.encoder_q.'; lets a tool report what `extract_backbone` left out."""
    for prefix in _BACKBONE_PREFIXES:
        if f"{prefix}conv1.weight" in state:
            return prefix
    raise CheckpointError(
        "no ResNet backbone found in the checkpoint: expected keys like 'module.encoder_q.conv1.weight' "
        f"(this project, facebookresearch/moco) or 'conv1.weight'; first keys are {list(state)[:5]}"
    )


def load_backbone(model: nn.Module, backbone: Mapping[str, torch.Tensor], allowed_missing=("fc.weight", "fc.bias")) -> None:
    """Load backbone weights into a torchvision ResNet whose `fc` is new.

    The only keys allowed to be missing are `allowed_missing` (the new classifier); anything
    else missing, any unexpected key and any shape mismatch is an error that lists them, so a
    silently random backbone is impossible.
    """
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


def infer_arch_info(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint says about how to rebuild its backbone: arch, method, small stem."""
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), Mapping) else {}
    info = {
        "arch": checkpoint.get("arch") or args.get("arch"),
        "method": checkpoint.get("method") or args.get("method"),
        "small_stem": args.get("small_stem"),
    }
    if info["small_stem"] is None:
        try:
            conv1 = extract_backbone(checkpoint)["conv1.weight"]
            info["small_stem"] = conv1.shape[-1] == 3
        except CheckpointError:
            pass
    return info
