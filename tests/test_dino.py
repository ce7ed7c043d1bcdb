"""DINO against its reference's formulas written out (facebookresearch/dino main_dino.py DINOLoss,
utils.clip_gradients / cancel_gradients_last_layer, vision_transformer.py DINOHead): the loss over
every pair of views, the center over every process, the teacher temperature's schedule, the
weight-normalised last layer and its first epoch, per-parameter clipping, the EMA after the step."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import run_distributed
from selfsup.accumulation import Accumulation
from selfsup.methods import DINO
from selfsup.methods.dino import DINOHead, clip_each_, dino_loss, teacher_temperature
from test_builder import tiny_encoder


def tiny(**options) -> DINO:
    torch.manual_seed(0)
    model = DINO(tiny_encoder, out_dim=16, dim=8, hidden_dim=12, **options).double()
    with torch.no_grad():
        model.center.normal_()  # a center that matters
    return model


def crops(n=4, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sizes = (8, 8, 4, 4, 4)  # 2 global crops, 3 local ones
    return [torch.randn(n, 3, s, s, generator=g, dtype=dtype) for s in sizes]


def naive_loss(student_logits, teacher_logits, center, t_teacher, t_student=0.1):
    """main_dino.py DINOLoss, sample by sample and pair by pair: teacher views 0 and 1, every other
    student view, -sum(q log p) averaged over samples, then over the pairs."""
    n = student_logits[0].shape[0]
    total, pairs = 0.0, 0
    for iq in range(2):
        for v in range(len(student_logits)):
            if v == iq:
                continue
            per_sample = []
            for i in range(n):
                q = [math.exp((t - c) / t_teacher) for t, c in zip(teacher_logits[iq][i].tolist(), center.tolist())]
                q = [x / sum(q) for x in q]
                s = [x / t_student for x in student_logits[v][i].tolist()]
                log_norm = math.log(sum(math.exp(x) for x in s))
                per_sample.append(-sum(qk * (sk - log_norm) for qk, sk in zip(q, s)))
            total += sum(per_sample) / n
            pairs += 1
    return total / pairs


def test_the_loss_is_dinos_over_every_pair_of_different_views():
    model = tiny(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3).eval()
    model.set_epoch(1.5)  # epoch 1 of the warmup: 0.04 + 0.03 / 2
    # (BatchNorm on its running statistics: each crop alone gives what the crops of one size together do.)
    views = crops()
    with torch.no_grad():
        student = [model.encoder_q(v) for v in views]  # each crop alone: the head is per sample (no BN)
        teacher = [model.encoder_k(v) for v in views[:2]]
    expected = naive_loss(student, teacher, model.center[0], 0.055)
    center = model.center.clone()
    loss = model(*views)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # The center moves after the loss, once: 0.9 c + 0.1 mean(teacher outputs of the step).
    torch.testing.assert_close(model.center, 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True))


def test_the_agreement_meter_counts_every_pair_of_different_views():
    """The pretext meter: percent of (teacher view, other student view, sample) triples whose top
    prototypes coincide, counted one by one."""
    g = torch.Generator().manual_seed(3)
    n, k = 6, 5
    student = [torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(4)]
    targets = [F.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) / 0.3, -1) for _ in range(2)]
    student[2][:3] = targets[0][:3] * 10  # agreement with each teacher view, so that every pairing
    student[3][:5] = targets[1][:5] * 10  # mixed up counts something else
    hits, triples = 0, 0
    for iq in range(2):
        for v in range(4):
            if v != iq:
                for i in range(n):
                    hits += max(range(k), key=lambda c: student[v][i, c].item()) == \
                        max(range(k), key=lambda c: targets[iq][i, c].item())
                    triples += 1
    _, pretext = dino_loss(student, targets, 0.1)
    assert pretext["acc1"].item() == pytest.approx(100 * hits / triples, rel=1e-6)  # counted in float32
    assert hits > 0


def _step(rank, world, views, center):
    model = tiny()
    with torch.no_grad():
        model.center.copy_(center)
    model.eval()  # BatchNorm on running statistics: one process's 2N and two processes' N agree
    n = views[0].shape[0] // world
    mine = [v[rank * n:(rank + 1) * n] for v in views]
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss = ddp(*mine)
    loss.backward()
    return {"loss": loss.detach(), "center": model.center.clone(),
            "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.e2e
def test_two_processes_give_the_center_and_gradients_of_one_with_the_whole_batch(tmp_path):
    views, center = crops(n=6), tiny().center.clone()
    one = run_distributed(_step, 1, tmp_path, views, center)[0]
    two = run_distributed(_step, 2, tmp_path, views, center)
    for r in two:
        torch.testing.assert_close(r["center"], one["center"])  # the batch mean over both processes
        for k, g in one["grads"].items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-7, atol=1e-10)
    assert (two[0]["loss"] + two[1]["loss"]).item() / 2 == pytest.approx(one["loss"].item(), rel=1e-9)


def test_the_teacher_temperature_warms_up_as_np_linspace_then_stays():
    schedule = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))  # main_dino.py's, 100 epochs
    assert [teacher_temperature(e, 0.04, 0.07, 30) for e in range(100)] == pytest.approx(schedule.tolist(), abs=1e-12)
    assert teacher_temperature(0, 0.04, 0.04, 0) == 0.04


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_the_last_layer_is_weight_normalised_with_its_norm_frozen_or_not(norm_last_layer):
    torch.manual_seed(0)
    head = DINOHead(6, 10, norm_last_layer=norm_last_layer, nlayers=3, hidden_dim=8, bottleneck_dim=4)
    v = head.last_layer.weight_v.detach()
    x = torch.randn(3, 6)
    z = F.normalize(head.mlp(x), dim=-1)
    # g v / |v| row by row, g = 1 at the start: the prototypes have unit norm.
    torch.testing.assert_close(head(x), z @ (v / v.norm(dim=1, keepdim=True)).T)
    assert head.last_layer.weight_g.requires_grad is (not norm_last_layer)
    assert torch.equal(head.last_layer.weight_g, torch.ones(10, 1))
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_the_last_layer_learns_nothing_in_the_first_epoch_and_the_rest_moves():
    # main_dino.py's cancel_gradients_last_layer sets the gradients to None, so AdamW skips the layer
    # altogether: no decoupled weight decay, no moments (a zeroed gradient would still decay it).
    model = tiny(freeze_last_layer=1, clip_grad=3.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    last = model.encoder_q.fc.last_layer.weight_v
    for epoch, frozen in ((0.5, True), (1.0, False)):
        before = {k: p.detach().clone() for k, p in model.encoder_q.named_parameters()}
        model.set_epoch(epoch)
        opt.zero_grad()
        model(*crops()).backward()
        model.before_optimizer_step(opt, scaler)
        assert (last.grad is None) is frozen
        opt.step()
        moved = {k for k, p in model.encoder_q.named_parameters() if not torch.equal(p, before[k])}
        assert ("fc.last_layer.weight_v" not in moved) is frozen, (epoch, moved)
        assert (last in opt.state) is not frozen
        assert {"conv1.weight", "fc.mlp.0.weight"} <= moved


def test_fp16_gradients_are_unscaled_before_they_are_clipped():
    # Under fp16 the GradScaler multiplies the loss by 2^16: clipping the scaled gradients at the bound
    # would shrink the real step 65536-fold once the scaler divides. The reference: the unscaled
    # gradients, each clipped on its own (utils.clip_gradients), then the optimizer's step.
    model = tiny(freeze_last_layer=0, clip_grad=0.05)
    views = crops()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(model(*views)).backward()
    model.before_optimizer_step(opt, scaler)
    scaler.step(opt)
    reference(*views).backward()
    clipped = 0
    with torch.no_grad():
        for p in reference.encoder_q.parameters():
            if p.grad is not None:
                scale = min(1.0, 0.05 / (p.grad.norm(2).item() + 1e-6))
                clipped += scale < 1.0
                p -= 0.1 * p.grad * scale
    assert clipped > 0  # the bound binds somewhere: the test sees clipping at all
    for (name, p), q in zip(model.encoder_q.named_parameters(), reference.encoder_q.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_gradients_are_clipped_parameter_by_parameter():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    clip_each_([a, b], 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * (1.0 / (5 + 1e-6)))  # each to its own 1
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # below the bound: untouched (a global clip would scale it)


def test_the_teacher_follows_the_student_after_the_optimizer_step():
    model = tiny(clip_grad=0, freeze_last_layer=0)
    model.momentum_at(0.0)  # 0.996
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    teacher = [p.detach().clone() for p in model.encoder_k.parameters()]
    model(*crops()).backward()
    model.before_optimizer_step(opt, torch.amp.GradScaler("cpu", enabled=False))
    opt.step()
    student = [p.detach().clone() for p in model.encoder_q.parameters()]
    model.after_optimizer_step()
    for t_old, s_new, t_new in zip(teacher, student, model.encoder_k.parameters()):
        torch.testing.assert_close(t_new, 0.996 * t_old + 0.004 * s_new)


def test_micro_batches_share_the_steps_center_and_update_it_once():
    model, views = tiny(), crops(n=4)
    whole = copy.deepcopy(model).eval()
    parts = copy.deepcopy(model).eval()
    whole(*views)
    acc = Accumulation(2)
    micro = [[v[:2] for v in views], [v[2:] for v in views]]
    with torch.no_grad():
        plan = parts.prepare(micro, acc)
    losses = [parts(*m, plan=plan, micro=j)[1] for j, m in enumerate(micro)]
    parts.finish(plan)
    torch.testing.assert_close(parts.center, whole.center)  # from all 4 samples' 8 teacher outputs, once
    eval_model = copy.deepcopy(model).eval()
    assert sum(losses).item() / 2 == pytest.approx(eval_model(*views).item(), rel=1e-9)


def test_multi_crop_flags_shape_the_dino_augmentation_only():
    from selfsup import recipes

    assert recipes.aug_options(recipes.resolve("dino", None, False, {}))["local_crops_number"] == 8
    # DINO over another augmentation's two views: its two global crops, no local ones
    assert recipes.aug_options(recipes.resolve("dino", None, False, {"aug": "byol"})) == {}
    with pytest.raises(ValueError, match="--local-crops-number: options of the dino augmentation's multi-crop"):
        recipes.resolve("dino", None, False, {"aug": "byol", "local_crops_number": 4})


def test_lr_weight_decay_and_momentum_follow_dinos_cosine_schedulers():
    # utils.cosine_scheduler, written out: a linear warmup (np.linspace, both ends) then
    # final + (base - final)(1 + cos(pi i / I)) / 2 over the I remaining iterations. main_dino.py:
    # lr (warmup to lr, cosine to min_lr), wd (0.04 -> 0.4, no warmup) on the groups that decay (a
    # group excluded keeps 0), the teacher momentum (0.996 -> 1).
    def cosine_scheduler(base, final, epochs, niter, warmup_epochs=0):
        warmup = np.linspace(0, base, warmup_epochs * niter)
        iters = np.arange(epochs * niter - warmup_epochs * niter)
        return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))

    from selfsup.distributed import DistInfo
    from selfsup.engine import StepContext, _set_schedules
    from selfsup.optim import build_optimizer

    epochs, niter, warmup = 4, 5, 1
    model = tiny()
    opt = build_optimizer("adamw", [(n, p) for n, p in model.named_parameters() if p.requires_grad], 0.0, 0.9,
                          0.04, wd_exclude="bias-norm")
    ctx = StepContext(epochs=epochs, steps_per_epoch=niter, base_lr=5e-4, cos=True, schedule=[],
                      warmup_epochs=warmup, amp="none", print_freq=10, global_batch=8, dist=DistInfo(),
                      min_lr=1e-6, wd=0.04, wd_end=0.4)
    lrs = cosine_scheduler(5e-4, 1e-6, epochs, niter, warmup)
    wds = cosine_scheduler(0.04, 0.4, epochs, niter)
    ms = cosine_scheduler(0.996, 1.0, epochs, niter)
    for i in range(epochs * niter):
        lr, m = _set_schedules(model, opt, ctx, i // niter, i % niter)
        if i >= warmup * niter:  # the warmup's end differs by one step (docs/CONFIG.md: np.linspace includes it)
            assert lr == pytest.approx(lrs[i], rel=1e-9, abs=1e-15), i
        assert m == pytest.approx(ms[i], abs=1e-12), i
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == pytest.approx(wds[i], abs=1e-12) and no_decay["weight_decay"] == 0.0, i
