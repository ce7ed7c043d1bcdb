"""The pretraining loop: one epoch of steps, with schedules, mixed precision and stop requests."""

from __future__ import annotations

import contextlib
import datetime
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_sum
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
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalised embeddings (SimSiam, Sec. 4.1).

    About 1/sqrt(dim) for well-spread embeddings; 0 when they collapse to one point. A 0-dim
    tensor on z's device (reading it would make the host wait for the accelerator).
    """
    z = F.normalize(z.float(), dim=1)  # N x dim
    return z.std(dim=0).mean()


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


def _step_flags(loss: torch.Tensor, stop: bool, skipped: int) -> torch.Tensor:
    """[loss not finite, stop requested, unreadable files skipped] of this process, as one float64
    tensor on the loss's device. Built by kernels (fills), not by copying from the host: a copy
    from pageable host memory would wait for the accelerator."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float64).view(1)
    return torch.cat([bad, bad.new_full((1,), float(stop)), bad.new_full((1,), float(skipped))])


def _to_host_async(x: torch.Tensor) -> Callable[[], list[float]]:
    """Start copying `x` to the host now; the returned function waits for that copy alone and
    gives its values. On a GPU the copy goes to pinned memory behind an event, so work queued
    after this call (the backward pass) does not delay it, and the host does not wait for that
    work either."""
    if x.device.type != "cuda":
        return x.tolist
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def values() -> list[float]:
        done.synchronize()
        return host.tolist()

    return values


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

    The host waits for the accelerator once per step, at one fused check: the flags of
    `_step_flags` are summed over processes in one collective, copied to the host behind an
    event, and read after the backward pass has been queued - so the host waits for the forward
    pass and that sum only, while the accelerator runs the backward pass. (Under --amp fp16 the
    GradScaler adds a second wait, to skip steps with overflowing gradients.) Loss and embedding
    spread accumulate on the device; they are read every `ctx.print_freq` steps and at the end
    of the epoch.
    """
    device = ctx.dist.device
    meter_state = meter_state or {}
    loss_sum = torch.full((), float(meter_state.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
    count = int(meter_state.get("count", 0))  # images whose loss is in loss_sum
    std_sum = torch.zeros((), dtype=torch.float64, device=device)
    std_steps = 0
    skipped_total = int(meter_state.get("skipped", 0))
    core = unwrap(model)
    model.train()
    stopped_at, momentum, lr = None, None, 0.0
    steps_done, data_time = 0, 0.0
    t_start = end = time.perf_counter()
    for i, (views, _, skipped) in enumerate(loader):
        step = start_step + i
        data_time += time.perf_counter() - end
        epoch_float = epoch + step / ctx.steps_per_epoch
        lr = learning_rate(ctx, epoch_float)
        set_lr(optimizer, lr)
        momentum = ema_momentum(ctx, epoch_float)
        if momentum is not None:
            core.m = momentum

        views = to_device(views, epoch, step)
        with autocast(device, ctx.amp):
            output = model(views[0], views[1])
        loss = compute_loss(ctx.method, output)
        flags = _to_host_async(all_reduce_sum(_step_flags(loss, ctx.stop.requested, int(skipped.sum()))))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        non_finite, stop, skipped_sum = flags()  # the step's one wait: for the forward pass and the sum
        if non_finite:
            raise NonFiniteLossError(
                f"loss is not finite at epoch {epoch}, step {step} (global step {epoch * ctx.steps_per_epoch + step}) "
                f"on {int(non_finite)} of {ctx.dist.world_size} process(es) (here: {loss.item()}); stopping before "
                "this step is applied. Lower --lr, add --warmup-epochs, or use --amp bf16 instead of fp16."
            )
        scaler.step(optimizer)
        scaler.update()

        n = views[0].shape[0]
        loss_sum += loss.detach().to(torch.float64) * n
        count += n
        skipped_total += int(skipped_sum)
        if core.last_z is not None:
            std_sum += embedding_std(core.last_z).to(torch.float64)
            std_steps += 1
        steps_done += 1
        if ctx.dist.is_main and (step % ctx.print_freq == 0 or step + 1 == ctx.steps_per_epoch):
            elapsed = time.perf_counter() - t_start
            logger.info(_progress_line(ctx, epoch, step, loss.item(), loss_sum.item() / max(count, 1), lr,
                                       steps_done, elapsed, data_time))
        if after_step is not None:  # loss_sum stays on the device: read only if a checkpoint is written
            after_step(step + 1, {"loss_sum": loss_sum, "count": count, "skipped": skipped_total})
        if stop:
            stopped_at = step + 1
            break
        end = time.perf_counter()

    elapsed = time.perf_counter() - t_start
    totals = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_full((), float(count))])).tolist()
    return {
        "loss": totals[0] / totals[1] if totals[1] else float("nan"),
        "lr": lr,
        "momentum": momentum,
        "embed_std": (std_sum / std_steps).item() if std_steps else None,
        # From totals: the images this process trained on over the wall time, for the global batch.
        "images_per_s": steps_done * ctx.global_batch / elapsed if steps_done else None,
        "data_time": data_time / steps_done if steps_done else None,
        "skipped_images": skipped_total,
        "stopped_at": stopped_at,
    }


def _progress_line(ctx: StepContext, epoch: int, step: int, loss: float, loss_avg: float, lr: float,
                   steps_done: int, elapsed: float, data_time: float) -> str:
    """`Epoch: [3][ 40/500]  loss 6.1234 (avg 6.4321)  lr 0.03  1234.5 img/s  data 2%  eta 0:05:12 (run 1:02:03)`.

    Throughput and ETA come from totals since the epoch (re)started: images over wall time,
    not a mean of per-step rates (which over-weights fast steps)."""
    width = len(str(ctx.steps_per_epoch))
    per_step = elapsed / max(steps_done, 1)
    left_epoch = ctx.steps_per_epoch - step - 1
    left_run = left_epoch + (ctx.epochs - epoch - 1) * ctx.steps_per_epoch
    eta = lambda steps: str(datetime.timedelta(seconds=round(per_step * steps)))  # noqa: E731
    return (f"Epoch: [{epoch}][{step:{width}d}/{ctx.steps_per_epoch}]  loss {loss:.4f} (avg {loss_avg:.4f})  "
            f"lr {lr:.4g}  {steps_done * ctx.global_batch / max(elapsed, 1e-9):.1f} img/s  "
            f"data {100 * data_time / max(elapsed, 1e-9):.0f}%  eta {eta(left_epoch)} (run {eta(left_run)})")
