"""Meters, accuracy, logging on rank 0, and metrics as JSON lines (+ TensorBoard when installed)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

logger = logging.getLogger("selfsup")


def setup_logging(rank: int, output_dir: str | os.PathLike | None = None, name: str = "log.txt") -> None:
    """INFO logs from rank 0 to stdout (and `output_dir/log.txt`); other ranks log warnings only."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(
        "[%(asctime)s] %(message)s" if rank == 0 else f"[%(asctime)s rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if rank == 0 and output_dir is not None:
        fh = logging.FileHandler(Path(output_dir) / name)
        fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
        root.addHandler(fh)
    root.setLevel(level)


class AverageMeter:
    """Current value and running average of a quantity."""

    def __init__(self, name: str, fmt: str = ":f") -> None:
        self.name, self.fmt = name, fmt
        self.reset()

    def reset(self) -> None:
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self) -> str:
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


class ProgressMeter:
    """MoCo-style progress line: `Epoch: [3][ 40/500]  Time ... Loss ...`."""

    def __init__(self, num_batches: int, meters: list[AverageMeter], prefix: str = "") -> None:
        width = len(str(num_batches))
        self.batch_fmt = "[{:" + str(width) + "d}/" + str(num_batches) + "]"
        self.meters, self.prefix = meters, prefix

    def line(self, batch: int) -> str:
        return "  ".join([self.prefix + self.batch_fmt.format(batch)] + [str(m) for m in self.meters])


@torch.no_grad()
def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Number of correct predictions among the top k, for each k (counts, not percentages).

    output: N x C scores; target: N. Counts add up exactly across processes and batches.
    """
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # N x maxk
    correct = pred.eq(target.view(-1, 1))  # N x maxk
    return [correct[:, : min(k, maxk)].any(dim=1).sum() for k in topk]


class MetricsWriter:
    """One JSON line per record in `output_dir/metrics.jsonl`, mirrored to TensorBoard when the
    `tensorboard` package is installed. Rank 0 writes; other ranks hold a disabled writer."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                logger.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tb"))

    def write(self, record: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(record)) + "\n")
        if self.tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}{k}", v, step)
            self.tb.flush()

    def first(self, key: str, **where: Any) -> Any:
        """`key` of the first record holding it whose other values match `where` (None when no
        record does, or on a disabled writer): what a resumed run reads back of its start."""
        if not self.enabled or not self.path.is_file():
            return None
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a torn last line
                continue
            if key in record and all(record.get(k) == v for k, v in where.items()):
                return record[key]
        return None

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """TensorBoard only (not metrics.jsonl): the per-step curves."""
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _plain(record: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        out[k] = v
    return out
