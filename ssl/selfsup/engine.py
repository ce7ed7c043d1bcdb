"""Pretraining: the epoch loop (`fit`) and its steps (`train_one_epoch`).

`fit` runs the epochs: each one's steps, BatchNorm statistics made one model, the checkpoints
(every epoch, every --save-every-steps steps, and at a stop signal), the online kNN, the collapse
signal, and the epoch's report (log line, metrics.jsonl, TensorBoard). `train_one_epoch` runs the
steps: schedules, mixed precision, the method's loss through the DDP wrapper, one fused check
for non-finite losses, stop requests and skipped files, and the progress line.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .accumulation import Accumulation
from .backbones import check_record, record
from .checkpoint import CheckpointError
from .errors import UsageError
from .distributed import DistInfo, all_reduce_sum, broadcast_buffers_
from .meters import MetricsWriter
from .monitor import KNNMonitor, check_collapse, embedding_std
from .networks import unwrap
from .optim import cosine_lr, learning_rate, set_lr
from .resume import (Checkpointer, check_same_run, is_data_id, legacy_run_definition, read_checkpoint,
                     restore_run_state, run_definition, run_state)
from .rng import MicroStreams, preserved
from .stopping import NonFiniteLossError, StopRequest, exit_status, signal_name

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class StepContext:
    """What a step needs to know besides the model and the batch."""

    epochs: int
    steps_per_epoch: int
    base_lr: float
    cos: bool
    schedule: list[int]
    warmup_epochs: float
    amp: str
    print_freq: int
    global_batch: int
    dist: DistInfo
    stop: StopRequest = field(default_factory=StopRequest)
    # --accum-iter: each step's micro-batches (selfsup.accumulation); K = 1 without it.
    acc: Accumulation = field(default_factory=Accumulation)
    # The cosine's floor (--min-lr, DINO's), and the weight decay along a cosine to `wd_end`
    # (--weight-decay-end, DINO's) for the parameter groups that decay; None: constant.
    min_lr: float = 0.0
    wd: float = 0.0
    wd_end: float | None = None
    # Called on rank 0 at every printed step with that step's figures and the global step
    # (MetricsWriter.scalars: TensorBoard curves finer than one point per epoch).
    scalars: Callable[[dict, int], None] | None = None


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


class EpochMeters:
    """What an epoch accumulates, on the device: read only at print steps, step checkpoints and the
    epoch's end (reading every step would make the host wait for the accelerator). `state` (from a
    step checkpoint) makes the averages cover the steps before an interruption too."""

    def __init__(self, device: torch.device, state: dict | None = None, pretext: dict[str, str] | None = None) -> None:
        state = state or {}
        self.loss_sum = torch.full((), float(state.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
        self.count = int(state.get("count", 0))  # images whose loss is in loss_sum
        self.skipped = int(state.get("skipped", 0))
        self.std_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.std_steps = 0
        # The method's pretext metrics (Method.pretext: name -> label), weighted by images as the loss.
        self.pretext = dict(pretext or {})
        self.pretext_sum = {name: torch.full((), float(state.get(name + "_sum", 0.0)), dtype=torch.float64,
                                             device=device) for name in self.pretext}

    def add(self, loss: torch.Tensor, n: int, skipped: int, last_z: torch.Tensor | None,
            pretext: dict[str, torch.Tensor] | None = None) -> None:
        self.loss_sum += loss.detach().to(torch.float64) * n
        self.count += n
        self.skipped += skipped
        for name, value in (pretext or {}).items():
            if name in self.pretext_sum:
                self.pretext_sum[name] += value.to(torch.float64) * n
        if last_z is not None:  # the collapse signal (selfsup.monitor)
            self.std_sum += embedding_std(last_z).to(torch.float64)
            self.std_steps += 1

    def state(self) -> dict:
        """For a step checkpoint; the sums stay on the device until a checkpoint is written."""
        return {"loss_sum": self.loss_sum, "count": self.count, "skipped": self.skipped,
                **{name + "_sum": value for name, value in self.pretext_sum.items()}}


def _set_schedules(core: nn.Module, optimizer: torch.optim.Optimizer, ctx: StepContext, epoch: int,
                   step: int) -> tuple[float, float | None]:
    """The learning rate and the method's momentum at this step (fractional epoch); returns both."""
    epoch_float = epoch + step / ctx.steps_per_epoch
    lr = learning_rate(ctx.base_lr, epoch_float, ctx.epochs, ctx.cos, ctx.schedule, ctx.warmup_epochs, ctx.min_lr)
    set_lr(optimizer, lr)
    if ctx.wd_end is not None:  # DINO's utils.cosine_scheduler(wd, wd_end), on the groups that decay
        wd = cosine_lr(ctx.wd, epoch_float, ctx.epochs, 0.0, ctx.wd_end)
        for group in optimizer.param_groups:
            if group.setdefault("decays", group["weight_decay"] > 0):  # decay_groups sets it; else by the value
                group["weight_decay"] = wd
    core.set_epoch(epoch_float)
    return lr, core.momentum_at(epoch_float / ctx.epochs)  # the method's schedule (None: no EMA)


