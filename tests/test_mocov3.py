"""MoCo v3 and the Vision Transformers: the loss against moco-v3's formula written out, one process
and two, the momentum encoder, the predictor's side, the ViT's position embedding, stop-grad conv1,
its published sizes and moco-v3's own checkpoints."""

import argparse
import copy
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import run_distributed
from selfsup import recipes
from selfsup.backbones import check_record, record, vit
from selfsup.backbones import flag_options as backbone_flag_options
from selfsup.builder import build_model
from selfsup.methods import MoCoV3
from selfsup.probe import build_probe, load_pretrained
from selfsup.recipes import PROTOCOL_FLAGS, linear_protocol
from test_builder import tiny_encoder


def naive_ctr(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    """moco-v3's contrastive loss, query by query: -log softmax of the positive among all keys, x 2T."""
    total = 0.0
    for i in range(q.shape[0]):
        sims = [float(torch.dot(F.normalize(q[i], dim=0), F.normalize(k[j], dim=0))) / T for j in range(k.shape[0])]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    return torch.tensor(total / q.shape[0] * 2 * T, dtype=torch.float64)


def tiny(T: float = 0.5) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(tiny_encoder, dim=8, mlp_dim=16, m=0.9, T=T).double()


def test_the_loss_is_moco_v3s_formula_on_one_process():
    model = tiny()
    x1, x2 = torch.randn(2, 6, 3, 8, 8, dtype=torch.float64)
    k_model = copy.deepcopy(model)
    k_model._momentum_update_key_encoder()  # the forward updates the momentum encoder before the keys
    with torch.no_grad():
        q1, q2 = model.predictor(model.encoder_q(x1)), model.predictor(model.encoder_q(x2))
        k1, k2 = k_model.encoder_k(x1), k_model.encoder_k(x2)
    expected = naive_ctr(q1, k2, model.T) + naive_ctr(q2, k1, model.T)
    assert model(x1, x2).item() == pytest.approx(expected.item(), rel=1e-10)


def _step(rank, world_size, x1, x2):
    model = tiny()
    n = x1.shape[0] // world_size
    ddp = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    loss = ddp(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n])
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.e2e
def test_two_processes_with_n_each_equal_one_with_2n_gradients_included(tmp_path):
    # BatchNorm sees each process's batch, so the networks here normalise per sample group only where
    # the batch is the same: the tiny encoder's BN in eval mode makes the comparison exact.
    torch.manual_seed(1)
    x1, x2 = torch.randn(2, 8, 3, 8, 8, dtype=torch.float64)
    one = run_distributed(_step_eval_bn, 1, tmp_path, x1, x2)[0]
    two = run_distributed(_step_eval_bn, 2, tmp_path, x1, x2)
    assert set(one) == set(two[0]) and one
    for name, grad in one.items():
        torch.testing.assert_close(two[0][name], grad, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(two[1][name], grad, rtol=1e-5, atol=1e-9)


def _step_eval_bn(rank, world_size, x1, x2):
    model = tiny()
    model.eval()  # per-process BatchNorm statistics would differ from the single process's
    n = x1.shape[0] // world_size
    ddp = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    loss = ddp(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n])
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_the_momentum_encoder_gets_no_gradient_and_follows_the_ema():
    model = tiny()
    model.momentum_at(0.0)  # m = 0.9 at the start of the cosine
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    online = [p.clone() for p in model.encoder_q.parameters()]
    model(*torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)).backward()
    for k_old, q, k_new in zip(before_k, online, model.encoder_k.parameters()):
        assert k_new.grad is None and not k_new.requires_grad
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    assert model.momentum_at(0.5) == pytest.approx(1 - 0.1 * 0.5)  # cosine half way: 1 - (1 - m)/2


