"""detection/convert_to_detectron2.py: Detectron2 names and shapes, what is dropped, the CLI."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import REPO, run_script

sys.path.insert(0, str(REPO))  # `import detection` from the repository root

from selfsup import build_model  # noqa: E402

from detection.convert_to_detectron2 import convert, detectron2_name, main  # noqa: E402

# Blocks per stage and convolutions per block, from the ResNet paper's table (independent of
# torchvision's and Detectron2's code).
SPEC = {"resnet18": ((2, 2, 2, 2), 2, (64, 128, 256, 512)), "resnet50": ((3, 4, 6, 3), 3, (256, 512, 1024, 2048))}
NORM_SUFFIXES = ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var")


def expected_names(arch: str) -> set[str]:
    blocks, convs, widths = SPEC[arch]
    names = {"stem.conv1.weight"} | {f"stem.conv1.{s}" for s in NORM_SUFFIXES}
    in_ch = 64
    for stage, (n, width) in enumerate(zip(blocks, widths)):
        for b in range(n):
            for c in range(1, convs + 1):
                names |= {f"res{stage + 2}.{b}.conv{c}.weight"} | {f"res{stage + 2}.{b}.conv{c}.{s}" for s in NORM_SUFFIXES}
        # A projection shortcut where the first block changes width or resolution.
        if in_ch != width or stage > 0:
            names |= {f"res{stage + 2}.0.shortcut.weight"} | {f"res{stage + 2}.0.shortcut.{s}" for s in NORM_SUFFIXES}
        in_ch = width
    return names


def project_checkpoint(method: str, arch: str, **options) -> tuple[dict, nn.Module]:
    """A checkpoint as main_pretrain.py writes it (DDP names, plain-type args)."""
    torch.manual_seed(0)
    model = build_model(method, arch, **options)
    ckpt = {"epoch": 1, "step": 0, "arch": arch, "method": method,
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": {}, "scaler": {}, "args": {"arch": arch, "method": method, "small_stem": False}}
    return ckpt, model


@pytest.mark.parametrize("method,arch,options", [
    ("byol", "resnet18", dict(hidden_dim=64, dim=32)),
    ("moco", "resnet50", dict(K=32, mlp=True)),
])
def test_names_shapes_and_values(method, arch, options):
    ckpt, model = project_checkpoint(method, arch, **options)
    result = convert(ckpt)
    assert set(result.model) == expected_names(arch)
    assert result.unconverted == [] and result.warnings == []
    assert all(isinstance(v, np.ndarray) for v in result.model.values())
    widths = SPEC[arch][2]
    assert result.model["stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert result.model["res5.0.shortcut.weight"].shape == (widths[3], widths[2], 1, 1)
    assert result.model["res4.0.conv1.norm.running_var"].shape == (256,)  # res4 block width, both depths
    # Values are the online network's (encoder_q), not the key/target network's.
    q = model.encoder_q
    np.testing.assert_array_equal(result.model["stem.conv1.weight"], q.conv1.weight.detach().numpy())
    np.testing.assert_array_equal(result.model["res3.1.conv2.norm.running_mean"], q.layer2[1].bn2.running_mean.numpy())
    np.testing.assert_array_equal(result.model["res2.0.conv1.norm.bias"], q.layer1[0].bn1.bias.detach().numpy())


def test_heads_and_other_networks_are_dropped_and_counted():
    ckpt, model = project_checkpoint("byol", "resnet18", hidden_dim=64, dim=32)
    result = convert(ckpt)
    state = ckpt["state_dict"]
    assert not any(s in k for k in result.model for s in ("fc", "predictor", "encoder_k", "num_batches_tracked"))
    assert result.dropped["encoder_k.*"] == sum(k.startswith("module.encoder_k.") for k in state)
    assert result.dropped["predictor.*"] == sum(k.startswith("module.predictor.") for k in state)
    assert result.dropped["fc.*"] == sum(k.startswith("module.encoder_q.fc.") for k in state)
    bn_layers = sum(isinstance(m, nn.BatchNorm2d) for m in model.encoder_q.modules())
    assert result.dropped["num_batches_tracked"] == bn_layers


def test_a_dino_checkpoint_converts_its_teacher():
    # DINO's evaluations read the teacher (eval_linear.py's --checkpoint_key teacher); the checkpoint
    # records it as the network evaluated, and detection transfer takes it too.
    ckpt, model = project_checkpoint("dino", "resnet18", out_dim=32, dim=16, hidden_dim=32)
    ckpt["evaluated"] = "encoder_k"
    teacher = {k: v + 1.0 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()
               if k.startswith("module.encoder_k.")}
    ckpt["state_dict"].update(teacher)  # a teacher unlike the student
    result = convert(ckpt)
    assert set(result.model) == expected_names("resnet18")
    np.testing.assert_array_equal(result.model["stem.conv1.weight"],
                                  teacher["module.encoder_k.conv1.weight"].numpy())
    state = ckpt["state_dict"]
    assert result.dropped["encoder_q.*"] == sum(k.startswith("module.encoder_q.") for k in state)
    assert result.dropped["fc.*"] == sum(k.startswith("module.encoder_k.fc.") for k in state)


def test_facebookresearch_moco_checkpoint():
    """The layout of MoCo v2's released checkpoints: an 'arch', 'state_dict' with
    module.encoder_q/encoder_k (2-layer MLP head as fc.0/fc.2) and module.queue."""
    torch.manual_seed(0)
    enc = torchvision.models.resnet50(num_classes=128)
    enc.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), enc.fc)
    state = {}
    for prefix in ("module.encoder_q.", "module.encoder_k."):
        state.update({prefix + k: v for k, v in enc.state_dict().items()})
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    result = convert({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {}})
    assert set(result.model) == expected_names("resnet50")
    assert result.dropped["fc.*"] == 4 and result.dropped["queue"] == 1
    np.testing.assert_array_equal(result.model["res5.2.conv3.weight"], enc.layer4[2].conv3.weight.detach().numpy())


def test_rename_rules_by_hand():
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_name("layer1.0.conv1.weight") == "res2.0.conv1.weight"
    assert detectron2_name("layer4.2.bn3.running_mean") == "res5.2.conv3.norm.running_mean"
    assert detectron2_name("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert detectron2_name("layer3.5.downsample.1.bias") == "res4.5.shortcut.norm.bias"
    for not_resnet in ("fc.weight", "layer5.0.conv1.weight", "layer1.0.conv4.weight", "layer1.0.se.fc.weight",
                       "layer1.0.bn1.num_batches_tracked"):
        assert detectron2_name(not_resnet) is None


def test_unknown_keys_are_reported_not_renamed(tmp_path, capsys):
    ckpt, _ = project_checkpoint("simclr", "resnet18", hidden_dim=64)
    ckpt["state_dict"]["module.encoder_q.layer1.0.se.weight"] = torch.ones(3)
    path = tmp_path / "ckpt.pth.tar"
    torch.save(ckpt, path)
    assert main([str(path), str(tmp_path / "out.pkl")]) == 0
    out = capsys.readouterr().out
    assert "could not convert: layer1.0.se.weight" in out
    with open(tmp_path / "out.pkl", "rb") as f:
        payload = pickle.load(f)
    assert set(payload) == {"model", "__author__", "matching_heuristics"}
    assert payload["matching_heuristics"] is True
    assert set(payload["model"]) == expected_names("resnet18")


def test_small_stem_converts_with_a_warning():
    ckpt, _ = project_checkpoint("simclr", "resnet18", hidden_dim=64)
    torch.manual_seed(0)
    small = build_model("simclr", "resnet18", small_stem=True, hidden_dim=64)
    ckpt["state_dict"] = {f"module.{k}": v for k, v in small.state_dict().items()}
    ckpt["args"]["small_stem"] = True
    result = convert(ckpt)
    assert result.model["stem.conv1.weight"].shape == (64, 3, 3, 3)
    assert len(result.warnings) == 1 and "7x7" in result.warnings[0]


@pytest.mark.e2e
def test_cli_runs_as_a_script(tmp_path):
    ckpt, _ = project_checkpoint("simclr", "resnet18", hidden_dim=64)
    torch.save(ckpt, tmp_path / "in.pth.tar")
    out = run_script(["detection/convert_to_detectron2.py", str(tmp_path / "in.pth.tar"), str(tmp_path / "o.pkl")])
    assert out.returncode == 0, out.stderr
    assert "converted 100 tensors" in out.stdout  # 20 convolutions + 20 BatchNorms x 4 tensors


def test_cli_unreadable_input(tmp_path, capsys):
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "x.pkl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"state_dict": {"module.encoder_q.stem.weight": torch.ones(1)}}, tmp_path / "odd.pth")
    assert main([str(tmp_path / "odd.pth"), str(tmp_path / "x.pkl")]) == 2
    assert "no ResNet or Vision Transformer backbone" in capsys.readouterr().err
    assert not (tmp_path / "x.pkl").exists()
