#!/usr/bin/env python
"""Convert a pretrained backbone to Detectron2's weight format (MoCo's argument order):

    python detection/convert_to_detectron2.py INPUT.pth.tar OUTPUT.pkl

INPUT is a checkpoint of this project (MoCo, BYOL, SimCLR), of facebookresearch/moco or
moco-v3, or a plain torchvision ResNet state dict. OUTPUT is a pickle of
`{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}` with
Detectron2's ResNet names, for `MODEL.WEIGHTS`. Only the backbone is written: projection and
prediction heads, the key/target network, the queue and `num_batches_tracked` are dropped and
counted; any backbone key that has no Detectron2 name is printed and left out.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

from selfsup.backbones import resnet  # noqa: E402
from selfsup.checkpoint import (  # noqa: E402
    CheckpointError,
    backbone_prefixes,
    extract_backbone,
    find_backbone,
    infer_arch_info,
    load_checkpoint,
    model_state_dict,
)

_NORM_PARAMS = r"(weight|bias|running_mean|running_var)"
# torchvision ResNet name -> Detectron2 name. Anchored patterns, so 'layer1' never matches
# inside another name and every key is converted by exactly one rule or reported.
_RULES = (
    (re.compile(r"^conv1\.weight$"), r"stem.conv1.weight"),
    (re.compile(rf"^bn1\.{_NORM_PARAMS}$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer([1-4])\.(\d+)\.conv([1-3])\.weight$"), r"res{stage}.\2.conv\3.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.bn([1-3])\.{_NORM_PARAMS}$"), r"res{stage}.\2.conv\3.norm.\4"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$"), r"res{stage}.\2.shortcut.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.downsample\.1\.{_NORM_PARAMS}$"), r"res{stage}.\2.shortcut.norm.\3"),
)


def detectron2_name(key: str) -> str | None:
    """Detectron2's name for a torchvision ResNet key ('layer1.0.bn1.weight' ->
    'res2.0.conv1.norm.weight'), or None when there is none."""
    for pattern, template in _RULES:
        m = pattern.match(key)
        if m:
            stage = int(m.group(1)) + 1 if key.startswith("layer") else 0
            return m.expand(template.replace("{stage}", str(stage)))
    return None


@dataclass
class Conversion:
    """The converted weights and what was left out, for the report."""

    model: dict[str, np.ndarray] = field(default_factory=dict)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    unconverted: list[str] = field(default_factory=list)  # backbone keys with no Detectron2 name
    dropped: Counter = field(default_factory=Counter)  # group -> number of tensors left out on purpose
    warnings: list[str] = field(default_factory=list)


def _group(key: str) -> str:
    head, _, rest = key.partition(".")
    return f"{head}.*" if rest else head


def convert(checkpoint: dict) -> Conversion:
    """Convert a loaded checkpoint (see the module docstring) to Detectron2 names."""
    state = model_state_dict(checkpoint)
    prefix, family = find_backbone(state, backbone_prefixes(checkpoint))  # DINO: its teacher, as its evaluations
    if family is not resnet:
        raise CheckpointError(f"the checkpoint holds a {family.TITLE} backbone: detection transfer here is for ResNets")
    backbone = extract_backbone(checkpoint)  # the one extraction shared with lincls and detection
    out = Conversion()
    for key in state:
        if not key.startswith(prefix):
            out.dropped[_group(key.removeprefix("module."))] += 1  # key/target network, queue, predictor
        elif key[len(prefix) :] not in backbone:
            out.dropped[_group(key[len(prefix) :])] += 1  # the head inside encoder_q (fc.*)
    for key, value in backbone.items():
        if key.endswith("num_batches_tracked"):
            out.dropped["num_batches_tracked"] += 1
            continue
        name = detectron2_name(key)
        if name is None:
            out.unconverted.append(key)
            continue
        out.model[name] = value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
        out.renamed.append((key, name))
    if not out.model:
        raise CheckpointError("no backbone tensor could be converted; is this a ResNet checkpoint?")
    conv1 = out.model["stem.conv1.weight"]
    if conv1.shape[-1] != 7:
        info = infer_arch_info(checkpoint)
        out.warnings.append(
            f"the backbone has a {conv1.shape[-2]}x{conv1.shape[-1]} first convolution "
            f"(small_stem={info.get('small_stem')}): Detectron2's stem expects 7x7 with stride 2 and a "
            "max-pool, so MODEL.WEIGHTS will not load into a standard Detectron2 ResNet. Converted anyway."
        )
    return out


def author(checkpoint: dict) -> str:
    info = infer_arch_info(checkpoint)
    details = " ".join(str(v) for v in (info.get("method"), info.get("arch")) if v)
    return f"selfsup ({details})" if details else "selfsup"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="pretraining checkpoint (.pth.tar / .pth)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every renamed key")
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.input)
        result = convert(checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.verbose:
        for old, new in result.renamed:
            print(f"{old} -> {new}")
    for key in result.unconverted:
        print(f"could not convert: {key} (no Detectron2 name; left out)")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    dropped = ", ".join(f"{n} x {g}" for g, n in sorted(result.dropped.items()))
    print(f"converted {len(result.model)} tensors; dropped {sum(result.dropped.values())} on purpose"
          + (f" ({dropped})" if dropped else "") + f"; {len(result.unconverted)} could not be converted")
    payload = {"model": result.model, "__author__": author(checkpoint), "matching_heuristics": True}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    tmp.replace(output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
