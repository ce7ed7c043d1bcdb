"""What the methods build around a backbone (selfsup.backbones): projection/prediction MLPs,
BatchNorm over sub-batches (shuffle BN on one process), the EMA update of a momentum network,
unwrapping a model (DDP, torch.compile) and compiling its networks."""

from __future__ import annotations

import functools
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed over `num_splits` sub-batches.

    One process with a batch of N then normalises like `num_splits` devices with N/num_splits
    samples each - the single-device emulation of MoCo's shuffle BN used by MoCo's CIFAR demo
    and lightly. Sub-batch s holds the samples s, s + S, s + 2S, ... . Running statistics are the
    mean of the per-split updates; evaluation is plain BatchNorm.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm: batch of {n} does not divide into {s} splits")
        # (N/S) x (S*C) x H x W: channel s*C + c of row r is channel c of sample r*S + s.
        mean_split = self.running_mean.repeat(s)
        var_split = self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(n // s, s * c, h, w),
            mean_split,
            var_split,
            self.weight.repeat(s) if self.weight is not None else None,
            self.bias.repeat(s) if self.bias is not None else None,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(s, c).mean(0))
            self.running_var.copy_(var_split.view(s, c).mean(0))
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        out = out.view(n, c, h, w)
        # The split reshape has no channels_last view; hand the next layer the format it got.
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d of `module` by a SplitBatchNorm holding the same state."""
    if num_splits <= 1:
        return module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        new = SplitBatchNorm(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        new.load_state_dict(module.state_dict())
        new.to(module.running_mean.device if module.running_mean is not None else "cpu")
        if module.affine:  # a frozen (key/target) network stays frozen: DDP must not wait for its gradients
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_split_batchnorm(child, num_splits))
    return module


class ScaleOnlyBatchNorm1d(nn.Module):
    """BatchNorm without centring: normalise, then multiply by a learned per-feature scale, with no
    shift - the last layer of SimCLR's projection head (its batch norm has `center=False`)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, affine=False)
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.weight  # N x C


LAST_NORMS = (None, "bn", "bn_scale")


def build_mlp(
    num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_norm: str | None = None,
    last_bias: bool = True,
) -> nn.Sequential:
    """Projection/prediction MLP: (Linear without bias - BN - ReLU) x (num_layers - 1), then the
    output layer: a Linear with bias (`last_norm` None: BYOL; without it with `last_bias=False`:
    moco-v3's ResNet predictor), or a Linear without bias followed by a BatchNorm without affine
    parameters ("bn": moco-v3) or with a scale and no shift ("bn_scale": SimCLR)."""
    if last_norm not in LAST_NORMS:
        raise ValueError(f"last_norm must be one of {LAST_NORMS}, got {last_norm!r}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = input_dim if i == 0 else mlp_dim
        d_out = output_dim if i == num_layers - 1 else mlp_dim
        if i < num_layers - 1:
            layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_norm is None:
            layers.append(nn.Linear(d_in, d_out, bias=last_bias))
        else:
            norm = nn.BatchNorm1d(d_out, affine=False) if last_norm == "bn" else ScaleOnlyBatchNorm1d(d_out)
            layers += [nn.Linear(d_in, d_out, bias=False), norm]
    return nn.Sequential(*layers)


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], online: list[torch.Tensor], m: float) -> None:
    """target <- target * m + online * (1 - m), as multi-tensor ops (one kernel per group, not
    one per parameter). Rounds like MoCo's `param_k.mul_(m).add_(param_q.mul(1 - m))`."""
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, torch._foreach_mul(online, 1.0 - m))


def params_of(module: nn.Module) -> list[torch.Tensor]:
    """The parameters of `module` as a list (for the multi-tensor EMA)."""
    return list(module.parameters())


def freeze(module: nn.Module) -> None:
    """No gradients for `module`: a momentum network, updated by EMA only."""
    for p in module.parameters():
        p.requires_grad = False


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# A tiny function compiled for the device in a fresh process: it builds what every compiled network
# needs (the C++ kernels on a CPU; on a GPU, Triton's kernels and their launcher, which needs a C
# compiler and Python's headers), so a machine missing any of them is found before training.
_COMPILE_PROBE = """
import sys, torch
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
x = torch.randn(64, device=sys.argv[1])
assert torch.allclose(f(x), torch.sin(x) * 2 + 1)
"""
COMPILE_PROBE_TIMEOUT_S = 180


@functools.lru_cache(maxsize=None)
def compile_probe(device_type: str, timeout_s: float = COMPILE_PROBE_TIMEOUT_S, code: str = _COMPILE_PROBE) -> str | None:
    """Why torch.compile cannot build kernels for `device_type` on this machine, or None when it
    can: `code` (a tiny function compiled and run) in a subprocess with a time limit. Cached per
    process."""
    try:
        r = subprocess.run([sys.executable, "-c", code, device_type], capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"compiling a tiny function for {device_type} took over {timeout_s:.0f}s"
    if r.returncode != 0:
        lines = [line for line in (r.stderr or r.stdout).splitlines() if line.strip()]
        return f"compiling a tiny function for {device_type} failed: {lines[-1] if lines else f'exit {r.returncode}'}"
    return None


def compile_networks(model: nn.Module, device: torch.device) -> str | None:
    """torch.compile the networks of a method in place (`nn.Module.compile`, so parameter names
    and checkpoints do not change); the method's own logic (queue, momentum update, gathers) stays
    eager.

    Returns None when compiled, or why compilation is not possible here (the caller then trains
    uncompiled): an unsupported platform, or `compile_probe` failing. Compilation itself happens
    lazily at the first forward pass of each network.
    """
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            python = sys.version.split()[0]
            return f"torch.compile does not support this platform (Python {python}, torch {torch.__version__})"
    except Exception as e:  # an unsupported platform shows up as many kinds of errors
        return f"{type(e).__name__}: {e}"
    reason = compile_probe(device.type)
    if reason:
        return reason
    for name in getattr(model, "networks", ("encoder_q",)):  # Method.networks
        getattr(model, name).compile()
    return None


def compile_or_warn(model: nn.Module, device: torch.device) -> bool:
    """`compile_networks` for --compile, saying in the log what happened: compiled, or trained
    uncompiled and why. Returns whether it compiled."""
    import logging

    reason = compile_networks(model, device)
    log = logging.getLogger(__name__)
    if reason:
        log.warning("--compile skipped, training uncompiled: %s", reason)
    else:
        log.info("--compile: networks compiled with torch.compile (the first steps include compilation)")
    return reason is None
