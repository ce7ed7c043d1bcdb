"""MoCo, BYOL and SimCLR around any torchvision-style ResNet, behind one builder.

All three keep the network being trained under the name `encoder_q` (backbone + projection head),
so a checkpoint's `module.encoder_q.*` keys feed linear evaluation and detection transfer the
same way whatever the method.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .distributed import batch_shuffle, batch_unshuffle, concat_all_gather, get_world_size
from .losses import at_least_fp32, byol_loss, full_precision, nt_xent

METHODS = ("moco", "byol", "simclr")

# torchvision constructors whose models have the ResNet layout (conv1/bn1/layer1-4/fc).
ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


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


def build_mlp(
    num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = False
) -> nn.Sequential:
    """Projection/prediction MLP: (Linear-BN-ReLU) x (num_layers - 1), then Linear.

    With `last_bn` the output gets a BatchNorm without affine parameters (moco-v3, SimCLR v2).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = input_dim if i == 0 else mlp_dim
        d_out = output_dim if i == num_layers - 1 else mlp_dim
        if i < num_layers - 1:
            layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out, affine=False)]
        else:
            layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], online: list[torch.Tensor], m: float) -> None:
    """target <- target * m + online * (1 - m), as multi-tensor ops (one kernel per group, not
    one per parameter). Rounds like MoCo's `param_k.mul_(m).add_(param_q.mul(1 - m))`."""
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, torch._foreach_mul(online, 1.0 - m))


def _params(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters())


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False


def _feature_dim(encoder: nn.Module) -> int:
    if not hasattr(encoder, "fc") or not isinstance(encoder.fc, nn.Linear):
        raise TypeError(
            "base_encoder must build a torchvision-style ResNet whose last layer is `fc` "
            f"(an nn.Linear); got {type(encoder).__name__} with fc={getattr(encoder, 'fc', None)!r}"
        )
    return encoder.fc.weight.shape[1]


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------


def _forget_host_queue_ptr(module: nn.Module, incompatible_keys) -> None:
    """After a load, MoCo re-reads its queue pointer from the buffer (a function, not a lambda,
    so the model still pickles)."""
    module._ptr = None


