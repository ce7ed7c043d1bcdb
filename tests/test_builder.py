"""MoCo, BYOL and SimCLR on one process, against independent computations."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY_OPTIONS

from selfsup.builder import BYOL, MoCo, SimCLR, build_model
from selfsup.backbones import ARCHS, backbone_constructor
from selfsup.methods import METHODS, MomentumMethod
from selfsup.networks import SplitBatchNorm


def tiny_encoder(num_classes: int) -> nn.Module:
    """A torchvision-style network small enough for exact checks: conv-BN-ReLU-pool-fc, with the
    ResNet layout's names (its stages empty), so that its features can be read without its head."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.maxpool = self.layer1 = self.layer2 = self.layer3 = self.layer4 = nn.Identity()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(self.conv1(x))), 1).flatten(1))

    return Net()


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


# ---------------------------------------------------------------------------------------------- MoCo


MOMENTUM_METHODS = [name for name, cls in METHODS.items() if issubclass(cls, MomentumMethod)]


@pytest.mark.parametrize("method", MOMENTUM_METHODS)
def test_split_batchnorm_keeps_the_key_network_frozen(method):
    # A trainable parameter without gradients makes DDP fail at the second step.
    model = build_model(method, "resnet18", bn_splits=2, dim=16, **TINY_OPTIONS[method])
    assert any(isinstance(m, SplitBatchNorm) for m in model.encoder_k.modules())
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
    # Every parameter of the trained network trains, but DINO's last-layer norm, frozen by design.
    assert all(p.requires_grad for n, p in model.encoder_q.named_parameters() if not n.endswith("last_layer.weight_g"))


def test_moco_logits_are_float32_under_bf16_autocast():
    # bf16 resolves a logit of about 14 (cosine 0.98 / T 0.07) only to about 0.06: the logits must be
    # computed in float32 from whatever half-precision features the encoders give.
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=16, K=32, m=0.9, T=0.07)
    queue = model.queue.clone()
    seen = {}
    model.encoder_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o.detach()))
    model.encoder_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o.detach()))
    x1, x2 = images(n=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x1, x2)
    assert seen["q"].dtype == torch.bfloat16 and logits.dtype == torch.float32
    q = F.normalize(seen["q"].double(), dim=1)  # independent: float64 from the same features
    k = F.normalize(seen["k"].double(), dim=1)
    expected = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.double()], dim=1) / 0.07
    torch.testing.assert_close(logits.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(model.queue[:, :8].double(), k.T, atol=1e-6, rtol=0)



def test_moco_attributes_and_shapes():
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=16, K=12, m=0.9, T=0.2)
    assert model.queue.shape == (16, 12) and model.queue_ptr.dtype == torch.long
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(12))
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk)
    q_img, k_img = images()
    queue_before = model.queue.clone()
    logits, labels = model(q_img, k_img)
    assert logits.shape == (4, 1 + 12) and labels.shape == (4,) and (labels == 0).all()

    # Independent computation with the (updated) key encoder; in train mode BN uses batch
    # statistics, so the running statistics the forward changed do not matter.
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    with torch.no_grad():
        q = F.normalize(enc_q(q_img), dim=1)
        k = F.normalize(enc_k(k_img), dim=1)
    expected_pos = (q * k).sum(1) / 0.2
    expected_neg = q @ queue_before / 0.2
    torch.testing.assert_close(logits[:, 0].detach(), expected_pos)
    torch.testing.assert_close(logits[:, 1:].detach(), expected_neg)
    # The keys were enqueued at the old pointer.
    torch.testing.assert_close(model.queue[:, :4].T, k)
    assert int(model.queue_ptr) == 4


def test_moco_queue_wraps_around_when_K_is_not_a_multiple_of_the_batch():
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=8, K=10, m=0.99)
    model.eval()  # keys independent of batch composition, so they can be recomputed exactly
    expected = model.queue.clone()
    ptr = 0
    for step in range(4):
        q_img, k_img = images(4, seed=step)
        model(q_img, k_img)
        with torch.no_grad():
            k = F.normalize(model.encoder_k(k_img), dim=1)
        for i in range(4):
            expected[:, (ptr + i) % 10] = k[i]
        ptr = (ptr + 4) % 10
        assert int(model.queue_ptr) == ptr
        torch.testing.assert_close(model.queue, expected)
    assert ptr == 6  # 16 keys through a queue of 10: wrapped once


def test_moco_momentum_update_formula_is_bitwise_the_reference():
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=8, K=8, m=0.75)
    with torch.no_grad():  # make q and k differ
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q_params = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_params = [p.detach().clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for pk_new, pk, pq in zip(model.encoder_k.parameters(), k_params, q_params):
        assert torch.equal(pk_new, pk * 0.75 + pq * (1.0 - 0.75))


def test_moco_no_gradient_reaches_the_key_encoder():
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=8, K=16, mlp=True)
    logits, labels = model(*images())
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert isinstance(model.encoder_q.fc, nn.Sequential) and len(model.encoder_q.fc) == 3


def test_moco_rejects_K_smaller_than_the_global_batch():
    with pytest.raises(ValueError, match=r"K=100 .*global batch size 256"):
        MoCo(tiny_encoder, K=100, global_batch_size=256)
    model = MoCo(tiny_encoder, dim=8, K=3)
    with pytest.raises(ValueError, match="K=3"):
        model(*images(4))


