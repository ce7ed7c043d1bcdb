"""DINO's Vision Transformers (facebookresearch/dino vision_transformer.py): its initialisation, its
stochastic depth, its interpolated position embedding for other input sizes, the features of its
linear evaluation (eval_linear.py), its checkpoints (main_dino.py's full ones and the published
backbone-only files) and the `features` key of a linear protocol, from the protocol to the probe.

The references are independent of selfsup.backbones.vit: timm's ViT built with DINO's numbers,
PyTorch's bicubic interpolation written out as a loop, DINO's drop-path formula and eval_linear.py's
feature layout written out here, torchvision's ResNet-50."""

import argparse
import copy
import json
import math
import os
from functools import partial

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import make_image_folder
from test_lincls import load_script

from selfsup import recipes
from selfsup.backbones import (DEFAULT_FEATURES, Features, build_backbone, feature_dim, feature_options,
                               forward_features, set_drop_path, vit)
from selfsup.backbones import flag_options as backbone_flag_options
from selfsup.checkpoint import load_checkpoint
from selfsup.errors import CheckpointError, UsageError
from selfsup.lincls import restore_classifier
from selfsup.probe import build_probe, load_pretrained
from selfsup.recipes import PROTOCOL_FLAGS, linear_protocol

# facebookresearch/dino vision_transformer.py: vit_small (embed_dim 384, depth 12, num_heads=6),
# vit_base (768, 12, 12); qkv_bias=True, LayerNorm eps 1e-6, mlp_ratio 4. Copied from its code.
DINO = {
    "deit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_small_p8": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "deit_small_p4": dict(patch_size=4, embed_dim=384, depth=12, num_heads=6),  # this project's 32-pixel one
}


def timm_vit(image_size: int, **numbers) -> nn.Module:
    """DINO's ViT as timm builds it (num_classes=0: the cls token after the final norm), its
    weights moved away from their initialisation."""
    timm = pytest.importorskip("timm")
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=image_size, num_classes=0, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **numbers).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


def ours_from(reference: nn.Module, arch: str, image_size: int) -> nn.Module:
    net = vit.build(arch, 0, image_size=image_size, init="dino")
    net.load_state_dict(vit.from_timm_names(reference.state_dict()))
    return net.eval()


