#!/usr/bin/env python
"""Peak memory and time per optimizer step against --accum-iter K, at a fixed global batch.

    python tools/benchmark_accum.py                                      # every method, K = 1 2 4 8, 32 px
    python tools/benchmark_accum.py --method simclr --image-size 96 -b 128 --k 1 4
    python tools/benchmark_accum.py --device cuda --json out.json

Each (method, K) runs in a fresh process: its small-image preset's model and optimizer (ResNet-18
unless -a), synthetic views already on the device, one warm-up step, then --steps optimizer steps
through the engine's epoch loop (selfsup.engine.train_one_epoch), as main_pretrain.py runs them.
Memory is the peak the steps add above what the process holds before them: on a GPU
torch.cuda.max_memory_allocated, on a CPU the peak resident set (VmHWM, reset before the steps
through /proc/self/clear_refs). The targets (docs/PERFORMANCE.md) are checked at the end: memory
falls as K grows (activations ~ 1/K), a step takes at most 5% longer than at K = 1 (SimCLR, whose
embedding-gradient cache runs a second forward pass: 40%). "x floor" compares the step with K steps
of one micro-batch each without accumulation: what small batches cost on this device whatever
accumulates them, so that the accumulation's own cost shows apart from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

from selfsup import recipes  # noqa: E402
from selfsup.accumulation import Accumulation  # noqa: E402
from selfsup.backbones import flag_options as backbone_flag_options  # noqa: E402
from selfsup.builder import build_model  # noqa: E402
from selfsup.data.pipeline import split_micro  # noqa: E402
from selfsup.distributed import DistInfo  # noqa: E402
from selfsup.engine import StepContext, train_one_epoch  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402
from selfsup.optim import build_optimizer  # noqa: E402
from selfsup.rng import MicroStreams  # noqa: E402

# Time per optimizer step at K against K = 1: the other micro-batches only split the same work,
# SimCLR's cache adds one forward pass without gradient.
TIME_LIMIT = {"simclr": 1.40}
TIME_LIMIT_DEFAULT = 1.05


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(method: str, k: int, arch: str, image_size: int, batch: int, steps: int, device: torch.device) -> dict:
    """Seconds per optimizer step and the peak memory (MiB) the steps add, in this process."""
    cfg = recipes.resolve(method, f"small-{method}", False, {"arch": arch, "image_size": image_size,
                                                              "batch_size": batch})
    torch.manual_seed(0)
    model = build_model(method, arch, small_stem=cfg["small_stem"],
                        backbone_options=backbone_flag_options(arch, cfg), **METHODS[method].options(cfg)).to(device)
    opt = build_optimizer(cfg["optimizer"], [(n, p) for n, p in model.named_parameters() if p.requires_grad],
                          cfg["lr"], cfg["momentum"], cfg["wd"], classic_momentum=cfg["classic_momentum"],
                          trust_coefficient=cfg["lars_eta"], wd_exclude=cfg["wd_exclude"])
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(batch, 3, image_size, image_size, generator=g).to(device) for _ in range(2)]
    batches = [(views, torch.zeros(batch), torch.zeros(batch, dtype=torch.long))] * (steps + 1)
    ctx = StepContext(epochs=1, steps_per_epoch=steps + 1, base_lr=cfg["lr"], cos=False, schedule=[],
                      warmup_epochs=0.0, amp="none", print_freq=10**9, global_batch=batch, dist=DistInfo(device=device),
                      acc=Accumulation(k, MicroStreams(k) if k > 1 else None))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    times: list[float] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def after_step(done: int, meters: dict) -> None:
        sync()
        times.append(time.perf_counter())
        if done == 1:  # after the warm-up step: the peak from here on
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base["bytes"] = torch.cuda.memory_allocated(device)
            else:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
                base["bytes"] = _status_kib("VmRSS") * 1024

    base: dict = {}
    train_one_epoch(model, batches, lambda v, e, s: split_micro(v, k), opt, scaler, 0, 0, ctx, after_step)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_kib("VmHWM") * 1024
    step_s = (times[-1] - times[0]) / steps
    return {"method": method, "k": k, "micro_batch": batch // k, "step_s": step_s,
            "peak_mib": (peak - base["bytes"]) / 2**20}


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is not positive: on a CPU, in a process that ran other steps before, the
    peak memory K = 1 adds above its warm-up step can be 0 (the allocator reuses what was held)."""
    return a / b if b > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 4, 8], help="micro-batches per step (default: 1 2 4 8)")
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("-b", "--batch-size", type=int, default=128, help="the global batch, fixed for every K")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps measured, after one warm-up step")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.child:  # one (method, K): its figures as one JSON line
        print(json.dumps(measure(args.method[0], args.k[0], args.arch, args.image_size, args.batch_size, args.steps,
                                 device)), flush=True)
        return 0
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                    f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{args.arch} at {args.image_size} px, global batch {args.batch_size}, {args.steps} steps after one warm-up, "
          f"fp32, {machine}", flush=True)
    print(f"{'method':8s} {'K':>3s} {'micro':>6s} {'s/step':>8s} {'x K=1':>6s} {'x floor':>8s} {'peak MiB':>9s} "
          f"{'x K=1':>6s}")
    rows, failures = [], []
    for method in args.method:
        first = None
        for k in args.k:
            if args.batch_size % k:
                print(f"{method:8s} {k:3d}  skipped: {args.batch_size} does not split into {k}")
                continue
            cmd = [sys.executable, __file__, "--child", "--method", method, "--k", str(k), "-a", args.arch,
                   "--image-size", str(args.image_size), "-b", str(args.batch_size), "--steps", str(args.steps),
                   "--device", device.type]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(r.stdout.strip().splitlines()[-1])
            first = first or row
            if k > 1:  # K steps of one micro-batch each: what the micro-batches cost without accumulation
                floor = subprocess.run(cmd[:cmd.index("--k") + 1] + ["1"] + cmd[cmd.index("--k") + 2:cmd.index("-b") + 1]
                                       + [str(args.batch_size // k)] + cmd[cmd.index("-b") + 2:], capture_output=True,
                                       text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                row["floor_s"] = k * json.loads(floor.stdout.strip().splitlines()[-1])["step_s"]
            else:
                row["floor_s"] = row["step_s"]
            row["time_x"], row["memory_x"] = (ratio(row[f], first[f]) for f in ("step_s", "peak_mib"))
            rows.append(row)
            print(f"{method:8s} {k:3d} {row['micro_batch']:6d} {row['step_s']:8.3f} {row['time_x']:6.2f} "
                  f"{row['step_s'] / row['floor_s']:8.2f} {row['peak_mib']:9.0f} {row['memory_x']:6.2f}", flush=True)
            limit = TIME_LIMIT.get(method, TIME_LIMIT_DEFAULT)
            if row["time_x"] > limit:
                failures.append(f"{method} K={k}: a step takes {row['time_x']:.2f}x K=1's (target <= {limit:.2f}x)")
        ks = [r for r in rows if r["method"] == method]
        for a, b in zip(ks, ks[1:]):
            if b["peak_mib"] >= a["peak_mib"]:
                failures.append(f"{method}: peak memory does not fall from K={a['k']} ({a['peak_mib']:.0f} MiB) to "
                                f"K={b['k']} ({b['peak_mib']:.0f} MiB)")
    for line in failures:
        print(f"MISS {line}")
    print(f"{len(rows)} rows, {len(failures)} target(s) missed")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "arch": args.arch, "image_size": args.image_size,
                                               "batch_size": args.batch_size, "rows": rows, "missed": failures},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
