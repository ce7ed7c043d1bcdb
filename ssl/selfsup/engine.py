"""The pretraining loop: one epoch of steps, with schedules, mixed precision and stop requests."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_mean
from .meters import AverageMeter, ProgressMeter
from .optim import cosine_lr, cosine_momentum, set_lr, step_lr

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the step that would spread it."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_loss(method: str, output) -> torch.Tensor:
    """MoCo returns (logits, labels) like facebookresearch/moco; BYOL and SimCLR return the loss."""
    if method == "moco":
        logits, labels = output
        return F.cross_entropy(logits.float(), labels)
    return output


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension std of L2-normalised embeddings (SimSiam, Sec. 4.1).

    About 1/sqrt(dim) for well-spread embeddings; 0 when they collapse to one point.
    """
    z = F.normalize(z.float(), dim=1)
    return z.std(dim=0).mean().item()


class StopRequest:
    """Turns SIGTERM / SIGUSR1 (SLURM's pre-emption warning) into a flag checked at step
    boundaries, so the run can write a checkpoint and exit cleanly."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None


@dataclass
class StepContext:
    """What a step needs to know besides the model and the batch."""

    method: str
    epochs: int
    steps_per_epoch: int
    base_lr: float
    cos: bool
    schedule: list[int]
    warmup_epochs: float
    base_m: float | None
    m_cos: bool
    amp: str
    print_freq: int
    global_batch: int
    dist: DistInfo
    stop: StopRequest = field(default_factory=StopRequest)


def learning_rate(ctx: StepContext, epoch_float: float) -> float:
    if ctx.cos:
        return cosine_lr(ctx.base_lr, epoch_float, ctx.epochs, ctx.warmup_epochs)
    return step_lr(ctx.base_lr, epoch_float, ctx.schedule, ctx.warmup_epochs)


def ema_momentum(ctx: StepContext, epoch_float: float) -> float | None:
    if ctx.base_m is None:
        return None
    return cosine_momentum(ctx.base_m, epoch_float, ctx.epochs) if ctx.m_cos else ctx.base_m


def _agree(flags: list[float], dist_info: DistInfo) -> list[float]:
    """Sum small per-process flags over all processes, so every process takes the same branch."""
    if not dist_info.distributed:
        return flags
    t = torch.tensor(flags, dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(
    model: nn.Module,
    loader,
    to_device: Callable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    start_step: int,
    ctx: StepContext,
    after_step: Callable[[int, dict], None] | None = None,
    meter_state: dict | None = None,
) -> dict:
    """Train for the rest of epoch `epoch`, from step `start_step`.

    `after_step(steps_done, meter_state)` runs after every optimizer step (step checkpoints);
    `meter_state` from such a checkpoint makes the epoch's averages cover the steps before the
    interruption too. Returns the epoch's averages; `stopped_at` is set when a stop signal ended
    the epoch early. Raises NonFiniteLossError, on every process, before applying a
    non-finite step.
    """
    batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
    losses, lr_meter = AverageMeter("Loss", ":.4e"), AverageMeter("LR", ":.4g")
    speed, std_meter = AverageMeter("img/s", ":7.1f"), AverageMeter("std", ":.4f")
    progress = ProgressMeter(ctx.steps_per_epoch, [batch_time, data_time, losses, lr_meter, speed],
                             prefix=f"Epoch: [{epoch}]")
    meter_state = meter_state or {}
    losses.sum, losses.count = meter_state.get("loss_sum", 0.0), meter_state.get("count", 0)
    skipped_total = meter_state.get("skipped", 0)
    core = unwrap(model)
    model.train()
    stopped_at = None
    momentum = None
    end = time.perf_counter()
    for i, (views, _, skipped) in enumerate(loader):
        step = start_step + i
        data_time.update(time.perf_counter() - end)
        epoch_float = epoch + step / ctx.steps_per_epoch
        lr = learning_rate(ctx, epoch_float)
        set_lr(optimizer, lr)
        momentum = ema_momentum(ctx, epoch_float)
        if momentum is not None:
            core.m = momentum

        views = to_device(views, epoch, step)
        with autocast(ctx.dist.device, ctx.amp):
            output = model(views[0], views[1])
        loss = compute_loss(ctx.method, output)

        loss_value = loss.item()
        non_finite, stop, skipped_sum = _agree(
            [float(not math.isfinite(loss_value)), float(ctx.stop.requested), float(skipped.sum())], ctx.dist
        )
        if non_finite:
            raise NonFiniteLossError(
                f"loss is {loss_value} at epoch {epoch}, step {step} (global step "
                f"{epoch * ctx.steps_per_epoch + step}) on {int(non_finite)} process(es); stopping before "
                "this step is applied. Lower --lr, add --warmup-epochs, or use --amp bf16 instead of fp16."
            )
        skipped_total += int(skipped_sum)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        n = views[0].shape[0]
        losses.update(loss_value, n)
        lr_meter.update(lr)
        if core.last_z is not None:
            std_meter.update(embedding_std(core.last_z), n)
        batch_time.update(time.perf_counter() - end)
        speed.update(ctx.global_batch / max(batch_time.val, 1e-9))
        if after_step is not None:
            after_step(step + 1, {"loss_sum": losses.sum, "count": losses.count, "skipped": skipped_total})
        if ctx.dist.is_main and (step % ctx.print_freq == 0 or step + 1 == ctx.steps_per_epoch):
            logger.info(progress.line(step))
        if stop:
            stopped_at = step + 1
            break
        end = time.perf_counter()

    avg_loss = losses.sum / losses.count if losses.count else float("nan")
    return {
        "loss": all_reduce_mean(torch.tensor(avg_loss)).item(),
        "lr": lr_meter.val,
        "momentum": momentum,
        "embed_std": std_meter.avg if std_meter.count else None,
        "images_per_s": ctx.global_batch / batch_time.avg if batch_time.count else None,
        "data_time": data_time.avg,
        "skipped_images": skipped_total,
        "stopped_at": stopped_at,
    }