def test_the_predictor_is_on_the_query_side_only():
    model = tiny()
    assert not any("predictor" in name for name, _ in model.encoder_k.named_modules())
    with torch.no_grad():  # a predictor far from the identity, so keys through it would change the loss
        for p in model.predictor.parameters():
            p.mul_(3.0)
    x1, x2 = torch.randn(2, 6, 3, 8, 8, dtype=torch.float64)
    after_ema = copy.deepcopy(model)
    after_ema._momentum_update_key_encoder()  # the forward updates the momentum encoder before the keys
    with torch.no_grad():
        q1, q2 = model.predictor(model.encoder_q(x1)), model.predictor(model.encoder_q(x2))
        k1, k2 = after_ema.encoder_k(x1), after_ema.encoder_k(x2)
        p1, p2 = after_ema.predictor(k1), after_ema.predictor(k2)  # what keys through the predictor would be
    queries_only = naive_ctr(q1, k2, model.T) + naive_ctr(q2, k1, model.T)
    both_sides = naive_ctr(q1, p2, model.T) + naive_ctr(q2, p1, model.T)
    assert abs(queries_only.item() - both_sides.item()) > 1e-3  # the two readings are told apart here
    loss = model(x1, x2)
    assert loss.item() == pytest.approx(queries_only.item(), rel=1e-10)
    loss.backward()
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_the_mlps_are_moco_v3s():
    resnet = build_model("mocov3", "resnet18", dim=16, mlp_dim=32)
    assert len([m for m in resnet.encoder_q.fc if isinstance(m, nn.Linear)]) == 2
    assert isinstance(resnet.encoder_q.fc[-1], nn.BatchNorm1d) and not resnet.encoder_q.fc[-1].affine
    assert isinstance(resnet.predictor[-1], nn.Linear) and resnet.predictor[-1].bias is None
    vit_model = build_model("mocov3", "vit_small_p4", dim=16, mlp_dim=32, backbone_options={"image_size": 32})
    assert len([m for m in vit_model.encoder_q.head if isinstance(m, nn.Linear)]) == 3
    assert isinstance(vit_model.predictor[-1], nn.BatchNorm1d)
    assert all(m.bias is None for m in vit_model.predictor.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------------------------------------- ViT


def test_the_sincos_embedding_against_a_naive_formula():
    grid, dim = 4, 16
    emb = vit.sincos_position_embedding(grid, dim)
    assert emb.shape == (1, 1 + grid * grid, dim) and torch.equal(emb[0, 0], torch.zeros(dim))
    quarter = dim // 4
    for k in range(grid * grid):
        a, b = k // grid, k % grid
        for i in range(quarter):
            w = 1.0 / 10000 ** (i / quarter)
            expected = [math.sin(a * w), math.cos(a * w), math.sin(b * w), math.cos(b * w)]
            got = [float(emb[0, 1 + k, j * quarter + i]) for j in range(4)]
            assert got == pytest.approx(expected, abs=1e-6)
    net = vit.build("vit_small_p4", 0)
    assert torch.equal(net.encoder.pos_embedding, vit.sincos_position_embedding(8, 384))
    assert not net.encoder.pos_embedding.requires_grad


def test_stop_grad_conv1_freezes_exactly_the_patch_projection():
    frozen = {n for n, p in vit.build("vit_small_p4", 10, stop_grad_conv1=True).named_parameters()
              if not p.requires_grad}
    assert frozen == {"conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"}
    assert {n for n, p in vit.build("vit_small_p4", 10).named_parameters() if not p.requires_grad} == \
        {"encoder.pos_embedding"}


def vit_parameters(width: int, depth: int, patch: int, tokens: int) -> int:
    """A ViT's parameters without the head, counted from its architecture (timm's and the paper's)."""
    patch_embed = 3 * patch * patch * width + width
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (width * 4 * width + 4 * width) + (4 * width * width + width)
    return patch_embed + width + tokens * width + depth * block + 2 * width  # + cls, pos, blocks, final norm


@pytest.mark.parametrize("arch, width, published", [("vit_small", 384, 22e6), ("vit_base", 768, 86e6)])
def test_the_vits_have_the_published_sizes(arch, width, published):
    net = vit.build(arch, 0)
    count = sum(p.numel() for p in net.parameters())
    assert count == vit_parameters(width, 12, 16, 197)
    assert abs(count - published) < 0.02 * published  # 21.7M and 85.8M: the papers' "22M" and "86M"


def test_vit_features_are_the_cls_token_after_the_final_norm():
    torch.manual_seed(0)
    net = vit.build("vit_small_p4", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.cat([net.class_token.expand(2, -1, -1), net._process_input(x)], dim=1)
    expected = net.encoder.ln(net.encoder.layers(tokens + net.encoder.pos_embedding))[:, 0]
    torch.testing.assert_close(net.forward_features(x), expected)
    torch.testing.assert_close(net(x), net.head(expected))


# The references' own numbers, copied from their code (not from selfsup.backbones.vit): what timm
# builds with them is the network each reference trains.
MOCOV3 = {  # facebookresearch/moco-v3 vits.py: vit_small, vit_base (qkv_bias, LayerNorm eps 1e-6, mlp_ratio 4)
    "vit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12),
    "vit_base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
DEIT = {  # facebookresearch/dino vision_transformer.py: vit_small (num_heads=6), vit_base; timm's vit_small_patch16_224
    "deit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_small_p8": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit_base_p8": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
}
SMALL = {  # this project's 32-pixel variants: the references' blocks with patch 4
    "vit_small_p4": dict(patch_size=4, embed_dim=384, depth=12, num_heads=12),
    "vit_base_p4": dict(patch_size=4, embed_dim=768, depth=12, num_heads=12),
    "deit_small_p4": dict(patch_size=4, embed_dim=384, depth=12, num_heads=6),
}


def timm_vit(image_size: int, sincos: bool, **numbers) -> nn.Module:
    """The reference network built by timm (num_classes=0: the cls token after the final norm),
    randomly initialised; moco-v3's fixed 2D sin-cos position embedding when `sincos`."""
    timm = pytest.importorskip("timm")
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=image_size, num_classes=0, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **numbers).eval()
    with torch.no_grad():
        for p in net.parameters():  # timm's init leaves biases at 0 and the norms at 1: move everything
            p.add_(torch.randn_like(p) * 0.02)
        if sincos:
            net.pos_embed.copy_(vit.sincos_position_embedding(image_size // numbers["patch_size"],
                                                              numbers["embed_dim"]))
    return net


def features_of(path, x, arch=None):
    pretrained = load_pretrained(path, arch)
    probe = build_probe(pretrained.arch, False, 10, pretrained.weights).eval()
    return pretrained, probe.features(x)


@pytest.mark.parametrize("arch, image_size", [("vit_small", 224), ("vit_base", 224), ("vit_small_p4", 32),
                                              ("vit_base_p4", 32)])
def test_moco_v3s_checkpoints_load_as_moco_v3s_networks(arch, image_size, tmp_path):
    # moco-v3's main_moco.py saves {'arch', 'state_dict': model.state_dict()} of the DDP model: the
    # timm ViT under module.base_encoder., the momentum encoder beside it, the projector as `head`.
    torch.manual_seed(0)
    numbers = {**MOCOV3, **SMALL}[arch]
    reference = timm_vit(image_size, sincos=True, **numbers)
    state = {f"module.base_encoder.{k}": v for k, v in reference.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v.clone() for k, v in reference.state_dict().items()}
    state["module.base_encoder.head.0.weight"] = torch.randn(64, numbers["embed_dim"])
    recorded = {"arch": arch} if image_size == 224 else {}  # moco-v3 names its 224-pixel ViTs only
    torch.save({"epoch": 1, **recorded, "state_dict": state}, tmp_path / "mocov3.pth.tar")
    x = torch.randn(2, 3, image_size, image_size)
    pretrained, features = features_of(tmp_path / "mocov3.pth.tar", x)
    assert pretrained.arch == arch and pretrained.method == "mocov3"
    torch.testing.assert_close(features, reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, image_size", [("deit_small", 224), ("deit_small_p8", 64), ("vit_base_p8", 64),
                                              ("deit_small_p4", 32)])
def test_timm_and_dino_backbone_files_load_as_their_networks(arch, image_size, tmp_path):
    # DINO's *_pretrain.pth and timm's files: the bare state dict under timm's names, a learned
    # position embedding; DeiT's head counts.
    torch.manual_seed(0)
    reference = timm_vit(image_size, sincos=False, **{**DEIT, **SMALL}[arch])
    torch.save(reference.state_dict(), tmp_path / "backbone.pth")
    x = torch.randn(2, 3, image_size, image_size)
    pretrained, features = features_of(tmp_path / "backbone.pth", x)
    assert pretrained.arch == arch and pretrained.method is None
    torch.testing.assert_close(features, reference(x), rtol=1e-4, atol=1e-4)


def test_moco_v3s_deit_format_vit_small_keeps_its_12_heads(tmp_path):
    # moco-v3's convert_to_deit.py writes {'model': backbone under timm's names}: its ViT-S has
    # moco-v3's fixed sin-cos position embedding, which tells it from DeiT's (learned).
    torch.manual_seed(0)
    reference = timm_vit(224, sincos=True, **MOCOV3["vit_small"])
    torch.save({"model": reference.state_dict()}, tmp_path / "deit-format.pth")
    x = torch.randn(2, 3, 224, 224)
    pretrained, features = features_of(tmp_path / "deit-format.pth", x)
    assert pretrained.arch == "vit_small" and pretrained.method == "mocov3"
    torch.testing.assert_close(features, reference(x), rtol=1e-4, atol=1e-4)


def test_a_vit_s_whose_head_count_nothing_tells_is_refused_naming_the_choices(tmp_path):
    # This project's ViT checkpoints written before they recorded the count (their ViT-S had 6 heads).
    torch.manual_seed(0)
    net = vit.build("deit_small_p4", 0)
    torch.save({"arch": "vit_small_p4", "state_dict": {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "old.pth.tar")
    with pytest.raises(ValueError, match=r"-a vit_small_p4 \(12 heads\).*-a deit_small_p4 \(6 heads\)|"
                                         r"does not say how many attention heads.*-a vit_small_p4 or -a deit_small_p4"):
        load_pretrained(tmp_path / "old.pth.tar")
    x = torch.randn(2, 3, 32, 32)
    pretrained, features = features_of(tmp_path / "old.pth.tar", x, arch="deit_small_p4")  # the user says which
    assert pretrained.arch == "deit_small_p4"
    torch.testing.assert_close(features, net.eval().forward_features(x))
    # A checkpoint that records its count rejects the other name.
    torch.save({"arch": "deit_small_p4", "backbone_variant": record(net),
                "state_dict": {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "new.pth.tar")
    assert load_pretrained(tmp_path / "new.pth.tar").arch == "deit_small_p4"
    with pytest.raises(ValueError, match="deit_small_p4 backbone but -a vit_small_p4"):
        load_pretrained(tmp_path / "new.pth.tar", "vit_small_p4")


@pytest.mark.parametrize("arch, family_lr", [("vit_small_p4", 3.0), ("resnet18", 0.1)])
def test_a_moco_v3_checkpoint_gets_moco_v3s_linear_protocol(arch, family_lr, tmp_path):
    torch.manual_seed(0)
    if arch.startswith("vit"):  # moco-v3's ViTs are timm's
        state = {f"module.base_encoder.{k}": v for k, v in timm_vit(32, sincos=True, **SMALL[arch]).state_dict().items()}
    else:  # its ResNets are torchvision's
        net = build_model("mocov3", arch, dim=16, mlp_dim=32)
        state = {f"module.base_encoder.{k}": v for k, v in net.encoder_q.state_dict().items()}
    state |= {k.replace("base_encoder", "momentum_encoder"): v for k, v in state.items()}
    torch.save({"state_dict": state, **({} if arch.startswith("vit") else {"arch": arch})}, tmp_path / "ckpt.pth.tar")
    pretrained = load_pretrained(tmp_path / "ckpt.pth.tar")
    args = argparse.Namespace(**{k: None for k in PROTOCOL_FLAGS}, batch_size=1024)
    line = linear_protocol(args, pretrained.method, pretrained.arch)
    # moco-v3's main_lincls.py: SGD, lr x B/256 (0.1 default; CONFIG.md's --lr=3 for ViTs), wd 0,
    # 90 epochs, cosine - not MoCo's lr 30 with steps at 60 and 80.
    assert (args.optimizer, args.lr, args.wd, args.epochs, args.cos) == ("sgd", family_lr * 4, 0.0, 90, True), line
    assert "mocov3's protocol" in line


def test_moco_v3s_resnets_zero_the_last_norm_of_every_residual_block():
    # moco-v3's main_moco.py builds its ResNets with torchvision's zero_init_residual=True: the last
    # BatchNorm of every block starts at zero, so each block starts as the identity.
    def last_norms(method_cfg):
        torch.manual_seed(0)
        model = build_model("mocov3", "resnet50", dim=16, mlp_dim=32,
                            backbone_options=backbone_flag_options("resnet50", method_cfg))
        return [block.bn3.weight for net in (model.encoder_q, model.encoder_k)
                for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for block in layer]

    for cfg in (recipes.resolve("mocov3", "mocov3-resnet50", False, {}), recipes.resolve("mocov3", None, False, {})):
        norms = last_norms(cfg)
        assert len(norms) == 2 * 16 and all(not w.any() for w in norms)
    assert all(w.all() for w in last_norms(recipes.resolve("mocov3", "small-mocov3", False, {"arch": "resnet50"})))


def test_a_checkpoint_of_another_vit_variant_or_none_recorded_is_refused():
    torch.manual_seed(0)
    net = vit.build("vit_small_p4", 0)
    assert record(net) == {"num_heads": 12}
    check_record(net, {"num_heads": 12}, "checkpoint 'x'")
    with pytest.raises(ValueError, match="with {'num_heads': 6}, this model has {'num_heads': 12}"):
        check_record(net, {"num_heads": 6}, "checkpoint 'x'")
    with pytest.raises(ValueError, match="written before checkpoints recorded the head count.*-a deit_small"):
        check_record(net, None, "checkpoint 'x'")  # this project's ViT-S then: 6 heads
    check_record(vit.build("deit_small_p4", 0), None, "checkpoint 'x'")  # which resumes as deit_small
    check_record(build_model("moco", "resnet18", K=16).encoder_q, None, "checkpoint 'x'")  # a ResNet needs no record


def test_moco_v3s_embedding_in_half_precision_is_not_taken_for_a_learned_one(tmp_path):
    # Within bf16's rounding of moco-v3's sin-cos embedding: which publisher, the weights no longer
    # say - an error naming both ViT-S, never the 6-head guess.
    torch.manual_seed(0)
    state = {k: v.to(torch.bfloat16) for k, v in timm_vit(224, sincos=True, **MOCOV3["vit_small"]).state_dict().items()}
    torch.save({"model": state}, tmp_path / "bf16.pth")
    with pytest.raises(ValueError, match="-a vit_small or -a deit_small"):
        load_pretrained(tmp_path / "bf16.pth")


def test_a_run_definition_from_before_the_records_reads_in_todays_terms():
    from selfsup.resume import legacy_run_definition

    old_vit = legacy_run_definition({"arch": "vit_small_p4", "optimizer": "adamw"}, {})
    assert old_vit == {"arch": "deit_small_p4", "optimizer": "adamw", "wd_exclude": "bias-norm-tokens"}
    assert legacy_run_definition({"arch": "resnet50", "optimizer": "sgd"}, {})["wd_exclude"] == "none"
    recorded = {"arch": "vit_small_p4", "optimizer": "adamw", "wd_exclude": "none", "zero_init_residual": True}
    assert legacy_run_definition(recorded, {"backbone_variant": {"num_heads": 12}}) == recorded


@pytest.mark.e2e
def test_a_vit_run_of_the_old_code_resumes_under_its_new_name(tmp_path):
    # Written before checkpoints recorded the head count: arch vit_small_p4 (6 heads then), AdamW's
    # two parameter groups. It continues as deit_small_p4 with its old weight-decay set.
    from helpers import make_image_folder, run_script

    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, size=20)
    run = ["main_pretrain.py", str(data), "--method", "mocov3", "--image-size", "32", "-b", "8", "--mlp-dim", "32",
           "--moco-dim", "16", "--optimizer", "adamw", "--lr", "1e-4", "-j", "0", "--device", "cpu",
           "--output-dir", str(tmp_path / "run")]
    r = run_script([*run, "-a", "deit_small_p4", "--epochs", "1", "--wd-exclude", "bias-norm-tokens"])
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    del ckpt["backbone_variant"], ckpt["run"]["wd_exclude"], ckpt["run"]["zero_init_residual"]
    ckpt["arch"] = ckpt["run"]["arch"] = ckpt["args"]["arch"] = "vit_small_p4"
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pth.tar")
    refused = run_script([*run, "-a", "vit_small_p4", "--epochs", "2"])
    assert refused.returncode == 2 and "--arch deit_small_p4 --wd-exclude bias-norm-tokens" in refused.stderr, \
        refused.stderr[-2000:]
    resumed = run_script([*run, "-a", "deit_small_p4", "--epochs", "2", "--wd-exclude", "bias-norm-tokens"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