def _optimizer_step(model: nn.Module, micro: list[list[torch.Tensor]], optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, ctx: StepContext, skipped: int, epoch: int,
                    step: int) -> tuple[torch.Tensor, float, float]:
    """One optimizer step over this process's micro-batches (`micro`: K lists of views): the
    method's `prepare` for all of them, each one's objective through DDP's wrapper and its
    backward pass (scaled by 1/K; DDP all-reduces with the last), the method's `finish`, the
    optimizer step. Returns (the micro-batches' mean loss, unreadable files skipped over all
    processes, stop requested). The one wait of the step is for the fused flags of `_step_flags`,
    read after the last backward pass has been queued. Raises NonFiniteLossError, on every
    process, before a non-finite step is applied."""
    core, acc, k = unwrap(model), ctx.acc, len(micro)
    if k != acc.k:  # the data path and the step must agree on who each micro-batch stands for
        raise RuntimeError(f"a batch of {k} micro-batches for a step of {acc.k} (--accum-iter)")
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast(ctx.dist.device, ctx.amp):
        plan = core.prepare(micro, acc)
    losses, pretext = [], []
    for j, views in enumerate(micro):
        last = j == k - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, acc.micro(j, core):
            with autocast(ctx.dist.device, ctx.amp):
                objective, loss = model(*views, plan=plan, micro=j)  # through DDP, which must see this call
            losses.append(loss)
            pretext.append(core.last_pretext)
            if last:
                mean = losses[0] if k == 1 else torch.stack(losses).mean()
                flags = _to_host_async(all_reduce_sum(_step_flags(mean, ctx.stop.requested, skipped)))
            scaler.scale(objective if k == 1 else objective / k).backward()
    core.finish(plan)
    core.last_pretext = {name: sum(p[name] for p in pretext) / k for name in pretext[0]}  # the step's
    non_finite, stop, skipped_sum = flags()  # the step's one wait: for the forward passes and the sum
    if non_finite:
        raise NonFiniteLossError(
            f"loss is not finite at epoch {epoch}, step {step} (global step {epoch * ctx.steps_per_epoch + step}) "
            f"on {int(non_finite)} of {ctx.dist.world_size} process(es) (here: {mean.item()}); stopping before "
            "this step is applied. Lower --lr, add --warmup-epochs, or use --amp bf16 instead of fp16."
        )
    core.before_optimizer_step(optimizer, scaler)
    scaler.step(optimizer)
    scaler.update()
    core.after_optimizer_step()
    return mean, skipped_sum, stop


