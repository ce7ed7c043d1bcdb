#!/usr/bin/env python
"""Check every GPU path on a machine with one GPU, in one command of at most 9 minutes.

    python tools/gpu_check.py --out runs/gpu-check                          # smoke + bench (+ learn: see below)
    python tools/gpu_check.py --out runs/gpu-check --fashion-mnist DIR       # learn too
    python tools/gpu_check.py --part smoke                                    # one part (or several)
    python tools/gpu_check.py --dry-run --out /tmp/gpu-check                  # the same code on the CPU, tiny

Parts, each printing PASS / FAIL / SKIP lines and timing itself:

  smoke (<= 4 min)  `pytest -m cuda tests/test_cuda.py`: the batched GPU augmentation against the CPU
                    path, bf16 and fp16 steps against fp32, SyncBN, torch.compile, channels_last, the
                    collectives on an NCCL group, then every entry point for a few steps on the GPU
                    (main_pretrain.py per method; torchrun with NCCL at world size 1; two gloo processes
                    sharing the GPU; --amp bf16; a kill and a bitwise resume; main_lincls.py;
                    main_knn.py; detection/train_torchvision.py).
  bench (<= 3 min)  MoCo v2 ResNet-50 at 224 px: the bf16 training step on synthetic input, the same
                    through the engine's epoch loop, and the whole input pipeline (generated JPEGs,
                    a loader worker per CPU core, GPU augmentation); the GPU's name, memory, versions.
  learn (<= 5 min)  the Fashion-MNIST benchmark (tools/fmnist_benchmark.py --method all: the user's
                    main_pretrain.py, main_knn.py and main_lincls.py per method) on the GPU with
                    --learn-epochs (100) per method, batch 512 and bf16, when --fashion-mnist DIR
                    gives the data; skipped otherwise. A line per method that finished, against the
                    targets (linear >= 90, kNN >= 88); it gets what the other parts left of the 9 min.

Writes OUT/gpu_check.json (every figure and check) and OUT/gpu_check.md (a summary to paste).
Needs only the torch and torchvision installed there (torch >= 2.5, the project's floor) and pytest
for `smoke`; it imports selfsup from ssl/ when the package is not installed. --dry-run runs the same code on the
CPU with tiny sizes (gloo instead of NCCL), about two minutes; CI runs it so the command does not
rot between GPU runs. Exit status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

import benchmark  # noqa: E402
from selfsup.builder import build_model  # noqa: E402
from selfsup.data import FASHION_MNIST_NAME  # noqa: E402
from selfsup.distributed import DistInfo  # noqa: E402
from selfsup.engine import StepContext, train_one_epoch  # noqa: E402
from selfsup.optim import build_optimizer  # noqa: E402

PARTS = ("smoke", "bench", "learn")
BUDGET_S = {"smoke": 240, "bench": 180, "learn": 300}
TOTAL_S = 540  # the whole command: 9 minutes; learn gets what the others left, up to its 5


class Checks:
    """PASS / FAIL / SKIP lines, printed as they come and kept for the JSON and Markdown."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, part: str, name: str, status: str, seconds: float | None = None, detail: str = "") -> None:
        self.rows.append({"part": part, "name": name, "status": status, "seconds": seconds, "detail": detail})
        took = f" ({seconds:.1f}s)" if seconds is not None else ""
        print(f"{status:4s} {part}: {name}{took}{'  - ' + detail if detail else ''}", flush=True)

    @property
    def failed(self) -> int:
        return sum(r["status"] == "FAIL" for r in self.rows)


def environment(device: torch.device) -> dict:
    import torchvision

    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    return env


def run_logged(cmd: list[str], log: Path, env: dict, budget: float) -> tuple[int | None, float]:
    """Run `cmd` in the repository, its output streaming to `log` (what finished survives a
    timeout), for at most `budget` seconds; then the whole process group - the training runs it
    started included - is killed, so none is left holding the GPU. Returns (exit status, or None
    on a timeout; seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- smoke


def smoke(checks: Checks, out: Path, dry_run: bool, budget: float) -> None:
    """`pytest -m cuda tests/test_cuda.py` in a subprocess (run_logged, into OUT/smoke.log); one
    line per test that finished."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        checks.add("smoke", "pytest", "FAIL", detail="pytest is not installed here; the other parts still run")
        return
    log = out / "smoke.log"
    code, took = run_logged([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-v", "-rA", "-p",
                             "no:cacheprovider"], log, {"SELFSUP_TEST_DEVICE": "cpu" if dry_run else "cuda"}, budget)
    results = re.findall(r"^(tests/test_cuda\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR)", log.read_text(), re.M)
    reasons = dict(re.findall(r"^(?:FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(tests/test_cuda\.py(?:::|:)\S+)(?: - |: )(.*)$",
                              log.read_text(), re.M))
    for test, outcome in results:
        status = {"PASSED": "PASS", "SKIPPED": "SKIP"}.get(outcome, "FAIL")
        checks.add("smoke", test.split("::", 1)[1], status, detail=reasons.get(test, "")[:300] if status == "FAIL" else "")
    if code is None:
        checks.add("smoke", "pytest -m cuda", "FAIL", took, f"over its {budget:.0f}s budget after {len(results)} "
                   "tests; stopped (see smoke.log)")
    else:
        checks.add("smoke", f"pytest -m cuda: {len(results)} tests", "PASS" if code == 0 and results else "FAIL", took,
                   "" if code == 0 else f"exit {code}, see smoke.log")