# ---------------------------------------------------------------------------------------------- bicubic, by hand


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """PyTorch's bicubic convolution weights (Keys, A = -0.75) of the 4 taps around a point at
    fraction t past the second."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def naive_bicubic(grid: torch.Tensor, scale_h: float, scale_w: float) -> torch.Tensor:
    """F.interpolate(grid, scale_factor=(scale_h, scale_w), mode='bicubic') written out: C x H x W
    -> C x floor(H scale_h) x floor(W scale_w). Output pixel i reads the input at
    (i + 0.5) / scale - 0.5 (the scale given, not the size ratio), 4 taps per axis, the border
    repeated."""
    grid = grid.double()
    _, height, width = grid.shape
    out_h, out_w = math.floor(height * scale_h), math.floor(width * scale_w)

    def taps(i, size, scale):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        return [min(max(base - 1 + k, 0), size - 1) for k in range(4)], _cubic_weights(src - base)

    out = torch.zeros(grid.shape[0], out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        rows, wy = taps(i, height, scale_h)
        for j in range(out_w):
            cols, wx = taps(j, width, scale_w)
            out[:, i, j] = sum(wy[k] * wx[m] * grid[:, rows[k], cols[m]] for k in range(4) for m in range(4))
    return out


def dino_interpolated(pos: torch.Tensor, patches_h: int, patches_w: int) -> torch.Tensor:
    """DINO's interpolate_pos_encoding by hand: the patch part bicubic with scale factors
    (patches + 0.1) / grid, the cls slot kept."""
    grid, dim = math.isqrt(pos.shape[1] - 1), pos.shape[2]
    patches = pos[0, 1:].reshape(grid, grid, dim).permute(2, 0, 1)
    resized = naive_bicubic(patches, (patches_h + 0.1) / grid, (patches_w + 0.1) / grid)  # D x h x w
    return torch.cat([pos[0, :1].double(), resized.permute(1, 2, 0).reshape(-1, dim)])[None].float()


# ---------------------------------------------------------------------------------------------- init


def test_dinos_initialisation():
    torch.manual_seed(0)
    net = vit.build("deit_small", 0, init="dino")
    pos, cls = net.encoder.pos_embedding, net.class_token
    assert pos.requires_grad and cls.requires_grad  # learned, not moco-v3's fixed sin-cos
    for t in (pos, cls):
        assert abs(float(t.detach().std()) - 0.02) < 0.003 and float(t.detach().abs().max()) <= 2.0
    # Every Linear and the attention's projection: trunc_normal(std .02) (truncated at +-2: no cut
    # at this std), zero biases; LayerNorms 1/0.
    for name, p in net.named_parameters():
        if name.endswith(("in_proj_weight", "out_proj.weight", "mlp.0.weight", "mlp.3.weight")):
            p = p.detach()
            assert abs(float(p.std()) - 0.02) < 0.001 and abs(float(p.mean())) < 0.001, name
        elif name.endswith(("in_proj_bias", "out_proj.bias", "mlp.0.bias", "mlp.3.bias")):
            assert not p.any(), name
        elif "ln" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
    # The patch projection: nn.Conv2d's own init (DINO's PatchEmbed leaves it), uniform within
    # 1/sqrt(fan_in), bias too - not torchvision's trunc_normal with zero bias.
    bound = 1 / math.sqrt(3 * 16 * 16)
    w, b = net.conv_proj.weight.detach(), net.conv_proj.bias.detach()
    assert float(w.abs().max()) <= bound and abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
    assert b.any() and float(b.abs().max()) <= bound
    # moco-v3's stays what it was: fixed sin-cos, xavier (std of a 384 x 1536 Linear: sqrt(2 / 1920)).
    mocov3 = vit.build("deit_small", 0)
    assert not mocov3.encoder.pos_embedding.requires_grad
    assert abs(float(mocov3.encoder.layers[0].mlp[0].weight.detach().std()) - math.sqrt(2 / 1920)) < 0.001
    assert list(net.state_dict()) == list(mocov3.state_dict())  # torchvision's names either way


def test_the_flags_reach_the_constructor():
    flags = {"image_size": 32, "vit_init": "dino", "drop_path_rate": 0.1, "stop_grad_conv1": False}
    options = backbone_flag_options("deit_small_p4", flags)
    assert options == {"image_size": 32, "stop_grad_conv1": False, "init": "dino", "drop_path_rate": 0.1}
    net = build_backbone("deit_small_p4", 0, **options)
    assert net.init == "dino" and net.drop_path_rates[-1] == pytest.approx(0.1)
    assert backbone_flag_options("deit_small_p4", {"image_size": 32})["init"] == "mocov3"  # unchanged default
    with pytest.raises(ValueError, match="unknown ViT initialisation 'xavier'; valid: mocov3, dino"):
        vit.build("deit_small_p4", 0, init="xavier")


# ---------------------------------------------------------------------------------------------- features at 224 and 96


def test_features_at_224_pixels_equal_timms_vit_with_dinos_numbers():
    torch.manual_seed(0)
    reference = timm_vit(224, **DINO["deit_small"])
    net = ours_from(reference, "deit_small", 224)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(forward_features(net, x), reference(x), rtol=1e-4, atol=1e-4)


def test_the_position_embedding_interpolated_as_dinos_bicubic_with_its_offset():
    # A learned embedding (DINO's) and moco-v3's fixed sin-cos one take the same interpolation.
    torch.manual_seed(0)
    for arch, size, new_h, new_w in (("deit_small", 224, 6, 6), ("deit_small", 224, 6, 10), ("vit_small_p4", 32, 4, 4)):
        net = vit.build(arch, 0, init="dino" if arch.startswith("deit") else "mocov3")
        patch = net.patch_size
        with torch.no_grad():
            got = net.interpolate_pos_encoding(new_h * patch, new_w * patch)
        expected = dino_interpolated(net.encoder.pos_embedding.detach(), new_h, new_w)
        assert got.shape == (1, 1 + new_h * new_w, net.hidden_dim)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
        # Without the 0.1 (the size ratio's scale) the samples fall elsewhere: the case is told apart.
        grid = size // patch
        plain = nn.functional.interpolate(
            net.encoder.pos_embedding[:, 1:].detach().reshape(1, grid, grid, -1).permute(0, 3, 1, 2),
            size=(new_h, new_w), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, net.hidden_dim)
        assert float((plain - expected[:, 1:]).abs().max()) > 1e-3
    assert torch.equal(net.interpolate_pos_encoding(32, 32), net.encoder.pos_embedding)  # its own size: as stored


def test_features_at_96_pixels_equal_timms_with_the_interpolated_embedding():
    # DINO's local crops: the 224-pixel network on 96-pixel images, its 14 x 14 embedding resized
    # to 6 x 6. The reference: timm's ViT for 96 pixels holding the same weights and the embedding
    # interpolated by hand.
    torch.manual_seed(0)
    reference = timm_vit(224, **DINO["deit_small"])
    net = ours_from(reference, "deit_small", 224)
    small = timm_vit(96, **DINO["deit_small"])
    state = reference.state_dict()
    state["pos_embed"] = dino_interpolated(state["pos_embed"], 6, 6)
    small.load_state_dict(state)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), small(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a whole number of 16-pixel patches"):
        net.forward_features(torch.randn(1, 3, 100, 100))


# ---------------------------------------------------------------------------------------------- drop path


def small_vit(rate: float, depth: int = 2) -> vit.VisionTransformer:
    """A 2-block ViT at 16 pixels (patch 4, width 32, 4 heads), DINO's init."""
    torch.manual_seed(0)
    return vit.VisionTransformer(16, 4, 32, depth, 4, num_classes=0, init="dino", drop_path_rate=rate)