class MoCo(nn.Module):
    """Momentum Contrast: a query encoder, a momentum key encoder and a queue of negative keys.

    MoCo v1: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
    CVPR 2020 (arXiv:1911.05722). MoCo v2 (mlp=True plus stronger augmentation and a cosine
    schedule): Chen et al., arXiv:2003.04297.

    The constructor signature, attribute names and forward contract are those of
    facebookresearch/moco. Beyond it: any queue size K works (the queue wraps around), shuffle BN
    works on one process (`bn_splits`), and nothing requires CUDA or a process group.

    Args:
        base_encoder: constructor taking `num_classes`, e.g. torchvision.models.resnet50.
        dim: feature dimension. K: queue size. m: key-encoder momentum. T: softmax temperature.
        mlp: MoCo v2's 2-layer projection head.
        shuffle_bn: shuffle the key batch across processes before the key encoder (MoCo's
            shuffle BN). On a single process it only matters together with `bn_splits`.
        bn_splits: > 1 emulates that many devices on each process: both encoders normalise over
            `bn_splits` sub-batches and the keys are shuffled before being split.
        global_batch_size: if given, K is checked against it here rather than at the first step.
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        *,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if global_batch_size is not None and K < global_batch_size:
            raise ValueError(
                f"MoCo queue size K={K} is smaller than the global batch size {global_batch_size}: "
                "one step's keys would not fit in the queue. Use K >= the global batch size "
                f"(e.g. --moco-k {max(global_batch_size, 4096)}) or a smaller batch."
            )
        self.K = K
        self.m = m
        self.T = T
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits

        # Construction order as facebookresearch/moco, so a seed gives the same initial weights.
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            dim_mlp = _feature_dim(self.encoder_q)
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False  # updated by momentum, never by gradients

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # dim x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # A host copy of queue_ptr: reading the buffer on a GPU every step would make the host
        # wait for the accelerator. Re-read once after construction and after every load.
        self._ptr: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_queue_ptr)

        convert_split_batchnorm(self.encoder_q, bn_splits)
        convert_split_batchnorm(self.encoder_k, bn_splits)
        self.last_z: torch.Tensor | None = None  # detached queries of the last step, for monitoring

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        ema_update_(_params(self.encoder_k), _params(self.encoder_q), self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys)  # (W*N) x dim, in rank order
        batch = keys.shape[0]
        if batch > self.K:
            raise ValueError(
                f"MoCo queue size K={self.K} is smaller than the global batch size {batch}; "
                "use K >= the global batch size."
            )
        ptr = int(self.queue_ptr) if self._ptr is None else self._ptr
        end = ptr + batch
        keys = keys.to(self.queue.dtype)
        if end <= self.K:
            self.queue[:, ptr:end] = keys.T
        else:  # wrap around: fill the tail, then the head
            first = self.K - ptr
            self.queue[:, ptr:] = keys[:first].T
            self.queue[:, : batch - first] = keys[first:].T
        self.queue_ptr.fill_(end % self.K)
        self._ptr = end % self.K

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        shuffle_across = self.shuffle_bn and get_world_size() > 1
        if shuffle_across:
            im_k, idx_unshuffle = batch_shuffle(im_k)
        if self.bn_splits > 1 and self.shuffle_bn:
            # Within the process: a fresh permutation so that each key sub-batch holds other
            # samples than the matching query sub-batch.
            perm = torch.randperm(im_k.shape[0], device=im_k.device)
            k = self.encoder_k(im_k[perm])
            k = k[torch.argsort(perm)]
        else:
            k = self.encoder_k(im_k)
        with full_precision(k):
            k = F.normalize(at_least_fp32(k), dim=1)  # N x dim, float32 also under --amp
        if shuffle_across:
            k = batch_unshuffle(k, idx_unshuffle)
        return k

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """im_q, im_k: N x 3 x H x W. Returns logits N x (1+K) (positive in column 0, divided by T)
        and labels N (all zero). The logits are float32 also under --amp (see full_precision)."""
        q = self.encoder_q(im_q)  # N x dim
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._keys(im_k)  # N x dim
        with full_precision(q):
            q = F.normalize(at_least_fp32(q), dim=1)
            self.last_z = q.detach()
            l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # N x 1
            l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # N x K
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # N x (1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


class BYOL(nn.Module):
    """Bootstrap Your Own Latent: an online network with a predictor regresses the projections
    of a target network that is an exponential moving average of the online one.

    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020 (arXiv:2006.07733).

    `encoder_q` is the online backbone + projector, `predictor` the online predictor and
    `encoder_k` the target (backbone + projector), which never receives gradients.
    `forward(x1, x2)` returns the symmetric loss: mean(2 - 2cos) over each view order, summed.
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 256,
        hidden_dim: int = 4096,
        m: float = 0.996,
        *,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        self.m = m
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_q.fc = build_mlp(2, _feature_dim(self.encoder_q), hidden_dim, dim)
        self.predictor = build_mlp(2, dim, hidden_dim, dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        _freeze(self.encoder_k)
        convert_split_batchnorm(self.encoder_q, bn_splits)
        convert_split_batchnorm(self.encoder_k, bn_splits)
        self.last_z: torch.Tensor | None = None

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        ema_update_(_params(self.encoder_k), _params(self.encoder_q), self.m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z1 = self.encoder_q(x1)  # N x dim
        z2 = self.encoder_q(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        self.last_z = F.normalize(z1.detach(), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            t1, t2 = self.encoder_k(x1), self.encoder_k(x2)
        return byol_loss(p1, t2).mean() + byol_loss(p2, t1).mean()


class SimCLR(nn.Module):
    """A Simple Framework for Contrastive Learning: one encoder with a projection MLP and the
    NT-Xent loss over the global batch (negatives come from every process).

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020 (arXiv:2002.05709).
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        hidden_dim: int = 2048,
        T: float = 0.1,
        *,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        self.T = T
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_q.fc = build_mlp(2, _feature_dim(self.encoder_q), hidden_dim, dim)
        convert_split_batchnorm(self.encoder_q, bn_splits)
        self.last_z: torch.Tensor | None = None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        n = x1.shape[0]
        # Both views in one batch, as SimCLR's own code: BatchNorm sees all 2N samples.
        z = self.encoder_q(torch.cat([x1, x2], dim=0))  # 2N x dim
        z1, z2 = z[:n], z[n:]
        self.last_z = F.normalize(z1.detach(), dim=1)
        return nt_xent(z1, z2, self.T, distributed=True)


# ----------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------


def _resnet(arch: str, small_stem: bool, num_classes: int, **kwargs) -> nn.Module:
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)
    if small_stem:
        # 32-pixel data (CIFAR recipe of SimCLR/MoCo demos): 3x3 stride-1 conv, no max-pool.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def backbone_constructor(arch: str, small_stem: bool = False) -> Callable[..., nn.Module]:
    """A torchvision-style constructor `f(num_classes) -> ResNet` for `arch`, optionally with the
    small-image stem."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; valid: {', '.join(ARCHS)}")
    return partial(_resnet, arch, small_stem)


_METHOD_OPTIONS = {
    "moco": {"dim", "K", "m", "T", "mlp", "shuffle_bn", "bn_splits", "global_batch_size"},
    "byol": {"dim", "hidden_dim", "m", "bn_splits"},
    "simclr": {"dim", "hidden_dim", "T", "bn_splits"},
}
_METHOD_CLASSES = {"moco": MoCo, "byol": BYOL, "simclr": SimCLR}


def build_model(
    method: str, arch: str, small_stem: bool = False, sync_bn: bool = False, **options
) -> nn.Module:
    """Build MoCo, BYOL or SimCLR around a torchvision ResNet.

    Args:
        method: 'moco', 'byol' or 'simclr'.
        arch: a torchvision ResNet name (see ARCHS).
        small_stem: 3x3 stride-1 first conv and no max-pool, for 28-64 pixel images.
        sync_bn: convert every BatchNorm to SyncBatchNorm (needs a process group; CUDA only).
        **options: the method's constructor arguments (e.g. dim, K, m, T, mlp, hidden_dim,
            bn_splits); `None` values are ignored so callers can pass optional flags through.
    """
    if method not in _METHOD_CLASSES:
        raise ValueError(f"unknown method '{method}'; valid: {', '.join(METHODS)}")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - _METHOD_OPTIONS[method]
    if unknown:
        raise ValueError(
            f"method '{method}' does not take option(s) {sorted(unknown)}; "
            f"it takes {sorted(_METHOD_OPTIONS[method])}"
        )
    model = _METHOD_CLASSES[method](backbone_constructor(arch, small_stem), **options)
    if sync_bn:
        if options.get("bn_splits", 1) > 1:
            raise ValueError("sync_bn and bn_splits > 1 are alternatives; choose one")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def compile_networks(model: nn.Module, device: torch.device) -> str | None:
    """torch.compile the networks of a MoCo/BYOL/SimCLR model in place (`nn.Module.compile`,
    so parameter names and checkpoints do not change); the method's own logic (queue, momentum
    update, gathers) stays eager.

    Returns None when compiled, or why compilation is not possible here (the caller then trains
    uncompiled). Compilation itself happens lazily at the first forward pass of each network.
    """
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            python = sys.version.split()[0]
            return f"torch.compile does not support this platform (Python {python}, torch {torch.__version__})"
        if device.type == "cpu":
            from torch._inductor import cpp_builder

            cpp_builder.get_cpp_compiler()  # raises without a C++ compiler
        elif not (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")):
            return "no C compiler found, which Triton needs to build its kernels' launchers (set CC)"
    except Exception as e:  # an unsupported platform shows up as many kinds of errors
        return f"{type(e).__name__}: {e}"
    for name in ("encoder_q", "encoder_k", "predictor"):
        network = getattr(model, name, None)
        if isinstance(network, nn.Module):
            network.compile()
    return None