# ---------------------------------------------------------------------------------------------- bench


def bench(checks: Checks, out: Path, device: torch.device, dry_run: bool, budget: float) -> dict:
    """Step throughput (synthetic), through the engine, and the whole input pipeline."""
    t_part = time.perf_counter()
    arch, size, batch, steps = ("resnet18", 32, 8, 2) if dry_run else ("resnet50", 224, 256, 10)
    figures: dict = {"arch": arch, "image_size": size, "batch": batch}
    report = benchmark.Report()
    precisions = ["fp32", "bf16+channels_last"]
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.train_step(report, "moco", arch, size, batch, device, precisions, steps)
    for prec in precisions:
        row = report.get("c", f"step moco {arch} {size}px b{batch} {prec}")
        figures[f"step_{prec}_img_s"] = row["ours"]
    if device.type == "cuda":
        figures["step_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    checks.add("bench", f"MoCo v2 {arch} {size}px b{batch} step: fp32 {figures['step_fp32_img_s']:.0f} img/s, "
               f"bf16+channels_last {figures['step_bf16+channels_last_img_s']:.0f} img/s", "PASS",
               time.perf_counter() - t0)

    t0 = time.perf_counter()
    figures["engine_img_s"] = engine_rate(arch, size, batch, device, 3 if dry_run else 20)
    checks.add("bench", f"bf16+channels_last through train_one_epoch (one fused check per step): "
               f"{figures['engine_img_s']:.0f} img/s", "PASS", time.perf_counter() - t0)

    left = budget - (time.perf_counter() - t_part)
    if left < 60 and not dry_run:
        checks.add("bench", "input pipeline", "SKIP", detail=f"{left:.0f}s of the part's budget left")
        return figures
    t0 = time.perf_counter()
    workers = 1 if dry_run else max(1, (os.cpu_count() or 2) - 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = benchmark.make_imagenet_like(Path(tmp) / "jpegs", 32 if dry_run else 2048)
        rates = benchmark.end_to_end(report, str(data), "moco_v2", 64 if dry_run else size, arch,
                                     8 if dry_run else batch, workers, device, ["reference", "auto"], 1 if dry_run else 2,
                                     "generated JPEGs", amp="bf16" if device.type == "cuda" else "none",
                                     channels_last=device.type == "cuda")
    figures.update(pipeline_workers=workers, pipeline_img_s=rates["auto"], pipeline_reference_img_s=rates["reference"])
    step = figures["step_bf16+channels_last_img_s"]
    checks.add("bench", f"whole pipeline, {workers} workers: {rates['auto']:.0f} img/s ({100 * rates['auto'] / step:.0f}% "
               f"of the step; MoCo's per-image pipeline {rates['reference']:.0f} img/s)", "PASS",
               time.perf_counter() - t0)
    return figures


def engine_rate(arch: str, size: int, batch: int, device: torch.device, steps: int) -> float:
    """Images/s of MoCo v2 steps (bf16 on a GPU) + channels_last through train_one_epoch on synthetic
    batches already on the device: the engine's own overhead next to the bare step above."""
    torch.manual_seed(0)
    model = build_model("moco", arch, K=4096, mlp=True, T=0.2).to(device, memory_format=torch.channels_last)
    opt = build_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.03, 0.9, 1e-4)
    views = [torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last) for _ in range(2)]
    amp = "bf16" if device.type == "cuda" else "none"
    batches = [(views, torch.zeros(batch), torch.zeros(batch, dtype=torch.long))] * steps
    ctx = StepContext(epochs=1, steps_per_epoch=steps, base_lr=0.03, cos=True, schedule=[],
                      warmup_epochs=0.0, amp=amp, print_freq=10**9, global_batch=batch,
                      dist=DistInfo(device=device))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    rates = []
    for _ in range(2):  # the first round warms up (cuDNN autotuning, allocator)
        benchmark.sync(device)
        t0 = time.perf_counter()
        train_one_epoch(model, batches, lambda v, e, s: v, opt, scaler, 0, 0, ctx)
        benchmark.sync(device)
        rates.append(steps * batch / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


# ---------------------------------------------------------------------------------------------- learn


# What one GPU should reach on Fashion-MNIST with 100 epochs per method (issue 16's target).
LEARN_TARGETS = {"linear": 90.0, "knn_t0.1": 88.0}


def learn(checks: Checks, out: Path, data: str | None, dry_run: bool, budget: float, epochs: int) -> dict:
    """tools/fmnist_benchmark.py --method all on this device - the user's three commands per
    method - stopped at the part's budget; one line per method that finished, against
    LEARN_TARGETS (the dry run, on a few tiny images, checks only that the figures come back)."""
    if not data:
        checks.add("learn", "Fashion-MNIST benchmark", "SKIP", detail="no --fashion-mnist DIR given")
        return {}
    results_dir, log = out / "learn", out / "learn.log"
    cmd = [sys.executable, "tools/fmnist_benchmark.py", "--method", "all", "--data", data, "--epochs", str(epochs),
           "--out", str(out / "learn-runs"), "--results-dir", str(results_dir), "--device", "cpu" if dry_run else "cuda"]
    # A GPU step is cheap at 32 px: a larger batch (the presets scale the lr with it) and bf16.
    cmd += (["-j", "0", "--pretrain-args", "--image-size", "16", "-b", "32", "--mlp-dim", "32"] if dry_run
            else ["--pretrain-args", "-b", "512", "--amp", "bf16", "--channels-last"])
    code, took = run_logged(cmd, log, {}, budget)
    figures = {}
    for path in sorted(results_dir.glob("results_*.json")):
        r = json.loads(path.read_text())
        figures[r["method"]] = {"epochs": r["epochs"], "pretrain_min": r["pretrain_min"], **r["pretrained"],
                                "random_init": r["random_init"], "raw_pixels": r["raw_pixels"]}
        short = [f"{k} {r['pretrained'][k]:.2f} < {v}" for k, v in LEARN_TARGETS.items() if r["pretrained"][k] < v]
        status = "PASS" if dry_run or not short else "FAIL"
        checks.add("learn", f"{r['name']}: {r['epochs']} epochs", status, r["pretrain_min"] * 60,
                   f"kNN {r['pretrained']['knn_t0.1']:.2f}, linear {r['pretrained']['linear']:.2f}"
                   + (f"; below target: {', '.join(short)}" if short and not dry_run else ""))
    if code is None:
        checks.add("learn", "Fashion-MNIST benchmark", "FAIL", took,
                   f"over its {budget:.0f}s budget after {len(figures)} of 3 methods; stopped (see learn.log)")
    elif code != 0:
        checks.add("learn", "Fashion-MNIST benchmark", "FAIL", took, f"exit {code}, see learn.log")
    return figures


# ---------------------------------------------------------------------------------------------- main


def markdown(env: dict, checks: Checks, figures: dict, wall: float) -> str:
    lines = ["# tools/gpu_check.py", "",
             f"{env.get('gpu', env['device'])}" + (f", {env['gpu_memory_gib']} GiB" if "gpu_memory_gib" in env else "")
             + f"; torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}"
             + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, NCCL {env['nccl']}" if "cuda" in env else "")
             + f"; {env['cpu_count']} CPUs. {wall / 60:.1f} min in all, {checks.failed} failed.", "",
             "| part | check | status | s |", "|---|---|---|---|"]
    for r in checks.rows:
        detail = f" ({r['detail']})" if r["detail"] else ""
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['part']} | {r['name']}{detail} | {r['status']} | {seconds} |")
    if figures.get("bench"):
        lines += ["", "bench: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in figures["bench"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="where gpu_check.json, gpu_check.md and the logs go")
    p.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    p.add_argument("--fashion-mnist", default=None, metavar="DIR", help="Fashion-MNIST idx files, for the learn part")
    p.add_argument("--learn-epochs", default=100, type=int, help="pretraining epochs per method in learn (100)")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny sizes (CI)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run to exercise the command on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    out = Path(args.out).resolve()  # the parts' commands run in the repository
    if args.fashion_mnist and args.fashion_mnist != FASHION_MNIST_NAME and Path(args.fashion_mnist).exists():
        args.fashion_mnist = str(Path(args.fashion_mnist).resolve())
    out.mkdir(parents=True, exist_ok=True)
    try:
        env = environment(device)
    except Exception as e:  # report it, and still run the parts
        env = {"device": str(device), "error": f"{type(e).__name__}: {e}"}
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    checks, figures = Checks(), {"environment": env}
    for part in PARTS:
        if part not in args.part:
            continue
        t0 = time.perf_counter()
        budget = min(BUDGET_S[part], TOTAL_S - (t0 - t_start))
        print(f"--- {part} (budget {budget:.0f}s)", flush=True)
        try:
            if budget < 30:
                checks.add(part, "part", "SKIP", detail=f"only {budget:.0f}s of the {TOTAL_S}s left")
            elif part == "smoke":
                smoke(checks, out, args.dry_run, budget)
            elif part == "bench":
                figures["bench"] = bench(checks, out, device, args.dry_run, budget)
            else:
                figures["learn"] = learn(checks, out, args.fashion_mnist, args.dry_run, budget,
                                         1 if args.dry_run else args.learn_epochs)
        except Exception as e:  # one part failing must not hide the others' results
            checks.add(part, "part", "FAIL", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
        print(f"--- {part}: {time.perf_counter() - t0:.0f}s", flush=True)
    wall = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps({**figures, "checks": checks.rows, "wall_s": wall,
                                                    "dry_run": args.dry_run}, indent=1))
    (out / "gpu_check.md").write_text(markdown(env, checks, figures, wall))
    print(f"gpu_check: {len(checks.rows)} checks, {checks.failed} failed, {wall:.0f}s; {out / 'gpu_check.md'}",
          flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