def naive_train_forward(net: vit.VisionTransformer, x: torch.Tensor, rates: list[float]) -> torch.Tensor:
    """DINO's Block.forward with its drop_path, on the network's own modules: each block draws a
    keep mask per sample, floor(1 - p + U[0,1)), for its attention branch and then for its MLP
    branch (no draw where p = 0), and scales what it keeps by 1 / (1 - p)."""
    tokens = net.conv_proj(x).flatten(2).transpose(1, 2)
    h = torch.cat([net.class_token.expand(len(x), -1, -1), tokens], dim=1) + net.encoder.pos_embedding
    for block, p in zip(net.encoder.layers, rates):
        def branch(y):
            if p == 0:
                return y
            keep = torch.floor(1 - p + torch.rand(len(x), 1, 1))
            return y / (1 - p) * keep
        y = block.ln_1(h)
        h = h + branch(block.self_attention(y, y, y, need_weights=False)[0])
        h = h + branch(block.mlp(block.ln_2(h)))
    return net.encoder.ln(h)[:, 0]


def test_drop_path_rates_rise_linearly_over_the_blocks():
    net = vit.build("deit_small_p4", 0, init="dino", drop_path_rate=0.1)
    assert net.drop_path_rates == pytest.approx([0.1 * i / 11 for i in range(12)], rel=1e-6, abs=1e-9)
    assert net.drop_path_rates[0] == 0.0 and net.drop_path_rates[-1] == pytest.approx(0.1)
    assert vit.build("deit_small_p4", 0).drop_path_rates == [0.0] * 12  # moco-v3's: none
    with pytest.raises(ValueError, match=r"probability in \[0, 1\)"):
        vit.build("deit_small_p4", 0, drop_path_rate=1.0)


def test_drop_path_is_off_in_eval_and_draws_nothing():
    net, plain = small_vit(0.5).eval(), small_vit(0.0).eval()
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    with torch.no_grad():
        out = net(x)
        after = torch.rand(1)
        torch.manual_seed(1)
        assert torch.equal(out, plain(x)) and torch.equal(after, torch.rand(1))


