"""MoCo v3 and the Vision Transformers: the loss against moco-v3's formula written out, one process
and two, the momentum encoder, the predictor's side, the ViT's position embedding, stop-grad conv1,
its published sizes and moco-v3's own checkpoints."""

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import run_distributed
from selfsup.backbones import vit
from selfsup.builder import build_model
from selfsup.checkpoint import extract_backbone
from selfsup.methods import MoCoV3
from selfsup.probe import build_probe
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
    x1, x2 = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.predictor.parameters():
            p.mul_(1.5)
    # The keys come from encoder_k alone: a changed predictor moves only the queries.
    with torch.no_grad():
        a, b = copy.deepcopy(model), copy.deepcopy(changed)
        a._momentum_update_key_encoder(), b._momentum_update_key_encoder()
        assert torch.equal(a.encoder_k(x1), b.encoder_k(x1))
    loss = model(x1, x2)
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


def moco_v3_vit_state(net: vit.VisionTransformer) -> dict[str, torch.Tensor]:
    """`net`'s weights under moco-v3's names (its timm-based vits.py), written out by hand."""
    s, out = net.state_dict(), {}
    out["cls_token"], out["pos_embed"] = s["class_token"], s["encoder.pos_embedding"]
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = s["conv_proj.weight"], s["conv_proj.bias"]
    out["norm.weight"], out["norm.bias"] = s["encoder.ln.weight"], s["encoder.ln.bias"]
    for i in range(len(net.encoder.layers)):
        t = f"encoder.layers.encoder_layer_{i}."
        for ours, theirs in (("ln_1", "norm1"), ("ln_2", "norm2"), ("self_attention.out_proj", "attn.proj"),
                             ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{kind}"] = s[f"{t}{ours}.{kind}"]
        out[f"blocks.{i}.attn.qkv.weight"] = s[f"{t}self_attention.in_proj_weight"]
        out[f"blocks.{i}.attn.qkv.bias"] = s[f"{t}self_attention.in_proj_bias"]
    out["head.0.weight"] = torch.randn(4096, net.hidden_dim)  # moco-v3's projector: dropped
    return {f"module.base_encoder.{k}": v for k, v in out.items()} | {
        "module.momentum_encoder.cls_token": torch.zeros(1, 1, net.hidden_dim)}


def test_moco_v3s_own_vit_checkpoint_loads_with_the_same_weights():
    torch.manual_seed(0)
    original = vit.build("vit_small_p4", 0)
    with torch.no_grad():
        for p in original.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    weights = extract_backbone({"state_dict": moco_v3_vit_state(original), "arch": "vit_small"})
    expected = {k: v for k, v in original.state_dict().items()}
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    probe = build_probe("vit_small_p4", False, 10, weights).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(probe.features(x), original.eval().forward_features(x))


def test_moco_v3s_vit_names_give_the_features_of_a_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6, num_classes=0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        reference.pos_embed.copy_(vit.sincos_position_embedding(8, 384))
    state = {f"module.base_encoder.{k}": v for k, v in reference.state_dict().items()}
    weights = extract_backbone({"state_dict": state})
    probe = build_probe("vit_small_p4", False, 10, weights).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(probe.features(x), reference(x), rtol=1e-4, atol=1e-5)
