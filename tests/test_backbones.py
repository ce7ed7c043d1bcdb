"""selfsup.backbones: the small interface every consumer uses instead of a network's layers, checked
against torchvision's own networks - and a second family, registered here, served by the
checkpoint extraction, the linear probe and the feature extractor without touching them."""

import types

import pytest
import torch
import torch.nn as nn
import torchvision

from selfsup import backbones
from selfsup.backbones import (ARCHS, Features, backbone_constructor, build_backbone, feature_dim, forward_features,
                               get_head, head_name, set_head)
from selfsup.checkpoint import extract_backbone, infer_arch_info, load_backbone
from selfsup.errors import CheckpointError
from selfsup.probe import build_probe


@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet50", 2048)])
def test_resnets_through_the_interface_equal_torchvisions_own(arch, width):
    torch.manual_seed(0)
    net = build_backbone(arch, num_classes=7).eval()
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=7).eval()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), reference.state_dict().values()))
    assert feature_dim(net) == width == reference.fc.in_features and head_name(net) == "fc"
    assert get_head(net) is net.fc
    x = torch.randn(2, 3, 32, 32)
    reference.fc = nn.Identity()  # independent: torchvision's forward without its classifier
    with torch.no_grad():
        assert torch.equal(forward_features(net, x), reference(x))
        assert torch.equal(Features(net)(x), reference(x))
    set_head(net, nn.Identity())
    assert isinstance(net.fc, nn.Identity) and feature_dim(net) == width  # the width survives the head's removal
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))


def test_the_small_stem_and_unknown_names():
    net = backbone_constructor("resnet18", small_stem=True)(num_classes=3)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    assert infer_arch_info({"state_dict": net.state_dict()})["small_stem"] is True
    with pytest.raises(ValueError, match="unknown arch 'vgg16'; valid: resnet18"):
        backbone_constructor("vgg16")
    assert ARCHS == backbones.resnet.ARCHS + backbones.vit.ARCHS  # the choices of -a: every family's names
    with pytest.raises(TypeError, match="belongs to no backbone family"):
        feature_dim(nn.Conv2d(3, 3, 1))


def test_a_projection_head_in_the_heads_place_keeps_the_feature_width():
    net = build_backbone("resnet18", num_classes=8)
    set_head(net, nn.Sequential(nn.Linear(512, 64), nn.ReLU(), get_head(net)))
    assert feature_dim(net) == 512 and isinstance(net.fc[0], nn.Linear)


# ---------------------------------------------------------------------------------------------- a second family


class TinyViT(nn.Module):
    """A transformer-shaped network: patch projection, a class token, a norm and a `head`."""

    def __init__(self, num_classes: int, width: int = 6):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def tokens(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # N x L x C
        return self.ln(torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1))[:, 0]  # N x C

    def forward(self, x):
        return self.head(self.tokens(x))


def _tiny_vit_family():
    return types.SimpleNamespace(
        ARCHS=("tiny_vit",), TITLE="TinyViT", HEAD="head", MARKER="patch.weight",
        build=lambda arch, num_classes, small_stem=False, **kw: TinyViT(num_classes),
        owns=lambda net: isinstance(net, TinyViT), feature_dim=lambda net: net.ln.normalized_shape[0],
        forward_features=lambda net, x: net.tokens(x), describe=lambda weights: {"small_stem": False})


def test_a_new_family_is_one_module_and_one_entry(monkeypatch):
    monkeypatch.setitem(backbones.FAMILIES, "tiny_vit", _tiny_vit_family())
    torch.manual_seed(0)
    net = build_backbone("tiny_vit", num_classes=4)
    assert head_name(net) == "head" and feature_dim(net) == 6
    # A pretraining checkpoint of that family: its backbone found by its marker, the head dropped.
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state["module.queue"] = torch.zeros(4, 8)
    weights = extract_backbone({"state_dict": state})
    assert set(weights) == {"patch.weight", "patch.bias", "cls_token", "ln.weight", "ln.bias"}
    # The linear probe puts a new classifier in the head's place and saves it under the head's name.
    probe = build_probe("tiny_vit", False, 3, weights)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(probe.features(x), net.tokens(x))  # the pretrained features, frozen
        assert torch.equal(Features(probe.backbone)(x), net.tokens(x))
    saved = probe.classifier_state_dict()
    assert {"head.weight", "head.bias"} <= set(saved) and not any(k.startswith("fc.") for k in saved)
    # Loading checks every key of the family's names, as for ResNets.
    with pytest.raises(CheckpointError, match="Missing keys: \\['ln.bias'\\]"):
        load_backbone(TinyViT(3), {k: v for k, v in weights.items() if k != "ln.bias"})


def test_the_builder_hands_backbone_options_to_the_backbones_constructor():
    from selfsup.builder import build_model

    model = build_model("simclr", "resnet18", backbone_options={"zero_init_residual": True}, dim=8, hidden_dim=16)
    # torchvision's option: the last BatchNorm of every residual block starts at zero.
    assert all(not block.bn2.weight.any() for layer in (model.encoder_q.layer1, model.encoder_q.layer4)
               for block in layer)
    assert build_model("simclr", "resnet18", dim=8, hidden_dim=16).encoder_q.layer1[0].bn2.weight.all()