def test_drop_path_in_training_is_dinos_per_sample_formula_on_the_global_generator():
    net = small_vit(0.9).train()
    x = torch.randn(16, 3, 16, 16)
    torch.manual_seed(7)
    got = net(x)
    after = torch.rand(1)
    torch.manual_seed(7)
    expected = naive_train_forward(net, x, [0.0, 0.9])  # torch.linspace(0, 0.9, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, torch.rand(1))  # the same draws from the global generator, no more
    # Per sample: some samples lost both branches of block 1 (their output is block 0's), others
    # not - one batch, different fates.
    with torch.no_grad():
        h = net.prepare_tokens(x)
        block0_only = net.encoder.ln(net._block(0, h))[:, 0]
    dropped = [torch.allclose(got[i], block0_only[i], atol=1e-6) for i in range(len(x))]
    assert any(dropped) and not all(dropped)
    torch.manual_seed(8)
    assert not torch.allclose(net(x), got)  # another seed, other masks


def test_the_teacher_copy_has_no_drop_path_and_the_student_keeps_its():
    # DINO's teacher: the student's architecture without stochastic depth; here a deep copy of the
    # student with it turned off.
    student = small_vit(0.5).train()
    teacher = copy.deepcopy(student)
    set_drop_path(teacher, 0.0)
    assert teacher.drop_path_rates == [0.0, 0.0] and student.drop_path_rates == [0.0, 0.5]
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(3)
    with torch.no_grad():
        out = teacher(x)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))  # nothing drawn
    with torch.no_grad():  # train mode, as DINO's teacher runs: the eval-mode output (to rounding)
        torch.testing.assert_close(out, teacher.eval()(x), rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)
    assert not torch.allclose(student(x), out)  # the student still drops
    set_drop_path(build_backbone("resnet18", 4), 0.0)  # a ResNet has none to turn off
    with pytest.raises(ValueError, match="ResNet has no stochastic depth"):
        set_drop_path(build_backbone("resnet18", 4), 0.1)


# ---------------------------------------------------------------------------------------------- eval_linear.py features


