"""The fine-tuning loop's pieces: Detectron2's warmup + multi-step schedule, an endless resumable
stream of batches, precise BatchNorm statistics and the iteration loop itself."""

from __future__ import annotations

import bisect
import datetime
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from selfsup.data.sampler import ResumableDistributedSampler
from selfsup.distributed import DistInfo, all_reduce_mean, all_reduce_sum
from selfsup.stopping import NonFiniteLossError

logger = logging.getLogger(__name__)


def warmup_multistep_lr(base_lr: float, it: int, steps: tuple[int, ...], warmup_iters: int,
                        warmup_factor: float = 0.001, gamma: float = 0.1) -> float:
    """Detectron2's WarmupMultiStepLR at iteration `it`: a linear ramp from
    base_lr * warmup_factor to base_lr over `warmup_iters`, times gamma per milestone passed."""
    factor = 1.0
    if it < warmup_iters:
        alpha = it / warmup_iters
        factor = warmup_factor * (1 - alpha) + alpha
    return base_lr * factor * gamma ** bisect.bisect_right(steps, it)


def batch_stream(loader: torch.utils.data.DataLoader, sampler: ResumableDistributedSampler,
                 start_iter: int) -> Iterator:
    """Batches forever, epoch after epoch, starting where iteration `start_iter` is.

    Batch i is a function of (seed, i) and the global batch size alone (see
    selfsup.data.sampler.ResumableDistributedSampler), so a resumed run sees the data it would have seen.
    """
    epoch, step = divmod(start_iter, sampler.steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, step)
        yield from loader
        epoch, step = epoch + 1, 0


def to_device(images, targets, device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterator, num_iters: int, device: torch.device) -> int:
    """Recompute BatchNorm running statistics as the average over `num_iters` training batches
    (Detectron2's PreciseBN, which MoCo's configs enable), instead of the momentum average of
    the last steps. Statistics are averaged over processes (SyncBN's already agree).
    Returns the number of BatchNorm layers updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or num_iters <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    model.train()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches that follow
    for _ in range(num_iters):
        images, targets = to_device(*next(batches), device)
        model(images, targets)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
        bn.running_mean.copy_(all_reduce_mean(bn.running_mean))
        bn.running_var.copy_(all_reduce_mean(bn.running_var))
    model.train(was_training)
    return len(bns)


@dataclass
class Schedule:
    base_lr: float
    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int
    print_freq: int = 20


def train_iterations(ddp_model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, start_iter: int,
                     schedule: Schedule, dist_info: DistInfo,
                     after_step: Callable[[int, dict | None], None]) -> None:
    """Iterations start_iter .. max_iter - 1 of SGD on the summed Faster R-CNN losses.

    `after_step(iters_done, record)` runs after every step on every process (checkpoints and
    evaluation are collectives); every `print_freq` iterations `record` holds the losses averaged
    over those iterations and over processes, else it is None. A non-finite loss on any process
    stops every process.
    """
    device = dist_info.device
    t0, data_time, hook_time, last_logged, window = time.time(), 0.0, 0.0, start_iter, None
    for it in range(start_iter, schedule.max_iter):
        lr = warmup_multistep_lr(schedule.base_lr, it, schedule.steps, schedule.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_data = time.time()
        images, targets = to_device(*next(batches), device)
        data_time += time.time() - t_data
        losses = ddp_model(images, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg
        loss = sum(losses.values())
        bad = torch.tensor([0.0 if math.isfinite(loss.item()) else 1.0], device=device)
        if all_reduce_sum(bad).item() > 0:
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at iteration {it} ({ {k: v.item() for k, v in losses.items()} }); "
                "lower --lr or raise --warmup-iters"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = None
        done = it + 1
        step_values = torch.stack([loss.detach()] + [v.detach() for v in losses.values()])
        window = step_values if window is None else window + step_values
        if done % schedule.print_freq == 0 or done == schedule.max_iter:
            values = all_reduce_mean(window / (done - last_logged))
            per_iter = (time.time() - t0 - hook_time) / (done - last_logged)  # checkpoints, evaluation excluded
            record = {"type": "train", "iter": done, "lr": lr, "loss": values[0].item(),
                      **{k: v.item() for k, v in zip(losses, values[1:])},
                      "time_per_iter_s": per_iter, "data_time_s": data_time / (done - last_logged)}
            eta = per_iter * (schedule.max_iter - done)
            logger.info("iter %d/%d  loss %.4f (%s)  lr %.4g  %.3fs/iter  eta %s", done, schedule.max_iter,
                        record["loss"], " ".join(f"{k.removeprefix('loss_')} {record[k]:.3f}" for k in losses), lr,
                        per_iter, datetime.timedelta(seconds=round(eta)))
            t0, data_time, hook_time, last_logged, window = time.time(), 0.0, 0.0, done, None
        t_hook = time.time()
        after_step(done, record)
        hook_time += time.time() - t_hook