def _report_step(ctx: StepContext, epoch: int, step: int, loss: torch.Tensor, pretext: dict[str, torch.Tensor],
                 meters: EpochMeters, lr: float, momentum: float | None, steps_done: int, elapsed: float,
                 data_time: float) -> None:
    """The progress line (rank 0) and the per-step scalars, every ctx.print_freq steps and at the
    epoch's last step: the only steps that read the meters."""
    if not ctx.dist.is_main or not (step % ctx.print_freq == 0 or step + 1 == ctx.steps_per_epoch):
        return
    names = [name for name in meters.pretext if name in pretext]
    values = torch.stack([loss.detach().to(torch.float64), meters.loss_sum]
                         + [pretext[n].to(torch.float64) for n in names] + [meters.pretext_sum[n] for n in names])
    value, loss_sum, *rest = values.tolist()  # one read from the device
    count = max(meters.count, 1)
    shown = {meters.pretext[n]: (rest[i], rest[len(names) + i] / count) for i, n in enumerate(names)}
    logger.info(progress_line(ctx, epoch, step, value, loss_sum / count, lr, steps_done, elapsed, data_time, shown))
    if ctx.scalars is not None:
        ctx.scalars({"loss": value, "lr": lr, "momentum": momentum,
                     "images_per_s": steps_done * ctx.global_batch / max(elapsed, 1e-9),
                     **{n: rest[i] for i, n in enumerate(names)}},
                    epoch * ctx.steps_per_epoch + step + 1)


def train_one_epoch(
    model: nn.Module,
    loader,
    make_views: Callable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    start_step: int,
    ctx: StepContext,
    after_step: Callable[[int, dict], None] | None = None,
    meter_state: dict | None = None,
) -> dict:
    """Train for the rest of epoch `epoch`, from step `start_step`.

    `make_views(batch, epoch, step)` turns the loader's batch into its micro-batches' views on the
    device (selfsup.data.pipeline). `after_step(steps_done, meter_state)` runs after every optimizer step
    (step checkpoints); `meter_state` from such a checkpoint makes the epoch's averages cover the
    steps before the interruption too. Returns the epoch's averages; `stopped_at` is set when a
    stop signal ended the epoch early. Raises NonFiniteLossError, on every process, before
    applying a non-finite step.

    The host waits for the accelerator once per step, at one fused check: the flags of
    `_step_flags` are summed over processes in one collective, copied to the host behind an
    event, and read after the backward pass has been queued - so the host waits for the forward
    pass and that sum only, while the accelerator runs the backward pass. (Under --amp fp16 the
    GradScaler adds a second wait, to skip steps with overflowing gradients.) Loss and embedding
    spread accumulate on the device (EpochMeters); they are read every `ctx.print_freq` steps
    and at the end of the epoch.
    """
    core = unwrap(model)
    meters = EpochMeters(ctx.dist.device, meter_state, core.pretext)
    model.train()
    stopped_at, momentum, lr = None, None, 0.0
    steps_done, data_time = 0, 0.0
    t_start = end = time.perf_counter()
    for i, (views, _, skipped) in enumerate(loader):
        step = start_step + i
        data_time += time.perf_counter() - end
        lr, momentum = _set_schedules(core, optimizer, ctx, epoch, step)
        micro = make_views(views, epoch, step)
        loss, skipped_sum, stop = _optimizer_step(model, micro, optimizer, scaler, ctx, int(skipped.sum()), epoch,
                                                  step)
        meters.add(loss, sum(views[0].shape[0] for views in micro), int(skipped_sum), core.last_z, core.last_pretext)
        steps_done += 1
        _report_step(ctx, epoch, step, loss, core.last_pretext, meters, lr, momentum, steps_done,
                     time.perf_counter() - t_start, data_time)
        if after_step is not None:
            after_step(step + 1, meters.state())
        if stop:
            stopped_at = step + 1
            break
        end = time.perf_counter()
    return _epoch_stats(meters, ctx, lr, momentum, steps_done, time.perf_counter() - t_start, data_time, stopped_at)


def _epoch_stats(meters: EpochMeters, ctx: StepContext, lr: float, momentum: float | None, steps_done: int,
                 elapsed: float, data_time: float, stopped_at: int | None) -> dict:
    """The epoch's averages over every process (from totals: images weigh the same)."""
    names = list(meters.pretext_sum)
    totals = all_reduce_sum(torch.stack([meters.loss_sum, meters.loss_sum.new_full((), float(meters.count))]
                                        + [meters.pretext_sum[n] for n in names])).tolist()
    return {
        "loss": totals[0] / totals[1] if totals[1] else float("nan"),
        **{n: totals[2 + i] / totals[1] if totals[1] else None for i, n in enumerate(names)},
        "lr": lr,
        "momentum": momentum,
        "embed_std": (meters.std_sum / meters.std_steps).item() if meters.std_steps else None,
        # From totals: the images this process trained on over the wall time, for the global batch.
        "images_per_s": steps_done * ctx.global_batch / elapsed if steps_done else None,
        "data_time": data_time / steps_done if steps_done else None,
        "skipped_images": meters.skipped,
        "stopped_at": stopped_at,
        "meter_state": {k: float(v) for k, v in meters.state().items()},
    }


