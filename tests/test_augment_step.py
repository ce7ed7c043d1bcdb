"""The training step's fast paths: channels_last end to end, multi-tensor EMA and LARS, the
key/target network outside DDP's reducer, and --compile's graceful fallback."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from helpers import TINY_OPTIONS
from selfsup.builder import build_model
from selfsup import networks
from selfsup.methods import METHODS, MomentumMethod
from selfsup.networks import compile_networks
from selfsup.optim import LARS


def conv_inputs_not_channels_last(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> list[str]:
    bad: list[str] = []

    def hook(name):
        def check(module, inputs, output):
            if not inputs[0].is_contiguous(memory_format=torch.channels_last):
                bad.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    model(x1, x2)
    for h in handles:
        h.remove()
    return bad


# Each method once, with 2, 1 (plain BatchNorm) or 4 BatchNorm splits in turn.
@pytest.mark.parametrize("method,bn_splits", [(m, (2, 1, 4)[i % 3]) for i, m in enumerate(METHODS)])
def test_channels_last_reaches_every_convolution(method, bn_splits):
    torch.manual_seed(0)
    model = build_model(method, "resnet18", dim=16, bn_splits=bn_splits, **TINY_OPTIONS[method])
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    reference = copy.deepcopy(model)
    model.to(memory_format=torch.channels_last)
    cl = [x.contiguous(memory_format=torch.channels_last) for x in (x1, x2)]
    assert conv_inputs_not_channels_last(copy.deepcopy(model), *cl) == []
    # Same numbers as the default format (SplitBatchNorm hands back the format it was given).
    torch.manual_seed(1)
    out = model(*cl)
    torch.manual_seed(1)
    ref = reference(x1, x2)
    out, ref = (out[0], ref[0]) if method == "moco" else (out, ref)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)  # MoCo logits are divided by T = 0.07


def test_ema_update_is_one_multi_tensor_op_per_step(monkeypatch):
    model = build_model("byol", "resnet18", dim=16, hidden_dim=32)
    calls = []
    for name in ("_foreach_mul_", "_foreach_add_"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    target = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    assert calls == ["_foreach_mul_", "_foreach_add_"]  # not one call per parameter (~65 here)
    for new, old, online in zip(model.encoder_k.parameters(), target, model.encoder_q.parameters()):
        torch.testing.assert_close(new, old * model.m + online * (1 - model.m))


def test_lars_multi_tensor_step_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    nn.init.zeros_(net[3].bias)
    loop, multi = net, copy.deepcopy(net)
    opts = [LARS(loop.parameters(), lr=0.5, weight_decay=1e-2, foreach=False),
            LARS(multi.parameters(), lr=0.5, weight_decay=1e-2, foreach=True)]
    with torch.no_grad():
        multi[0].weight.zero_(), loop[0].weight.zero_()  # a zero-norm weight: trust ratio 1
    for _ in range(3):
        x = torch.randn(6, 3, 8, 8)
        for n, o in zip((loop, multi), opts):
            o.zero_grad()
            n(x).square().mean().backward()
            o.step()
    for a, b in zip(loop.parameters(), multi.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if issubclass(cls, MomentumMethod)])
def test_ddp_reduces_only_the_trained_parameters(tmp_path, method):
    """The key/target network has requires_grad=False: DDP leaves it out of its reducer, so no
    find_unused_parameters is needed."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(method, "resnet18", dim=16, **TINY_OPTIONS[method])
        ddp = nn.parallel.DistributedDataParallel(model)
        info = ddp._get_ddp_logging_data()
        trained = [p for p in model.parameters() if p.requires_grad]
        assert info["num_parameter_tensors"] == len(trained) < len(list(model.parameters()))
        assert not info["find_unused_parameters"]
        assert all(not p.requires_grad for p in model.encoder_k.parameters())
    finally:
        dist.destroy_process_group()


def test_compile_keeps_parameter_names_or_says_why_not(monkeypatch):
    model = build_model("byol", "resnet18", dim=16, hidden_dim=32)
    names = list(model.state_dict())
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    reason = compile_networks(model, torch.device("cpu"))
    assert reason and "does not support" in reason
    monkeypatch.undo()
    monkeypatch.setattr(networks, "compile_probe", lambda device_type: "no Python.h")
    assert compile_networks(model, torch.device("cpu")) == "no Python.h"
    assert not any(hasattr(m, "_compiled_call_impl") and m._compiled_call_impl for m in model.modules())
    monkeypatch.setattr(networks, "compile_probe", lambda device_type: None)
    assert compile_networks(model, torch.device("cpu")) is None  # compiles lazily: nothing runs here
    assert list(model.state_dict()) == names and model.encoder_q._compiled_call_impl is not None


def test_the_compile_probe_reports_a_failing_or_hanging_compiler():
    # The probe's subprocess, given code that fails as Triton does without Python's headers, and code that hangs.
    failing = "raise SystemExit('fatal error: Python.h: No such file or directory')"
    assert networks.compile_probe("cpu", 60, failing) == "compiling a tiny function for cpu failed: fatal error: " \
        "Python.h: No such file or directory"
    assert "took over 1s" in networks.compile_probe("cpu", 1, "import time; time.sleep(30)")
    assert networks.compile_probe("cpu", 60, "import sys; assert sys.argv[1] == 'cpu'") is None