def test_last_blocks_and_avgpool_features_against_timms_blocks():
    torch.manual_seed(0)
    reference = timm_vit(32, **DINO["deit_small_p4"])
    net = ours_from(reference, "deit_small_p4", 32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = torch.cat([reference.cls_token.expand(3, -1, -1), reference.patch_embed(x)], dim=1) + reference.pos_embed
        normed = []
        for block in reference.blocks:
            h = block(h)
            normed.append(reference.norm(h))  # every block's tokens through the final norm
        last4 = torch.cat([t[:, 0] for t in normed[-4:]], dim=1)  # N x 1536
        cls, mean = normed[-1][:, 0], normed[-1][:, 1:].mean(dim=1)
        interleaved = torch.empty(3, 2 * 384)  # eval_linear.py's reshape: cls_0, mean_0, cls_1, mean_1, ...
        interleaved[:, 0::2], interleaved[:, 1::2] = cls, mean
        torch.testing.assert_close(forward_features(net, x, n_last_blocks=4), last4, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(forward_features(net, x, avgpool=True), interleaved, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(Features(net, n_last_blocks=4)(x), last4, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(forward_features(net, x), cls, rtol=1e-4, atol=1e-4)  # the default
    assert (feature_dim(net), feature_dim(net, 4), feature_dim(net, 1, True)) == (384, 1536, 768)
    with pytest.raises(ValueError, match="with --n_last_blocks 1"):
        forward_features(net, x, n_last_blocks=4, avgpool=True)
    with pytest.raises(ValueError, match="between 1 and the network's 12 blocks"):
        feature_dim(net, 13)
    with pytest.raises(ValueError, match="ResNet's features are the ones its head receives"):
        Features(build_backbone("resnet18", 4), n_last_blocks=4)


def test_a_probe_reads_the_features_it_is_given():
    torch.manual_seed(0)
    net = vit.build("deit_small_p4", 0, init="dino")
    weights = net.state_dict()
    probe = build_probe("deit_small_p4", False, 5, weights, features={"n_last_blocks": 4}).eval()
    assert probe.fc.in_features == 1536 and probe.feature_options == {"n_last_blocks": 4, "avgpool": False}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(probe.features(x), forward_features(net.eval(), x, n_last_blocks=4))
    assert float(probe.fc.weight.detach().std()) == pytest.approx(0.01, rel=0.05) and not probe.fc.bias.any()
    default = build_probe("deit_small_p4", False, 5, weights)
    assert default.fc.in_features == 384 and default.feature_options == DEFAULT_FEATURES
    with pytest.raises(ValueError, match=r"unknown feature options \['blocks'\]"):
        feature_options({"blocks": 4})


# ---------------------------------------------------------------------------------------------- a protocol's features


FAKE_PROTOCOL = {"optimizer": "sgd", "lr": 0.5, "nesterov": False, "wd": 0.0, "cos": True, "schedule": [], "epochs": 1,
                 "source": "a test", "by_family": {"vit": {"features": {"n_last_blocks": 2}}},
                 "by_arch": {"deit_small_p4": {"features": {"n_last_blocks": 1, "avgpool": True}}}}


def protocol_for(method, arch):
    args = argparse.Namespace(**{k: None for k in PROTOCOL_FLAGS}, batch_size=256)
    line = linear_protocol(args, method, arch)
    return args.features, line


def test_a_protocol_names_features_per_family_and_per_arch(monkeypatch):
    monkeypatch.setitem(recipes.LINEAR, "fake", FAKE_PROTOCOL)
    assert protocol_for("fake", "deit_small_p4")[0] == {"n_last_blocks": 1, "avgpool": True}  # by_arch wins
    features, line = protocol_for("fake", "vit_small_p4")
    assert features == {"n_last_blocks": 2, "avgpool": False}  # by_family
    assert "features: the cls tokens of the last 2 block(s)" in line
    assert protocol_for("fake", "resnet18")[0] == DEFAULT_FEATURES
    for method in ("moco", "byol", "simclr", "mocov3", None):  # every existing protocol: today's features
        for arch in ("resnet50", "vit_small"):
            features, line = protocol_for(method, arch)
            assert features == DEFAULT_FEATURES and "features" not in line


def image_data(root):
    """ROOT/train and ROOT/val, 2 classes of 3 images of 32 pixels each."""
    make_image_folder(root / "train", classes=2, per_class=3, size=32)
    make_image_folder(root / "val", classes=2, per_class=3, size=32, seed=1)
    return root


def pretrain_checkpoint(path, method):
    torch.manual_seed(0)
    net = vit.build("deit_small_p4", 0, init="dino")
    torch.save({"epoch": 1, "arch": "deit_small_p4", "method": method, "backbone_variant": {"num_heads": 6},
                "state_dict": {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()},
                "args": {"arch": "deit_small_p4", "method": method, "image_size": 32}}, path)
    return path


def test_main_lincls_trains_on_the_features_the_protocol_names(monkeypatch, tmp_path):
    monkeypatch.setitem(recipes.LINEAR, "fake", FAKE_PROTOCOL)
    main_lincls = load_script("main_lincls")
    data = image_data(tmp_path / "data")
    ckpt = pretrain_checkpoint(tmp_path / "checkpoint.pth.tar", "fake")
    out = tmp_path / "lin"
    common = [str(data), "-j", "0", "--device", "cpu", "-p", "0", "-b", "6", "--output-dir", str(out)]
    assert main_lincls.cli([*common, "--pretrained", str(ckpt), "--train-aug", "none"]) == 0
    saved = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert saved["features"] == {"n_last_blocks": 1, "avgpool": True}
    assert saved["state_dict"]["module.head.weight"].shape == (2, 768)  # cls token + mean patch token
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["dim"] for e in events if e.get("event") == "features"] == [768]
    # Evaluated from the classifier alone (no protocol to ask): its own record says which features.
    assert main_lincls.cli([*common, "-e"]) == 0
    # A probe on other features of the same width is refused, never read with the wrong ones.
    other = build_probe("deit_small_p4", False, 2, features={"n_last_blocks": 2})
    with pytest.raises(UsageError, match="features {'n_last_blocks': 1, 'avgpool': True}"):
        restore_classifier(out / "checkpoint.pth.tar", saved, other, arch="deit_small_p4",
                           classes=["class0", "class1"], pretrained=None)


# ---------------------------------------------------------------------------------------------- DINO's checkpoints


def dino_full_checkpoint(path, teacher_backbone: dict, student_backbone: dict, arch: str, ddp_teacher: bool):
    """main_dino.py's save_dict: the DDP student ('module.'), the teacher (DDP-wrapped only for a
    network with BatchNorm), each a MultiCropWrapper (`backbone.`, `head.`), and its args."""
    head = {"head.mlp.0.weight": torch.randn(32, 8), "head.last_layer.weight_g": torch.ones(16, 1),
            "head.last_layer.weight_v": torch.randn(16, 8)}
    teacher = {**{f"backbone.{k}": v for k, v in teacher_backbone.items()}, **head}
    args = argparse.Namespace(arch=arch, patch_size=16, out_dim=16, norm_last_layer=True, momentum_teacher=0.996,
                              global_crops_scale=(0.4, 1.0), local_crops_number=8, data_path="/imagenet", lr=0.0005)
    torch.save({"student": {f"module.{k}": v for k, v in {**{f"backbone.{k}": v for k, v in student_backbone.items()},
                                                          **head}.items()},
                "teacher": {f"module.{k}": v for k, v in teacher.items()} if ddp_teacher else teacher,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, "epoch": 3, "args": args,
                "dino_loss": {"center": torch.zeros(1, 16)}}, path)
    return path


def test_a_full_dino_vit_checkpoint_loads_its_teacher_as_deit_small_with_method_dino(tmp_path):
    torch.manual_seed(0)
    teacher, student = timm_vit(224, **DINO["deit_small"]), timm_vit(224, **DINO["deit_small"])
    path = dino_full_checkpoint(tmp_path / "checkpoint.pth", teacher.state_dict(), student.state_dict(), "vit_small",
                                ddp_teacher=False)
    pretrained = load_pretrained(path)  # DINO names it vit_small; here that is moco-v3's 12-head ViT-S
    assert (pretrained.arch, pretrained.method) == ("deit_small", "dino")
    probe = build_probe(pretrained.arch, False, 10, pretrained.weights).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(probe.features(x), teacher(x), rtol=1e-4, atol=1e-4)  # the teacher, as eval_*.py
    with pytest.raises(ValueError, match="6 attention heads, vit_small has 12"):
        load_pretrained(path, "vit_small")
    assert load_checkpoint(path)["args"]["arch"] == "vit_small"  # the Namespace, read as a dict


def test_a_full_dino_resnet_checkpoint_loads_its_ddp_wrapped_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = torchvision.models.resnet50()
    teacher.fc = nn.Identity()  # DINO's MultiCropWrapper removes it
    with torch.no_grad():
        for t in teacher.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.02)
    student = {k: v + 1 if v.is_floating_point() else v for k, v in teacher.state_dict().items()}
    path = dino_full_checkpoint(tmp_path / "checkpoint.pth", teacher.state_dict(), student, "resnet50",
                                ddp_teacher=True)
    pretrained = load_pretrained(path)
    assert (pretrained.arch, pretrained.method, pretrained.small_stem) == ("resnet50", "dino", False)
    probe = build_probe(pretrained.arch, False, 10, pretrained.weights).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(probe.features(x), teacher.eval()(x), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_naming_its_evaluated_network_gives_that_one(tmp_path):
    # This project's DINO keeps the student as encoder_q and the teacher, which DINO evaluates, as
    # encoder_k; its checkpoints say so ("evaluated"), the others evaluate encoder_q.
    torch.manual_seed(0)
    student, teacher = vit.build("deit_small_p4", 0, init="dino"), vit.build("deit_small_p4", 0, init="dino")
    state = {**{f"module.encoder_q.{k}": v for k, v in student.state_dict().items()},
             **{f"module.encoder_k.{k}": v for k, v in teacher.state_dict().items()}}
    common = {"epoch": 1, "arch": "deit_small_p4", "method": "dino", "backbone_variant": {"num_heads": 6},
              "state_dict": state}
    torch.save({**common, "evaluated": "encoder_k"}, tmp_path / "dino.pth.tar")
    torch.save(common, tmp_path / "other.pth.tar")
    for name, net in (("dino.pth.tar", teacher), ("other.pth.tar", student)):
        weights = load_pretrained(tmp_path / name).weights
        assert weights.keys() == net.state_dict().keys()
        assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items()), name


@pytest.mark.parametrize("name, arch, method", [("dino_deitsmall8_pretrain.pth", "deit_small_p8", "dino"),
                                                ("dino_resnet50_pretrain.pth", "resnet50", "dino"),
                                                ("backbone.pth", None, None)])
def test_dinos_published_backbone_files_load_as_their_networks(tmp_path, name, arch, method):
    # Bare state dicts (a ViT under timm's names, the ResNet-50 under torchvision's, no head): their
    # published names say DINO; the same weights under another name load as before.
    torch.manual_seed(0)
    if name.startswith("dino_resnet"):
        reference = torchvision.models.resnet50()
        reference.fc = nn.Identity()
        x = torch.randn(2, 3, 64, 64)
    else:
        reference = timm_vit(32, **DINO["deit_small_p8"])
        x = torch.randn(2, 3, 32, 32)
    torch.save(reference.state_dict(), tmp_path / name)
    pretrained = load_pretrained(tmp_path / name)
    assert pretrained.method == method and pretrained.arch == (arch or "deit_small_p8")
    probe = build_probe(pretrained.arch, False, 10, pretrained.weights).eval()
    with torch.no_grad():
        torch.testing.assert_close(probe.features(x), reference.eval()(x), rtol=1e-4, atol=1e-4)


class _Other:  # a class no checkpoint may carry
    def __init__(self):
        self.arch = "vit_small"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("EXPLOIT_MARKER", "/tmp/selfsup-exploit"),))