def progress_line(ctx: StepContext, epoch: int, step: int, loss: float, loss_avg: float, lr: float,
                  steps_done: int, elapsed: float, data_time: float,
                  pretext: dict[str, tuple[float, float]] | None = None) -> str:
    """`Epoch: [3][ 40/500]  loss 6.1234 (avg 6.4321)  Acc@1 41.41 (avg 35.20)  Acc@5 ...  lr 0.03
    1234.5 img/s  data 2%  eta 0:05:12 (run 1:02:03)` after `steps_done` steps (this session) of
    step `step` in `elapsed` seconds, `data_time` of them waiting for the loader; `pretext`: label
    -> (this step's value, the epoch's average) of the method's pretext metrics.

    Throughput and ETA come from totals since the epoch (re)started: images over wall time,
    not a mean of per-step rates (which over-weights fast steps)."""
    width = len(str(ctx.steps_per_epoch))
    per_step = elapsed / max(steps_done, 1)
    left_epoch = ctx.steps_per_epoch - step - 1
    left_run = left_epoch + (ctx.epochs - epoch - 1) * ctx.steps_per_epoch
    eta = lambda steps: str(datetime.timedelta(seconds=round(per_step * steps)))  # noqa: E731
    digits = lambda label: 2 if label.startswith("Acc") else 3  # noqa: E731  (percentages; a cosine)
    shown = "".join(f"{label} {value:.{digits(label)}f} (avg {avg:.{digits(label)}f})  "
                    for label, (value, avg) in (pretext or {}).items())
    return (f"Epoch: [{epoch}][{step:{width}d}/{ctx.steps_per_epoch}]  loss {loss:.4f} (avg {loss_avg:.4f})  {shown}"
            f"lr {lr:.4g}  {steps_done * ctx.global_batch / max(elapsed, 1e-9):.1f} img/s  "
            f"data {100 * data_time / max(elapsed, 1e-9):.0f}%  eta {eta(left_epoch)} (run {eta(left_run)})")


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, pipeline,
        ctx: StepContext, checkpointer: Checkpointer, metrics: MetricsWriter, *, start_epoch: int = 0,
        start_step: int = 0, meter_state: dict | None = None, monitor: KNNMonitor | None = None,
        knn_every: int = 0, save_freq: int = 10, save_every_steps: int = 0, save_every_epochs: int = 1) -> int:
    """Train epochs start_epoch .. ctx.epochs - 1 (the first from `start_step`) and report them.

    `model` is the method, DDP-wrapped when distributed; `pipeline` a selfsup.data.pipeline.Pipeline;
    `checkpointer.save(*copies, epoch=, step=, meters=)` writes a checkpoint holding where to
    continue; `meter_state` (from a step checkpoint) makes the first epoch's averages cover the
    steps before the interruption. `monitor` measures the online kNN of the network before the
    first step of a run (its random start, which every later one is reported against) and every
    `knn_every` epochs and after the last. The checkpoint is written every `save_every_epochs`
    epochs and after the last (a stop always writes one); a copy is kept every `save_freq`.

    Returns the exit status: 0 when every epoch is done; 128 + the signal's number when a signal
    stopped the run before (130 for Ctrl-C, 143 for SIGTERM, as a shell reports them; a checkpoint
    written); 1 on a non-finite loss or a checkpoint that could not be written.
    """
    if start_epoch >= ctx.epochs:
        logger.info("%s already holds a finished run of %d epochs; nothing to do (raise --epochs to train more - its "
                    "schedules are then recomputed over the new length, see the warning it prints - or use another "
                    "--output-dir).", checkpointer.folder, ctx.epochs)
        return 0
    core = unwrap(model)
    steps = ctx.steps_per_epoch
    knn_start = _knn_before_training(core, monitor, metrics, start_epoch == 0 and start_step == 0)
    knn_end = None
    ctx.stop.install()
    try:
        for epoch in range(start_epoch, ctx.epochs):
            first = start_step if epoch == start_epoch else 0
            pipeline.sampler.set_epoch(epoch, first)
            t0 = time.time()

            def after_step(steps_done: int, meters: dict, epoch: int = epoch) -> None:
                global_step = epoch * steps + steps_done
                if save_every_steps and global_step % save_every_steps == 0 and steps_done < steps:
                    checkpointer.save(epoch=epoch, step=steps_done, meters=meters)  # epoch ends: below

            stats = train_one_epoch(model, pipeline.loader, pipeline.views, optimizer, scaler, epoch, first, ctx,
                                    after_step, meter_state if epoch == start_epoch else None)
            # One model on every process before it is saved and evaluated: the BatchNorm running
            # statistics of each process followed its own batches (see broadcast_buffers_).
            broadcast_buffers_(core)
            if stats["stopped_at"] is not None and stats["stopped_at"] < steps:
                checkpointer.save(epoch=epoch, step=stats["stopped_at"], meters=stats["meter_state"])
                ctx.stop.checkpoint_written()  # on disk: a launcher requeues now, not after the teardown
                logger.info("%s: checkpoint written at epoch %d step %d; rerun the same command to resume (exit "
                            "status %d)", signal_name(ctx.stop.signum), epoch, stats["stopped_at"],
                            exit_status(ctx.stop.signum))
                return exit_status(ctx.stop.signum)
            periodic = (epoch + 1) % save_freq == 0 or epoch + 1 == ctx.epochs
            if periodic or stats["stopped_at"] is not None or (epoch + 1) % save_every_epochs == 0:
                checkpointer.save(*([f"checkpoint_{epoch:04d}.pth.tar"] if periodic else []), epoch=epoch + 1, step=0,
                                  meters=None)
            record = {"epoch": epoch, **{k: v for k, v in stats.items() if k not in ("stopped_at", "meter_state")},
                      "epoch_time_s": time.time() - t0}
            # A stop request (agreed by every process) skips the evaluation: a preempted job's grace
            # period is for leaving, not for a kNN pass.
            if (monitor is not None and stats["stopped_at"] is None
                    and ((epoch + 1) % knn_every == 0 or epoch + 1 == ctx.epochs)):
                t1 = time.time()
                with preserved():  # after the checkpoint: the evaluation must not move the random streams
                    record.update(monitor(getattr(core, core.evaluated)), knn_time_s=time.time() - t1)
                knn_end = record["knn_top1"]
            embed_dim = core.last_z.shape[1] if core.last_z is not None else 1
            record["collapse_warning"] = check_collapse(stats["embed_std"], embed_dim, epoch)
            metrics.write(record, step=epoch, prefix="pretrain/")
            logger.info(_epoch_line(record, embed_dim, core.pretext, knn_start))
            if stats["stopped_at"] is not None and epoch + 1 < ctx.epochs:
                ctx.stop.checkpoint_written()
                logger.info("%s at the end of epoch %d: checkpoint written; rerun the same command to resume (exit "
                            "status %d)", signal_name(ctx.stop.signum), epoch, exit_status(ctx.stop.signum))
                return exit_status(ctx.stop.signum)
    except NonFiniteLossError as e:
        latest = checkpointer.latest
        logging.getLogger().error("error: %s Last good checkpoint: %s", e, latest if latest.exists() else "none yet")
        return 1
    except CheckpointError as e:
        logging.getLogger().error("error: %s Training stopped; rerun the same command once the problem is fixed "
                                  "to resume from the last checkpoint.", e)
        return 1
    finally:
        ctx.stop.uninstall()
    logger.info("Done: %d epochs. %sLatest checkpoint: %s", ctx.epochs, _learned(knn_start, knn_end),
                checkpointer.latest)
    return 0