def test_split_batchnorm_normalises_each_sub_batch():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=2)
    x = torch.randn(6, 3, 4, 4) * 3 + 1
    y = bn(x)
    for s in range(2):
        part = x[s::2]
        ref = F.batch_norm(part, None, None, training=True, eps=bn.eps)
        torch.testing.assert_close(y[s::2], ref)
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False))


def test_moco_bn_splits_really_changes_the_keys():
    torch.manual_seed(0)
    plain = MoCo(tiny_encoder, dim=8, K=16)
    split = MoCo(tiny_encoder, dim=8, K=16, bn_splits=2)
    split.load_state_dict(plain.state_dict())
    assert isinstance(split.encoder_k.bn1, SplitBatchNorm)
    q_img, k_img = images(8)
    torch.manual_seed(1)
    plain(q_img, k_img)
    split(q_img, k_img)
    assert not torch.allclose(plain.queue[:, :8], split.queue[:, :8])


# ---------------------------------------------------------------------------------------------- BYOL


def test_byol_target_is_an_ema_and_gets_no_gradient():
    torch.manual_seed(0)
    model = BYOL(tiny_encoder, dim=8, hidden_dim=16, m=0.9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        online_before = [p.detach().clone() for p in model.encoder_q.parameters()]
        target_before = [p.detach().clone() for p in model.encoder_k.parameters()]
        loss = model(*images(4, seed=step))
        loss.backward()
        assert all(p.grad is None for p in model.encoder_k.parameters())
        for t_new, t, o in zip(model.encoder_k.parameters(), target_before, online_before):
            assert torch.equal(t_new, t * 0.9 + o * (1 - 0.9))
        opt.step()
        opt.zero_grad()


def test_byol_loss_is_symmetric_and_matches_the_formula():
    torch.manual_seed(0)
    model = BYOL(tiny_encoder, dim=8, hidden_dim=16, m=1.0)  # m=1: the target stays put
    x1, x2 = images(4)
    a = model(x1, x2)
    b = model(x2, x1)
    torch.testing.assert_close(a, b)
    with torch.no_grad():
        p1 = model.predictor(model.encoder_q(x1))
        p2 = model.predictor(model.encoder_q(x2))
        t1, t2 = model.encoder_k(x1), model.encoder_k(x2)
    cos = lambda u, v: (F.normalize(u, dim=1) * F.normalize(v, dim=1)).sum(1)  # noqa: E731
    expected = (2 - 2 * cos(p1, t2)).mean() + (2 - 2 * cos(p2, t1)).mean()
    torch.testing.assert_close(a.detach(), expected)


# ---------------------------------------------------------------------------------------------- SimCLR


def test_simclr_loss_is_twice_nt_xent_of_the_projections():
    from test_losses import naive_nt_xent

    torch.manual_seed(0)
    model = SimCLR(tiny_encoder, dim=8, hidden_dim=16, T=0.5)
    x1, x2 = images(4)
    loss = model(x1, x2)
    with torch.no_grad():
        z = model.encoder_q(torch.cat([x1, x2]))  # both views in one batch, as SimCLR
    # google-research/simclr's loss_a + loss_b: twice the mean over the 2N anchors
    torch.testing.assert_close(loss.detach(), 2 * naive_nt_xent(z[:4], z[4:], 0.5))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- builder


def test_build_model_names_and_errors():
    m = build_model("moco", "resnet18", small_stem=True, K=64, mlp=True, dim=32)
    assert isinstance(m, MoCo) and m.encoder_q.conv1.kernel_size == (3, 3)
    assert isinstance(m.encoder_q.maxpool, nn.Identity)
    assert isinstance(build_model("byol", "resnet18", hidden_dim=32, dim=16), BYOL)
    assert isinstance(build_model("simclr", "resnet18", hidden_dim=32, dim=16), SimCLR)
    with pytest.raises(ValueError, match="valid: " + ", ".join(METHODS)):
        build_model("swav", "resnet18")
    with pytest.raises(ValueError, match="resnet50"):
        build_model("moco", "vgg16")
    with pytest.raises(ValueError, match="does not take"):
        build_model("byol", "resnet18", K=10)
    assert "wide_resnet50_2" in ARCHS
    net = backbone_constructor("resnet50")(num_classes=10)
    assert net.fc.in_features == 2048


def test_every_method_keeps_the_trained_network_under_encoder_q():
    for method in METHODS:
        keys = build_model(method, "resnet18", dim=16, **TINY_OPTIONS[method]).state_dict()
        assert "encoder_q.conv1.weight" in keys and "encoder_q.layer4.1.bn2.running_var" in keys


def test_every_method_maps_its_flags_onto_its_constructor():
    from selfsup.builder import method_options

    for name, cls in METHODS.items():
        assert cls.name == name
        assert set(cls.flag_options.values()) <= method_options(name), name
        assert set(cls.networks) <= {"encoder_q", "encoder_k", "predictor"}
        flags = {"moco_dim": 16, "moco_k": 32, "moco_m": 0.9, "moco_t": 0.2, "mlp_dim": 8, "batch_size": 8,
                 "mlp": True, "moco_m_cos": True, "shuffle_bn": True, "bn_splits": 1}
        model = build_model(name, "resnet18", **cls.options(flags))
        assert all(isinstance(getattr(model, n), nn.Module) for n in cls.networks)