def test_only_argparse_namespace_is_let_through(tmp_path, monkeypatch):
    torch.save({"teacher": {}, "args": argparse.Namespace(arch="vit_small", global_crops_scale=(0.4, 1.0))},
               tmp_path / "dino.pth")
    assert load_checkpoint(tmp_path / "dino.pth")["args"] == {"arch": "vit_small", "global_crops_scale": (0.4, 1.0)}
    torch.save({"teacher": {}, "args": _Other()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="NOT loaded and none of its code ran"):
        load_checkpoint(tmp_path / "other.pth")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    torch.save({"args": argparse.Namespace(payload=_Exploit())}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="NOT loaded"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed for those loads only
    with pytest.raises(Exception, match="Namespace"):  # torch's own weights-only load still refuses it
        torch.load(tmp_path / "dino.pth", weights_only=True)


def test_main_knn_reads_the_teachers_cls_token_of_a_full_dino_checkpoint(tmp_path, capsys):
    # eval_knn.py: `model(inp)`, the cls token after the final norm - whatever eval_linear.py reads.
    torch.manual_seed(0)
    teacher, student = timm_vit(32, **DINO["deit_small_p4"]), timm_vit(32, **DINO["deit_small_p4"])
    path = dino_full_checkpoint(tmp_path / "checkpoint.pth", teacher.state_dict(), student.state_dict(), "vit_small",
                                ddp_teacher=False)
    data = image_data(tmp_path / "data")
    main_knn = load_script("main_knn")
    assert main_knn.cli([str(data), "--pretrained", str(path), "--k", "2", "-b", "6", "-j", "0", "--image-size", "32",
                         "--output-dir", str(tmp_path / "knn")]) == 0
    log = "".join(capsys.readouterr())
    assert "deit_small_p4 standard stem at 32px" in log and "6 + 6 images, 384 dims" in log, log[-2000:]
    record = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["n"] == 6 and record["k"] == 2
    # Without --k, DINO's eval_knn.py's neighbours (--nb_knn 10 20 100 200)
    assert main_knn.cli([str(data), "--pretrained", str(path), "-b", "6", "-j", "0", "--image-size", "32",
                         "--output-dir", str(tmp_path / "knn-default")]) == 0
    records = [json.loads(line) for line in (tmp_path / "knn-default" / "metrics.jsonl").read_text().splitlines()]
    assert [r["k"] for r in records] == [10, 20, 100, 200]