def _knn_before_training(core: nn.Module, monitor: KNNMonitor | None, metrics: MetricsWriter, start: bool) -> float | None:
    """The online kNN of the network as it starts (a random network's, the baseline every later kNN is
    reported against), measured at a run's first step and recorded in metrics.jsonl (`before_training`);
    a resumed run reads it back from there. None without a monitor."""
    if monitor is None:
        return None
    if not start:
        return metrics.first("knn_top1", before_training=True)
    t0 = time.time()
    with preserved():  # the first step's random streams as without the evaluation
        record = monitor(getattr(core, core.evaluated))
    metrics.write({"before_training": True, **record, "knn_time_s": time.time() - t0})
    logger.info("Before training: kNN top-1 %.2f (the network's random start; every epoch below is reported "
                "against it)", record["knn_top1"])
    return record["knn_top1"]


def _learned(knn_start: float | None, knn_end: float | None) -> str:
    """The closing line's verdict: what the run learned against its random start."""
    if knn_start is None or knn_end is None:
        return ""
    gain = knn_end - knn_start
    verdict = ("features that separate the classes better than the random start" if gain > 0 else
               "no better than the random start yet: a random network is a strong kNN baseline on small images, and "
               "a few epochs are few (README, Quick start)")
    return f"Online kNN top-1 {knn_end:.2f}, {gain:+.2f} against {knn_start:.2f} before training: {verdict}. "


