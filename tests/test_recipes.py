"""The papers' recipes, checked against their formulas and their code: schedules, their use at
every step, LARS in both of its forms, BYOL's stop-gradient, SimCLR's head and loss scale."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_builder import images, tiny_encoder
from test_losses import naive_nt_xent

import main_pretrain
from selfsup import recipes
from selfsup.builder import BYOL, SimCLR, build_model
from selfsup.errors import UsageError
from selfsup.distributed import DistInfo
from selfsup.engine import StepContext, train_one_epoch
from selfsup.losses import byol_loss
from selfsup.methods import METHODS
from selfsup.networks import ScaleOnlyBatchNorm1d
from selfsup.optim import LARS, cosine_lr, cosine_momentum, step_lr

# ---------------------------------------------------------------------------------------------- schedules


def test_learning_rate_schedules_follow_the_papers_formulas():
    # SimCLR / BYOL: linear warmup over 10 epochs, then cosine decay to 0 at 1000 (base lr 4.8).
    base, warmup, total = 4.8, 10, 1000
    for epoch in (0.0, 2.5, 9.99, 10.0, 255.0, 505.0, 999.0, 1000.0):
        if epoch < warmup:
            expected = base * epoch / warmup
        else:
            expected = base * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (total - warmup)))
        assert cosine_lr(base, epoch, total, warmup) == pytest.approx(expected, abs=1e-12), epoch
    # MoCo v1: lr 0.03, x0.1 at epochs 120 and 160.
    for epoch, expected in ((0, 0.03), (119.9, 0.03), (120, 0.003), (159, 0.003), (160, 0.0003), (199, 0.0003)):
        assert step_lr(0.03, epoch, [120, 160]) == pytest.approx(expected, rel=1e-12), epoch


def test_momentum_schedule_follows_byols_formula():
    # BYOL, Sec. 3.2: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 at step k of K.
    for k, K in ((0, 1000), (1, 1000), (250, 1000), (500, 1000), (999, 1000), (1000, 1000)):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * k / K) + 1) / 2
        assert cosine_momentum(0.996, k, K) == pytest.approx(expected, abs=1e-15)


class _Recorder(BYOL):
    """BYOL that records the learning rate and momentum its training step saw."""

    def __init__(self, optimizer_box):
        super().__init__(tiny_encoder, dim=8, hidden_dim=16, m=0.99)
        self.box, self.seen = optimizer_box, []

    def prepare(self, micro, acc):  # once per optimizer step
        self.seen.append((self.box[0].param_groups[0]["lr"], self.m))
        return super().prepare(micro, acc)


def test_the_engine_sets_the_schedules_at_every_step():
    box = []
    model = _Recorder(box)
    box.append(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
    steps, epochs, n = 4, 3, 4
    ctx = StepContext(epochs=epochs, steps_per_epoch=steps, base_lr=0.3, cos=True, schedule=[], warmup_epochs=1.0,
                      amp="none", print_freq=1000, global_batch=n, dist=DistInfo())
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        batches = [([torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)], torch.zeros(n), torch.zeros(n))
                   for _ in range(steps)]
        train_one_epoch(model, batches, lambda v, e, s: [v], box[0], torch.amp.GradScaler("cpu", enabled=False),
                        epoch, 0, ctx)
    assert len(model.seen) == steps * epochs
    for i, (lr, m) in enumerate(model.seen):
        t = i / steps  # fractional epoch of step i
        expected_lr = 0.3 * t if t < 1 else 0.3 * 0.5 * (1 + math.cos(math.pi * (t - 1) / (epochs - 1)))
        expected_m = 1 - (1 - 0.99) * (math.cos(math.pi * i / (steps * epochs)) + 1) / 2
        assert lr == pytest.approx(expected_lr, abs=1e-12) and m == pytest.approx(expected_m, abs=1e-12), i


# ---------------------------------------------------------------------------------------------- LARS


def naive_lars(params, grads_per_step, lrs, wd, momentum, eta, classic):
    """LARS step by step as google-research/simclr (classic) and deepmind-research byol write it."""
    params = [p.clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    for grads, lr in zip(grads_per_step, lrs):
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.ndim > 1:  # weights: decay and trust ratio; biases and norms: neither
                g = g + wd * p
                w_norm, g_norm = p.norm().item(), g.norm().item()
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
            else:
                trust = 1.0
            if classic:  # v = m v + lr * trust * g; p = p - v
                mus[i] = momentum * mus[i] + lr * trust * g
                params[i] = p - mus[i]
            else:  # mu = m mu + trust * g; p = p - lr * mu
                mus[i] = momentum * mus[i] + trust * g
                params[i] = p - lr * mus[i]
    return params


@pytest.mark.parametrize("classic", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_lars_matches_the_papers_code_under_a_changing_learning_rate(classic, foreach):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    lrs = [0.1, 0.4, 0.2, 0.05]  # a schedule: where the two momentum forms differ
    expected = naive_lars(params, grads, lrs, wd=1e-2, momentum=0.9, eta=0.02, classic=classic)
    live = [nn.Parameter(p.clone()) for p in params]
    opt = LARS(live, lr=lrs[0], weight_decay=1e-2, momentum=0.9, trust_coefficient=0.02, classic_momentum=classic,
               foreach=foreach)
    for step, lr in zip(grads, lrs):
        for p, gr in zip(live, step):
            p.grad = gr.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
    for p, e in zip(live, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    other = naive_lars(params, grads, lrs, wd=1e-2, momentum=0.9, eta=0.02, classic=not classic)
    assert not torch.allclose(live[0].detach(), other[0])  # the test tells the two forms apart


def test_simclr_trains_with_classic_momentum_and_the_presets_with_global_batchnorm():
    cfg = recipes.resolve("simclr", None, False, {})
    assert cfg["classic_momentum"] is True
    assert recipes.resolve("byol", None, False, {})["classic_momentum"] is False  # BYOL's optax form
    for preset in ("byol", "simclr"):  # cross-replica BN, as their configs
        assert recipes.resolve(None, preset, False, {})["sync_bn"] is True
    assert recipes.resolve(None, "mocov2", False, {})["sync_bn"] is False  # shuffle BN instead
    # Across CPU processes (gloo) the preset's SyncBN is refused with the way out; a single
    # process needs none (its SyncBN is BatchNorm), so a laptop runs the preset as it is.
    args = main_pretrain.resolve_config(main_pretrain.get_args_parser().parse_args(["--preset", "byol", "-b", "8"]))
    with pytest.raises(UsageError, match="--no-sync-bn"):
        main_pretrain.build(args, DistInfo(rank=1, world_size=2, backend="gloo"))


# ---------------------------------------------------------------------------------------------- BYOL


def test_byol_target_receives_no_gradient_and_the_online_gradient_is_the_fixed_target_one():
    torch.manual_seed(0)
    model = BYOL(tiny_encoder, dim=8, hidden_dim=16, m=0.9)
    reached = []

    def watch_inputs(module, inputs):  # a gradient arriving at the target network's input
        x = inputs[0].clone()
        if x.requires_grad:
            x.register_hook(lambda grad: reached.append(grad.abs().sum().item()))
        return (x,)

    model.encoder_k.register_forward_pre_hook(watch_inputs)
    x1, x2 = (x.requires_grad_() for x in images(n=6))
    reference = copy.deepcopy(model)  # the same weights, before the step's momentum update
    loss = model(x1, x2)
    loss.backward()
    assert reached == [] and all(p.grad is None for p in model.encoder_k.parameters())
    # Independent: the loss with the target's projections as constants (after the same EMA update).
    reference._momentum_update_key_encoder()
    with torch.no_grad():
        t1, t2 = reference.encoder_k(x1), reference.encoder_k(x2)
    z1, z2 = reference.encoder_q(x1), reference.encoder_q(x2)
    p1, p2 = reference.predictor(z1), reference.predictor(z2)
    expected = (2 - 2 * F.cosine_similarity(p1, t2, dim=-1)).mean() + (2 - 2 * F.cosine_similarity(p2, t1, dim=-1)).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(model.encoder_q.named_parameters(), reference.encoder_q.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # And on the predictions themselves, the analytic gradient of 2 - 2 cos(p, t) with t fixed.
    p = p1.detach().clone().requires_grad_()
    byol_loss(p, t2).mean().backward()
    pn, tn = p.detach().norm(dim=1, keepdim=True), t2.norm(dim=1, keepdim=True)
    cos = (p.detach() * t2).sum(1, keepdim=True) / (pn * tn)
    analytic = -2 / len(p) * (t2 / (pn * tn) - cos * p.detach() / pn ** 2)
    torch.testing.assert_close(p.grad, analytic)


# ---------------------------------------------------------------------------------------------- SimCLR


def test_simclr_head_ends_in_a_scale_only_batchnorm_and_its_loss_is_the_codes_sum_of_two_directions():
    torch.manual_seed(0)
    model = SimCLR(tiny_encoder, dim=8, hidden_dim=16, T=0.2)
    last_linear, last_norm = model.encoder_q.fc[-2], model.encoder_q.fc[-1]
    assert isinstance(last_linear, nn.Linear) and last_linear.bias is None
    assert isinstance(last_norm, ScaleOnlyBatchNorm1d) and not last_norm.bn.affine  # a scale, no shift
    assert [n for n, _ in last_norm.named_parameters()] == ["weight"]
    x1, x2 = images(n=5)
    loss = model(x1, x2)
    z = model.encoder_q(torch.cat([x1, x2]))  # train mode: the same batch statistics
    # google-research/simclr: loss_a + loss_b, each the mean over N anchors = 2 x the mean over 2N
    assert loss.item() == pytest.approx(2 * naive_nt_xent(z[:5].double(), z[5:].double(), 0.2).item(), rel=1e-5)


def test_build_model_still_builds_every_method_with_its_defaults():
    for method in METHODS:
        assert build_model(method, "resnet18").encoder_q is not None


# ---------------------------------------------------------------------------------------------- AdamW


# Which parameters each reference decays, read from their code: moco-v3's main_moco.py builds
# AdamW(model.parameters(), ...) - all of them; DINO's utils.get_params_groups leaves out names
# ending in ".bias" and 1-D parameters; timm's no_weight_decay (MAE) also the position embedding
# and the tokens.
WD_SETS = {"none": {"pos_embed", "cls_token", "proj.weight", "proj.bias", "norm.weight", "norm.bias"},
           "bias-norm": {"pos_embed", "cls_token", "proj.weight"},
           "bias-norm-tokens": {"proj.weight"}}


@pytest.mark.parametrize("exclude", list(WD_SETS))
def test_adamw_decays_exactly_the_references_parameters(exclude):
    from selfsup.optim import build_optimizer

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.randn(1, 3, 4))
            self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.proj(x + self.pos_embed + self.cls_token)).sum()

    torch.manual_seed(0)
    net = Tokens()
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer("adamw", net.named_parameters(), lr=0.1, weight_decay=0.5, wd_exclude=exclude)
    net(torch.randn(2, 3, 4)).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    # Independent: one AdamW step by its formula (Loshchilov & Hutter), bias-corrected moments of
    # one gradient: m / sqrt(v) = g / |g| elementwise, then the decoupled decay on the decayed set.
    for n, p in net.named_parameters():
        g = grads[n]
        update = g / (g.abs() + 1e-8)
        wd = 0.5 if n in WD_SETS[exclude] else 0.0
        expected = start[n] * (1 - 0.1 * wd) - 0.1 * update
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=n)


def test_the_papers_vit_presets_decay_as_their_code():
    assert recipes.PRESETS["mocov3-vit-small"]["wd_exclude"] == "none"  # moco-v3: AdamW(model.parameters())
    assert recipes.resolve("mocov3", "mocov3-vit-base", False, {})["wd_exclude"] == "none"