# ----------------------------------------------------------------------------------------------
# Pretraining checkpoints
# ----------------------------------------------------------------------------------------------


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, args,
                     dist: DistInfo, *, rng: list, epoch: int, step: int, steps_per_epoch: int,
                     meters: dict | None) -> dict:
    """Everything an exact continuation of a pretraining run needs, in plain types: the position
    (`epoch` to continue with, `step`s of it done), the model, what defines the run, and the common
    part (selfsup.resume.run_state). Keys of `state_dict` are those of the DDP-wrapped model
    (`module.encoder_q.*`, `module.queue`, ...) whatever the world size, as facebookresearch/moco's
    tools expect."""
    core = unwrap(model)
    return {"epoch": epoch, "step": step, "global_step": epoch * steps_per_epoch + step, "arch": args.arch,
            "backbone_variant": record(core.encoder_q), "method": args.method, "evaluated": core.evaluated,
            "state_dict": {f"module.{k}": v for k, v in core.state_dict().items()},
            "run": run_definition(vars(args)), **run_state(optimizer, args, dist, rng, scaler),
            "meters": {k: float(v) for k, v in (meters or {}).items()}}  # loss_sum may be on the device


def resume(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, args, dist: DistInfo,
           steps_per_epoch: int, streams: MicroStreams | None = None) -> dict:
    """Restore model (queue and target network included), optimizer, scaler, position and random
    streams (`streams`: the micro-batches', --accum-iter) from --resume or OUTPUT_DIR/checkpoint.pth.tar, after checking that the checkpoint
    belongs to this run (selfsup.resume.check_same_run). Returns where to continue:
    {"epoch", "step", "meters"}. Raises UsageError / CheckpointError on a checkpoint that cannot."""
    path = Path(args.resume) if args.resume else Path(args.output_dir) / "checkpoint.pth.tar"
    ckpt = read_checkpoint(path, bool(args.resume), dist)
    if ckpt is None:
        return {"epoch": args.start_epoch or 0, "step": 0, "meters": None}
    current = vars(args)
    saved = ckpt.get("run")
    if saved is None:  # a checkpoint that records no run definition: rebuilt from its args
        old = ckpt.get("args") or {}
        saved = run_definition({**old, "method": ckpt.get("method", old.get("method", "moco")),
                                "arch": ckpt.get("arch", old.get("arch"))})
    if not is_data_id(saved.get("data")):  # recorded where the data lay, not what it is: compare paths
        current = {**current, "data_id": None}
    saved = legacy_run_definition(saved, ckpt)
    check_same_run(saved, run_definition(current), path, args.accept_changes, explicit=bool(args.resume))
    check_record(unwrap(model).encoder_q, ckpt.get("backbone_variant"), f"checkpoint '{path}'")
    try:
        unwrap(model).load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})
    except RuntimeError as e:
        raise UsageError(f"checkpoint '{path}' does not fit this model (other --moco-dim/--moco-k/--mlp/--mlp-dim? "
                         "or a SimCLR run whose head lacks the scale-only BatchNorm of SimCLR's code, which cannot "
                         f"continue: start a new run): {str(e).splitlines()[0]} ...") from e
    restore_run_state(ckpt, dist, optimizer, scaler, streams)
    start = {"epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0), "meters": ckpt.get("meters")}
    if start["step"] >= steps_per_epoch:  # a step checkpoint at an epoch's end
        start = {"epoch": start["epoch"] + 1, "step": 0, "meters": None}
    logger.info("resumed from %s: epoch %d, step %d (global step %d)", path, start["epoch"], start["step"],
                ckpt.get("global_step", start["epoch"] * steps_per_epoch + start["step"]))
    _warn_if_extended(args, (ckpt.get("args") or {}).get("epochs"), start["epoch"] + start["step"] / steps_per_epoch)
    return start


def _warn_if_extended(args, planned: int | None, at: float) -> None:
    """Say what changes when a run continues with another --epochs than it was planned for: the
    schedules over the run (learning rate, momentum) are recomputed over the new length from here
    on, so the result is not that of a run planned for the new length from the start."""
    if not planned or planned == args.epochs or not (args.cos or getattr(args, "moco_m_cos", False)):
        return
    before = learning_rate(args.lr, at, planned, args.cos, args.schedule, args.warmup_epochs)
    after = learning_rate(args.lr, at, args.epochs, args.cos, args.schedule, args.warmup_epochs)
    logger.warning("the run was planned for %d epochs, this command says %d: its schedules (learning rate%s) are "
                   "recomputed over %d epochs from epoch %.2f on - the learning rate goes from %.3g to %.3g - so it "
                   "ends elsewhere than a run planned for %d epochs from the start, whose earlier epochs had other "
                   "learning rates", planned, args.epochs, ", momentum" if getattr(args, "moco_m_cos", False) else "",
                   args.epochs, at, before, after, args.epochs)


def start_lines(args: dict, dist: DistInfo, data: str) -> list[str]:
    """What a pretraining run says before its first step: its data, its model, processes and
    global batch, and where each optimisation value comes from (selfsup.recipes.optimisation_line)."""
    from .accumulation import batch_line
    from .recipes import optimisation_line

    from .recipes import DEFAULT_METHOD, DEMO_METHOD

    where = f" ({dist.backend})" if dist.backend else ""
    why = (f"; its method is {DEMO_METHOD}, the one that visibly learns on it within its default run (with a data "
           f"folder the default is {DEFAULT_METHOD}, facebookresearch/moco's)" if args["method"] == DEMO_METHOD else "")
    return [(f"No data folder given: training on the embedded demo, {data}{why}." if args["demo"] else f"Data: {data}"),
            f"{args['method']} {args['arch']}, {dist.world_size} process(es) on {dist.device}{where}, "
            f"{batch_line(args['batch_size'], dist.world_size, args['accum_iter'])}, lr {args['lr']:.4g} "
            f"({args['optimizer']}), {args['epochs']} epochs -> {args['output_dir']}",
            optimisation_line(args, args.get("preset"))]


def _epoch_line(record: dict, embed_dim: int, pretext: dict[str, str] | None = None,
                knn_start: float | None = None) -> str:
    """`Epoch 3 done: loss 6.1234  Acc@1 35.20  lr 0.03  m 0.9960  kNN top-1 61.80 (start 58.10)
    std 0.0810 (1/sqrt(d) 0.0884)  412.0 img/s  25s`."""
    shown = "".join(f"{label} {record[name]:.2f}  " for name, label in (pretext or {}).items()
                    if record.get(name) is not None)
    start = f" (start {knn_start:.2f})" if knn_start is not None else ""
    return (f"Epoch {record['epoch']} done: loss {record['loss']:.4f}  {shown}lr {record['lr']:.4g}  "
            + (f"m {record['momentum']:.4f}  " if record["momentum"] is not None else "")
            + (f"kNN top-1 {record['knn_top1']:.2f}{start}  " if "knn_top1" in record else "")
            + f"std {record['embed_std'] or 0:.4f} (1/sqrt(d) {embed_dim ** -0.5:.4f})  "
            + f"{record['images_per_s'] or 0:.1f} img/s  {record['epoch_time_s']:.0f}s"
            + (f"  skipped {record['skipped_images']} unreadable image(s)" if record["skipped_images"] else ""))
