#!/usr/bin/env python
"""Check every GPU path on a machine with one GPU, in one command of at most 8 minutes.

    python tools/gpu_check.py --out runs/gpu-check --fashion-mnist DIR      # smoke, bench, learn
    python tools/gpu_check.py --part smoke bench                            # some parts
    python tools/gpu_check.py --part compile                                # torch.compile, on its own
    python tools/gpu_check.py --dry-run --out /tmp/gpu-check                # the same code on the CPU, tiny

It needs only torch and torchvision (and pytest for smoke and compile) where it runs: a plain
clone, the project not installed. Parts, in the order of what would stop a user first, each
given its own budget (the parts run as subprocesses are stopped at it), PASS / FAIL / SKIP lines
as they come. Every check can fail; none is decided by the plan before it runs:

  smoke (<= 180 s)  `pytest -m cuda -k "not compile" tests/test_cuda.py`: every entry point for a few
                    steps on the GPU first (main_pretrain.py per method; torchrun with NCCL at world
                    size 1; a kill and a bitwise resume with --deterministic; --amp bf16 with the
                    batched pipeline; main_lincls.py, main_knn.py, detection; two gloo processes on one
                    GPU), then the kernels (the collectives on an NCCL group, bf16/fp16 steps against
                    fp32, SyncBN, channels_last, the batched augmentation against the CPU path).
  bench (<= 75 s)   MoCo v2 (its ImageNet preset) ResNet-50 at 224 px: the training step on synthetic
                    input in fp32 and bf16 + channels_last, the same step through the engine with its
                    host waits counted, and the whole input pipeline; MoCo v3 ViT-S/16's step at
                    batch 128 in fp32 and bf16. Each row is judged against the threshold printed next
                    to it (the BENCH_* constants); one that holds on a GPU only says N/A in a dry run.
  learn (the rest)  Fashion-MNIST (--fashion-mnist DIR): the methods of --learn-methods (by default the
                    two whose measured schedule comes within reach of the target), each method's
                    small-image preset at batch 512, bf16, channels_last, sized in optimizer steps
                    from its step time measured first (augmentation included). Each method needs
                    LEARN_MIN_EPOCHS of steps; one whose need does not fit in what is left is not run
                    and is named (NOT RUN); the time left over buys the others more epochs. Online kNN
                    and checkpoint at the end only, then kNN and linear top-1 from features cached on
                    the GPU against both baselines measured in the same run (tools/fmnist_benchmark.py
                    --eval features). Target: each method 3 points above the better baseline on both
                    (a miss is MISS, not a failure: the run worked, the recipe fell short).
  compile (300 s)   `pytest -m cuda -k compile`: torch.compile'd networks against eager ones and a
                    --compile run of main_pretrain.py. Not in the default plan: two cold compiles take
                    minutes, more than the 8 minutes leave beside the other parts; on its own
                    (--part compile) its budget is enough, and running over it is a failure.

The plan (every part's budget, learn's steps per method at the GPU step time it assumes) is
printed before anything runs, so a cut run says how far it got; learn prints its plan again from
the step times it measured. Writes OUT/gpu_check.json (every figure and check) and
OUT/gpu_check.md (a summary to paste). --dry-run runs the same code on the CPU with tiny sizes
(gloo instead of NCCL); the test suite runs it so the command cannot rot between GPU runs. Exit
status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

import benchmark  # noqa: E402
import benchmark_accum  # noqa: E402
from fmnist_benchmark import NAMES as METHOD_NAMES  # noqa: E402
from selfsup import recipes  # noqa: E402
from selfsup.backbones import flag_options as backbone_flag_options  # noqa: E402
from selfsup.builder import build_model  # noqa: E402
from selfsup.data import FASHION_MNIST_NAME, fashion_mnist_root, load_fashion_mnist, write_idx  # noqa: E402
from selfsup.data.pipeline import copied_views, build_pretrain_pipeline  # noqa: E402
from selfsup.distributed import DistInfo, configure_kernels  # noqa: E402
from selfsup.engine import StepContext, train_one_epoch  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402
from selfsup.optim import build_optimizer  # noqa: E402

PARTS = ("smoke", "bench", "learn", "compile")
DEFAULT_PARTS = ("smoke", "bench", "learn")
TOTAL_S = 480  # the whole command: 8 minutes of the lease's 15 (a machine's start takes 1-2)
BUDGET_S = {"smoke": 180, "bench": 75, "learn": None, "compile": 300}  # learn: what the others leave
# compile: two cold compiles (tests/test_cuda.py's -k compile: a SimCLR ResNet-18, then main_pretrain.py
# --compile with BYOL in a new process). Cold on a 2-core Xeon with AMX (torch 2.14, a fresh inductor
# cache, the machine busy): compile_probe 32 s, the first forward 23 s, the first backward 11 s, so
# about 70 s a compile; on a GPU inductor's Triton kernels take their place, unmeasured. 300 s is
# twice two such compiles and pytest's start: too much to sit beside the others in TOTAL_S, enough alone.

# --dry-run: the same processes on a CPU (2 cores in CI) without a GPU take longer than the real
# sizes on the GPU machine; its budgets are these times longer.
DRY_RUN_SLOWDOWN = 3

# ---- bench: each row's threshold, printed next to its figure; a row that misses it FAILs.
# bf16 (+ channels_last) step >= 1.5x the fp32 step, on a GPU. NVIDIA's ResNet-50 v1.5 for PyTorch
# (DeepLearningExamples, 1 A100 80GB) trains at 938 img/s in TF32 and 2470 img/s in mixed precision,
# 2.63x; an H100's dense bf16 peak is twice its TF32 one (989 against 495 TFLOPS) and 15x its plain
# fp32 one (67), which ViT's matmuls use by default. 1.5x leaves room for MoCo's extra work.
BENCH_BF16_SPEEDUP = 1.5
# The step through train_one_epoch (schedules, meters, the fused check) >= 0.9x the bare step: the
# engine adds a few small kernels and one wait for the forward pass to a ~100 ms step.
BENCH_ENGINE_VS_BARE = 0.9
# Host waits for the device per step of train_one_epoch = 1: the fused check (ssl/selfsup/engine.py,
# _optimizer_step); every other read is a wait the step must not have. Counted on a GPU too.
BENCH_HOST_WAITS = 1
# The whole input pipeline (workers decoding JPEGs, colour on the GPU, the step) >= 80% of the bare
# bf16 step: docs/PERFORMANCE.md's target for the GPU pipeline.
BENCH_PIPELINE_VS_STEP = 0.8
# --accum-iter 4 at a fixed global batch (tools/benchmark_accum.py): SimCLR's peak memory at most
# 0.75x K = 1's (activations ~ 1/K), its step at most 1.4x (the cache's extra forward pass).
BENCH_ACCUM_MEMORY = 0.75
BENCH_ACCUM_TIME = 1.4
# The pipeline is timed after its start-up: each of W workers makes a whole batch before the first
# step, so an epoch of 5 W batches is timed over its last 3 W.
PIPELINE_BATCHES_PER_WORKER, PIPELINE_WARMUP_PER_WORKER = 5, 2
# Every way a tensor's value reaches the host (tests/test_engine.py counts the same on a CPU).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

# ---- learn
LEARN_BATCH = 512
FASHION_MNIST_TRAIN = 60_000  # its training set: the GPU run's data, and the dry run's plan
# Per method, beyond its pretraining steps: starting two processes and CUDA, the data to the GPU,
# the final online kNN and checkpoint, two feature extractions, the raw-pixel baseline and three
# linear fits. An estimate until a GPU run measures it (the run reports each method's as overhead_s).
LEARN_OVERHEAD_S = 40.0
# A method's run is planned for its steps at this many times the step time measured (calibration
# on 15 steps; the run's epochs also log and sample), so a slower run still ends within its share.
LEARN_STEP_SLACK = 1.25
# What each method should reach: this many points above the better of the two baselines, on kNN
# (T = 0.1) and linear top-1.
LEARN_MARGIN = 3.0
# The pretraining each method needs before LEARN_MARGIN is within reach, in epochs of Fashion-MNIST.
# The only evidence is docs/RESULTS.md: 10 epochs at batch 128 on 2 CPU cores, margins over the
# better baseline (kNN / linear) MoCo v3 +3.89 / +3.68, SimCLR +2.76 / +2.13, MoCo v2 +2.00 / +1.57,
# BYOL -0.95 / +1.50. So: MoCo v3 10, the schedule that reached it. SimCLR 20: within 0.24 (kNN) and
# 0.87 (linear) of it after 10, its online kNN still rising (74.1 to 80.9), so twice the schedule - an
# assumption, unmeasured. MoCo v2 (online kNN flat after its 7th epoch) and BYOL came nowhere near: 40,
# four times the schedule, a guess that keeps them out of the default plan. These are epochs at
# batch 512 with the presets' learning rates scaled linearly (lr_per_256): as many images as at batch
# 128 but a quarter of the steps - that the target is reached as well in fewer, larger steps is an
# assumption of its own, which only the first GPU run can confirm (a shortfall is a MISS).
LEARN_MIN_EPOCHS = {"mocov3": 10, "simclr": 20, "moco": 40, "byol": 40, "dino": 40}  # DINO: unmeasured, a guess
LEARN_DEFAULT = ("mocov3", "simclr")  # the methods whose evidence comes within reach of the target
# The GPU step each method is assumed to take, its augmentation included, until a GPU run measures
# it (no GPU has run it). From counts on a CPU (2-core Xeon with AMX, torch 2.14; each preset at
# batch 512 and 32 px under bf16 autocast, through train_one_epoch, and its memory pipeline's
# views): aten ops of a step and of its augmentation, and the step's FLOPs
# (torch.utils.flop_counter). Assumed: 10 us of host time per eager op on a GPU (Python, dispatcher,
# autograd, cudaLaunchKernel; usually quoted as 5-25 us), and the FLOPs at 10% of an H100's 989 dense
# bf16 TFLOPS (ResNet-18 at 32 px has 8 x 8 to 1 x 1 feature maps, far too small to fill it).
LEARN_STEP_COUNTS = {  # method: (ops of a step, ops of its augmentation, FLOPs of a step)
    "mocov3": (1130, 1756, 305.5e9), "simclr": (492, 1745, 227.3e9),
    "moco": (1342, 1745, 152.6e9), "byol": (1120, 1756, 305.2e9),
    # small-dino (2 x 32 + 6 x 16 px), counted on the bare step and ViewsAugment.forward_from_images
    # outside train_one_epoch (SimCLR counted so: 478 / 1752 / 227.3e9)
    "dino": (1577, 7527, 762.5e9)}
HOST_S_PER_OP, GPU_FLOPS = 10e-6, 0.1 * 989e12
ASSUMED_GPU_STEP_S = {m: (ops + aug) * HOST_S_PER_OP + flops / GPU_FLOPS
                      for m, (ops, aug, flops) in LEARN_STEP_COUNTS.items()}
# Per method, the first plan's allowance for measuring its step (the run plans with the time it took).
LEARN_CALIBRATION_S = 5.0


class Checks:
    """PASS / FAIL / SKIP lines (and N/A: a GPU's threshold in a dry run; NOT RUN: a method the plan
    cannot give its epochs; MISS: a learning target missed), printed as they come and kept for the
    JSON and Markdown. Only FAIL fails the command."""

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
            code = proc.wait(timeout=max(budget, 1.0))
        except subprocess.TimeoutExpired:
            # SIGTERM first: torchrun forwards it to its workers, which run in sessions of their own
            # that a SIGKILL of this group would miss; then SIGKILL whatever is left of the group.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            code = None
    return code, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- smoke, compile


def cuda_tests(checks: Checks, part: str, selector: str, out: Path, dry_run: bool, budget: float) -> None:
    """`pytest -m cuda -k SELECTOR tests/test_cuda.py` in a subprocess (run_logged, into
    OUT/PART.log); one line per test that finished."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        checks.add(part, "pytest", "FAIL", detail="pytest is not installed here; the other parts still run")
        return
    log = out / f"{part}.log"
    code, took = run_logged([sys.executable, "-m", "pytest", "-m", "cuda", "-k", selector, "tests/test_cuda.py", "-v",
                             "-rA", "-p", "no:cacheprovider"], log,
                            {"SELFSUP_TEST_DEVICE": "cpu" if dry_run else "cuda"}, budget)
    text = log.read_text()
    results = re.findall(r"^(tests/test_cuda\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M)
    reasons = dict(re.findall(r"^(?:FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(tests/test_cuda\.py(?:::|:)\S+)(?: - |: )(.*)$",
                              text, re.M))
    for test, outcome in results:
        status = {"PASSED": "PASS", "SKIPPED": "SKIP"}.get(outcome, "FAIL")
        checks.add(part, test.split("::", 1)[1], status, detail=reasons.get(test, "")[:300] if status == "FAIL" else "")
    ran = sum(outcome != "SKIPPED" for _, outcome in results)
    name, status, detail = pytest_summary(selector, code, len(results), ran, budget, log.name)
    checks.add(part, name, status, took, detail)


def pytest_summary(selector: str, code: int | None, tests: int, ran: int, budget: float,
                   log: str) -> tuple[str, str, str]:
    """(name, status, detail) of a pytest part's own line from its exit status (None: stopped at
    its budget), the number of tests that reported and of those that ran (not skipped). Only
    exit 0 with tests that ran passes; exit 5, nothing collected, fails like any other: a part
    that checks nothing has failed to check. Every test skipped (their lines say why) is SKIP."""
    name = f"pytest -k {selector!r}: {tests} tests"
    if code is None:
        return name, "FAIL", f"over its {budget:.0f}s budget after {tests} tests; stopped (see {log})"
    if code == 5:
        return name, "FAIL", f"exit 5: no test collected or selected (see {log})"
    if code != 0 or not tests:
        return name, "FAIL", f"exit {code}, see {log}"
    if not ran:
        return name, "SKIP", "every test skipped: nothing checked"
    return name, "PASS", ""


# ---------------------------------------------------------------------------------------------- bench


def bench(checks: Checks, out: Path, device: torch.device, dry_run: bool, budget: float) -> dict:
    """MoCo v2's step (fp32, bf16), the same through the engine with its host waits counted, MoCo v3
    ViT-S/16's step, and the whole input pipeline: each row judged against its BENCH_* threshold."""
    t_part = time.perf_counter()
    gpu = device.type == "cuda"
    arch, size, batch, steps = ("resnet18", 32, 16, 2) if dry_run else ("resnet50", 224, 256, 10)
    figures: dict = {"arch": arch, "image_size": size, "batch": batch}
    report = benchmark.Report()

    def fits(row: str, need_s: float) -> bool:
        """Whether `row` (about `need_s` on the GPU) fits in what is left of the part's budget."""
        left = budget - (time.perf_counter() - t_part)
        if left >= need_s:
            return True
        checks.add("bench", row, "SKIP", detail=f"{left:.0f}s of the part's {budget:.0f}s left, about {need_s}s needed")
        return False

    # MoCo v2's ImageNet recipe (K 65536, MLP head, T 0.2), the bare step on synthetic input
    t0 = time.perf_counter()
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    rates = benchmark.train_step(report, "moco", arch, size, batch, device, ["fp32", "bf16+channels_last"], steps,
                                 preset="mocov2")
    fp32, bf16 = rates["fp32"], rates["bf16+channels_last"]
    figures.update({"step_fp32_img_s": fp32, "step_bf16+channels_last_img_s": bf16})
    if gpu:
        figures["step_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    bench_row(checks, f"MoCo v2 {arch} {size}px b{batch} step: bf16+channels_last {bf16:.0f} img/s = "
              f"{bf16 / fp32:.2f}x fp32 ({fp32:.0f} img/s)", bf16 / fp32, ">=", BENCH_BF16_SPEEDUP, "x",
              time.perf_counter() - t0, gpu)

    # MoCo v3 ViT-S/16 at 224 px, 128 a GPU (mocov3-vit-small-b1024 on 8 GPUs)
    vit, vit_size, vit_batch = ("vit_small_p4", 32, 4) if dry_run else ("vit_small", 224, 128)
    if fits(f"MoCo v3 {vit} step", 15):
        t0 = time.perf_counter()
        rates = benchmark.train_step(report, "mocov3", vit, vit_size, vit_batch, device, ["fp32", "bf16"], steps,
                                     preset="mocov3-vit-small")
        figures.update(vit_arch=vit, vit_image_size=vit_size, vit_batch=vit_batch, vit_step_fp32_img_s=rates["fp32"],
                       vit_step_bf16_img_s=rates["bf16"])
        bench_row(checks, f"MoCo v3 {vit} {vit_size}px b{vit_batch} step: bf16 {rates['bf16']:.0f} img/s = "
                  f"{rates['bf16'] / rates['fp32']:.2f}x fp32 ({rates['fp32']:.0f} img/s)",
                  rates["bf16"] / rates["fp32"], ">=", BENCH_BF16_SPEEDUP, "x", time.perf_counter() - t0, gpu)

    cfg = recipes.resolve("moco", "mocov2", False, {"batch_size": batch, "arch": arch, "image_size": size})
    if fits("the step through train_one_epoch", 15):
        t0 = time.perf_counter()
        model, optimizer = preset_model("moco", cfg, device)
        batches, views = synthetic_batches(size, batch, device, 3 if dry_run else 20)
        figures["engine_img_s"] = batch / step_seconds(model, optimizer, cfg["lr"], batches, views, device)
        ratio = figures["engine_img_s"] / bf16
        bench_row(checks, f"the same step through train_one_epoch: {figures['engine_img_s']:.0f} img/s = {ratio:.2f}x "
                  "the bare bf16 step", ratio, ">=", BENCH_ENGINE_VS_BARE, "x", time.perf_counter() - t0, gpu)
        t0 = time.perf_counter()
        waits = host_waits_per_step(model, optimizer, *synthetic_batches(size, batch, device, 6), cfg["lr"], device)
        figures["host_waits_per_step"] = waits
        same = waits[0] if waits and len(set(waits)) == 1 else None  # a step that differs fails the row
        bench_row(checks, f"host waits per step of train_one_epoch ({'CUDA syncs' if gpu else 'host reads'}, "
                  f"steps 1-{len(waits)}): {waits}", same, "==", BENCH_HOST_WAITS, "", time.perf_counter() - t0, True)
        del model, optimizer

    # --accum-iter: SimCLR (the cache's extra forward pass) at a fixed global batch, K = 1 and 4
    acc_arch, acc_size, acc_batch, acc_steps = ("resnet18", 32, 16, 2) if dry_run else ("resnet50", 224, 128, 3)
    if fits("accumulation", 20):
        t0 = time.perf_counter()
        one, four = (benchmark_accum.measure("simclr", k, acc_arch, acc_size, acc_batch, acc_steps, device)
                     for k in (1, 4))
        figures.update(accum_k1=one, accum_k4=four)
        what = f"SimCLR {acc_arch} {acc_size}px global batch {acc_batch}, --accum-iter 4 against 1:"
        memory, time_ = (benchmark_accum.ratio(four[f], one[f]) for f in ("peak_mib", "step_s"))
        bench_row(checks, f"{what} peak memory {four['peak_mib']:.0f} MiB = {memory:.2f}x",
                  memory, "<=", BENCH_ACCUM_MEMORY, "x", time.perf_counter() - t0, gpu)
        bench_row(checks, f"{what} {four['step_s']:.3f} s a step = {time_:.2f}x",
                  time_, "<=", BENCH_ACCUM_TIME, "x", 0.0, gpu)

    if fits("input pipeline", 25):
        t0 = time.perf_counter()
        workers = 1 if dry_run else max(1, (os.cpu_count() or 2) - 1)
        pipe_size, pipe_batch = (64, 8) if dry_run else (size, batch)
        with tempfile.TemporaryDirectory() as tmp:
            data = linked_jpegs(Path(tmp), 16 if dry_run else 256, PIPELINE_BATCHES_PER_WORKER * workers * pipe_batch)
            rate = pipeline_img_s(data, {**cfg, "batch_size": pipe_batch, "image_size": pipe_size}, workers, device)
        figures.update(pipeline_workers=workers, pipeline_img_s=rate)
        bench_row(checks, f"whole pipeline, {workers} workers, {pipe_size}px b{pipe_batch}: {rate:.0f} img/s = "
                  f"{100 * rate / bf16:.0f}% of the bare bf16 step", rate / bf16, ">=", BENCH_PIPELINE_VS_STEP, "x",
                  time.perf_counter() - t0, gpu)
    return figures


def judge(value: float | None, op: str, need: float) -> str:
    """PASS when `value op need` holds (op: ">=", "<=" or "=="), FAIL when it does not or the
    figure is missing (None or NaN): the threshold is the whole of a bench row's verdict."""
    if value is None or value != value:
        return "FAIL"
    return "PASS" if {">=": value >= need, "<=": value <= need, "==": value == need}[op] else "FAIL"


def bench_row(checks: Checks, name: str, value: float | None, op: str, need: float, unit: str, seconds: float,
              applies: bool) -> None:
    """One bench line: the figure (in `name`) and its threshold side by side, judged; N/A where the
    threshold holds on a GPU only and this run has none (the figure is still reported)."""
    threshold = f"threshold {op} {need:g}{unit}"
    if applies:
        checks.add("bench", name, judge(value, op, need), seconds, threshold)
    else:
        checks.add("bench", name, "N/A", seconds, f"{threshold} on a GPU; not applicable on a CPU")


def preset_model(method: str, cfg: dict, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The network and optimizer main_pretrain.py builds for the resolved recipe `cfg`, on
    `device` in channels_last."""
    torch.manual_seed(0)
    model = build_model(method, cfg["arch"], small_stem=cfg["small_stem"],
                        backbone_options=backbone_flag_options(cfg["arch"], cfg), **METHODS[method].options(cfg))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg["optimizer"], [(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                cfg["lr"], cfg["momentum"], cfg["wd"], classic_momentum=cfg["classic_momentum"],
                                trust_coefficient=cfg["lars_eta"], wd_exclude=cfg["wd_exclude"])
    return model, optimizer


def synthetic_batches(size: int, batch: int, device: torch.device, steps: int) -> tuple[list, Callable]:
    """`steps` loader batches of random views already on the device (bf16 on a GPU, as the
    pipelines hand them under --amp bf16; channels_last), and the make_views that passes them on.
    The skipped-files count is numpy, a host value as the loaders' is: reading it waits for nothing."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    views = [torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
             for _ in range(2)]
    return [(views, torch.zeros(batch, dtype=torch.long), np.zeros(batch, dtype=np.int64))] * steps, ready_views(device)


def ready_views(device: torch.device) -> Callable:
    """train_one_epoch's make_views for batches whose views are made already: the pipeline's own
    hand-over of such batches (selfsup.data.pipeline), so they reach the step in the form it takes;
    views already on `device` in channels_last pass unchanged."""
    return copied_views(device, True)


def step_context(steps: int, lr: float, batch: int, device: torch.device) -> StepContext:
    """One epoch of `steps` steps as main_pretrain.py runs it (bf16 on a GPU), printing only at the
    first and last step."""
    return StepContext(epochs=1, steps_per_epoch=steps, base_lr=lr, cos=True, schedule=[], warmup_epochs=0.0,
                       amp="bf16" if device.type == "cuda" else "none", print_freq=10**9, global_batch=batch,
                       dist=DistInfo(device=device))


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, batches: list, make_views,
                 device: torch.device) -> float:
    """Seconds per optimizer step of `model` through train_one_epoch over `batches` (turned into
    views by `make_views`, as a pipeline's views would). The first of two rounds warms up (cuDNN's
    autotuner, the allocator); the second is timed."""
    ctx = step_context(len(batches), lr, len(batches[0][1]), device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    times = []
    for _ in range(2):
        benchmark.sync(device)
        t0 = time.perf_counter()
        train_one_epoch(model, batches, make_views, optimizer, scaler, 0, 0, ctx)
        benchmark.sync(device)
        times.append((time.perf_counter() - t0) / len(batches))
    return times[-1]


def host_waits_per_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list, make_views: Callable,
                        lr: float, device: torch.device) -> list[int]:
    """How often the host waits for the device in each step of train_one_epoch over `batches` (made
    views by `make_views`), for the steps between the first and the last (which print their
    meters). On a GPU: the CUDA events
    the host synchronizes on (the engine's intended wait, which sync debug mode does not report)
    plus every synchronisation torch.cuda's sync debug mode warns about (.item(), a copy to the
    host, ...). On a CPU, where nothing waits: every read of a tensor's value on the host, each of
    which would be a wait on a GPU."""
    gpu = device.type == "cuda"
    waits: list[str] = []
    patched = []
    for owner, name in [(torch.cuda.Event, "synchronize")] if gpu else [(torch.Tensor, n) for n in HOST_READS]:
        original = getattr(owner, name)
        patched.append((owner, name, original, name in vars(owner)))

        def counted(*args, _original=original, _name=name, **kwargs):
            waits.append(_name)
            return _original(*args, **kwargs)

        setattr(owner, name, counted)
    per_step: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if gpu:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            syncs = lambda: sum("synchroniz" in str(w.message) for w in caught)  # noqa: E731
            scaler = torch.amp.GradScaler(device.type, enabled=False)
            train_one_epoch(model, batches, make_views, optimizer, scaler, 0, 0,
                            step_context(len(batches), lr, len(batches[0][1]), device),
                            lambda done, meters: per_step.append(len(waits) + syncs()))
        finally:
            if gpu:
                torch.cuda.set_sync_debug_mode("default")
            for owner, name, original, own in patched:
                if own:
                    setattr(owner, name, original)
                else:
                    delattr(owner, name)
    return np.diff([0, *per_step]).tolist()[1:-1]


def linked_jpegs(folder: Path, distinct: int, n: int) -> Path:
    """An image folder of `n` ImageNet-like JPEGs: `distinct` generated ones (tools/benchmark.py),
    hard-linked over and over, so an epoch long enough to time costs the generation of a few."""
    source = benchmark.make_imagenet_like(folder / "jpegs", distinct)
    files = sorted(source.glob("class*/*.jpg"))
    for i in range(n):
        f = files[i % len(files)]
        (folder / "many" / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, folder / "many" / f.parent.name / f"{i:06d}.jpg")
    return folder / "many"


def pipeline_img_s(data: Path, cfg: dict, workers: int, device: torch.device) -> float:
    """Images/s of one epoch of the whole pipeline (build_pretrain_pipeline's auto backend: crops in
    `workers` loader workers, colour on the device; main_pretrain.py's bf16 and channels_last on a
    GPU) into the step of `cfg`'s model, through train_one_epoch, timed from the step after the
    workers' first PIPELINE_WARMUP_PER_WORKER batches each to the last."""
    gpu = device.type == "cuda"
    pipeline = build_pretrain_pipeline(str(data), aug=cfg["aug"], image_size=cfg["image_size"],
                                       batch_size=cfg["batch_size"], workers=workers, dist=DistInfo(device=device),
                                       seed=0, backend="auto", channels_last=gpu,
                                       out_dtype=torch.bfloat16 if gpu else torch.float32)
    model, optimizer = preset_model("moco", cfg, device)
    steps, skip = pipeline.sampler.steps_per_epoch, PIPELINE_WARMUP_PER_WORKER * workers
    stamps: list[float] = []
    pipeline.sampler.set_epoch(0)
    train_one_epoch(model, pipeline.loader, pipeline.views, optimizer, torch.amp.GradScaler(device.type, enabled=False),
                    0, 0, step_context(steps, cfg["lr"], cfg["batch_size"], device),
                    lambda done, meters: stamps.append(time.perf_counter()))
    benchmark.sync(device)
    stamps[-1] = time.perf_counter()  # the last step finished on the device
    return (len(stamps) - skip) * cfg["batch_size"] / (stamps[-1] - stamps[skip - 1])


# ---------------------------------------------------------------------------------------------- learn


def learn_methods() -> list[str]:
    """The methods with a small-image preset (small-<method>), in METHODS' order."""
    return [m for m in METHODS if recipes.small_preset(m) in recipes.PRESETS]


def plan_learn(methods: list[str], step_s: dict[str, float], budget: float, steps_per_epoch: int) -> list[dict]:
    """Each method's pretraining, planned from its step time (`step_s`, seconds, augmentation
    included) in the order given. A method runs when its need - LEARN_OVERHEAD_S and its
    LEARN_MIN_EPOCHS of steps at LEARN_STEP_SLACK times its step time - fits in what the methods
    before it left of `budget`; one that does not gets run=False (and is named, not run), and the
    methods after it may still fit. What the kept methods leave is shared among them in
    proportion to their need, as whole extra epochs."""
    rows, left = [], budget
    for method in methods:
        epoch_s = steps_per_epoch * step_s[method] * LEARN_STEP_SLACK
        need = LEARN_OVERHEAD_S + LEARN_MIN_EPOCHS[method] * epoch_s
        rows.append({"method": method, "run": need <= left, "step_ms": 1000 * step_s[method],
                     "steps_per_epoch": steps_per_epoch, "min_epochs": LEARN_MIN_EPOCHS[method], "need_s": need,
                     "available_s": left, "epoch_s": epoch_s})
        left -= need if need <= left else 0.0
    kept = sum(r["need_s"] for r in rows if r["run"])
    for r in rows:
        r["share_s"] = r["need_s"] * (1 + left / kept) if r["run"] else 0.0
        # 1e-9: a share of exactly the need is its minimum epochs, not one fewer by rounding
        r["epochs"] = int((r["share_s"] - LEARN_OVERHEAD_S) / r["epoch_s"] + 1e-9) if r["run"] else 0
        r["steps"] = r["epochs"] * steps_per_epoch
    return rows


def plan_line(title: str, plan: list[dict], batch: int, how: str, needs: bool = True) -> str:
    """`TITLE: MoCo v3 1287 steps = 11 epochs x 117 at batch 512 (32.0 ms/step assumed; needs >= 10
    epochs); ...; NOT RUN: MoCo v2 (needs 230s for 40 epochs, 20s left)`."""
    runs = [f"{METHOD_NAMES[p['method']]} {p['steps']} steps = {p['epochs']} epochs x {p['steps_per_epoch']} at batch "
            f"{batch} ({p['step_ms']:.1f} ms/step {how}" + (f"; needs >= {p['min_epochs']} epochs)" if needs else ")")
            for p in plan if p["run"]]
    left_out = [f"{METHOD_NAMES[p['method']]} (needs {p['need_s']:.0f}s for {p['min_epochs']} epochs, "
                f"{p['available_s']:.0f}s left)" for p in plan if not p["run"]]
    return f"{title}: " + ("; ".join(runs) or "no method") + (f"; NOT RUN: {', '.join(left_out)}" if left_out else "")


def assumed_learn_plan(methods: list[str], budget: float) -> list[dict]:
    """The GPU run's plan for `methods` in learn's `budget` at ASSUMED_GPU_STEP_S, on Fashion-MNIST
    at LEARN_BATCH, less LEARN_CALIBRATION_S a method for measuring the steps first."""
    return plan_learn(methods, ASSUMED_GPU_STEP_S, budget - LEARN_CALIBRATION_S * len(methods),
                      FASHION_MNIST_TRAIN // LEARN_BATCH)


def learn_step_seconds(method: str, data: str, batch: int, size: int, device: torch.device, steps: int,
                       dry_run: bool) -> float:
    """Seconds per optimizer step of `method`'s small-image preset at `batch` and `size`, its views
    made on the device from the Fashion-MNIST images held in memory, as main_pretrain.py makes them
    (bf16 on a GPU, channels_last): the step a learn run takes, augmentation included."""
    cfg = recipes.resolve(method, recipes.small_preset(method), False,
                          {"batch_size": batch, "image_size": size, **({"mlp_dim": 32} if dry_run else {})})
    gpu = device.type == "cuda"
    pipeline = build_pretrain_pipeline(data, aug=cfg["aug"], image_size=size, batch_size=batch, workers=0,
                                       dist=DistInfo(device=device), seed=0, backend="auto", channels_last=True,
                                       out_dtype=torch.bfloat16 if gpu else torch.float32)
    batches: list = []
    for epoch in range(steps):  # as many epochs as it takes (a dry run's has 3 steps)
        if len(batches) >= steps:
            break
        pipeline.sampler.set_epoch(epoch)
        batches += list(islice(pipeline.loader, steps - len(batches)))
    model, optimizer = preset_model(method, cfg, device)
    return step_seconds(model, optimizer, cfg["lr"], batches, pipeline.views, device)


def learn(checks: Checks, out: Path, data: str | None, device: torch.device, dry_run: bool, budget: float,
          methods: list[str], assumed: list[dict]) -> dict:
    """`methods`' small-image presets through tools/fmnist_benchmark.py (main_pretrain.py, then the
    features path of the evaluation), as plan_learn plans them from the step times measured here;
    NOT RUN for each method whose need does not fit, a line per run against the target. The dry
    run, on a few tiny images, runs one epoch of each method that `assumed` (the GPU's plan at its
    assumed step) runs, and checks only that the figures come back."""
    if not data:
        checks.add("learn", "Fashion-MNIST", "SKIP", detail="no --fashion-mnist DIR given")
        return {}
    t_part = time.perf_counter()
    if dry_run:  # a few hundred images: the whole chain of commands, in seconds on a CPU
        data = str(subset_fashion_mnist(data, out / "learn-data", 320, 100))
    batch, size = (32, 16) if dry_run else (LEARN_BATCH, 32)
    per_epoch = len(load_fashion_mnist(fashion_mnist_root(data), "train")[1]) // batch
    if dry_run:
        plan = [{**p, "step_ms": 1000 * learn_step_seconds(p["method"], data, batch, size, device, 3, dry_run),
                 "steps_per_epoch": per_epoch, "epochs": 1, "steps": per_epoch} if p["run"] else p for p in assumed]
        print(plan_line("learn dry run on this CPU (one epoch of each method the GPU plan runs)", plan, batch,
                        "measured", needs=False), flush=True)
    else:
        measured = {m: learn_step_seconds(m, data, batch, size, device, 15, dry_run) for m in methods}
        left = budget - (time.perf_counter() - t_part)
        plan = plan_learn(methods, measured, left, per_epoch)
        print(plan_line(f"learn plan from the measured steps ({left:.0f}s left)", plan, batch, "measured")
              + " (assumed before measuring: " + ", ".join(f"{METHOD_NAMES[m]} {1000 * ASSUMED_GPU_STEP_S[m]:.1f} ms"
                                                          for m in methods) + ")", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what this process cached is the runs' to use
    figures: dict = {"plan": plan}
    for p in plan:
        if not p["run"]:
            checks.add("learn", METHOD_NAMES[p["method"]], "NOT RUN",
                       detail=f"needs {p['need_s']:.0f}s ({LEARN_OVERHEAD_S:.0f}s + {p['min_epochs']} epochs x "
                       f"{p['steps_per_epoch']} steps at {p['step_ms']:.1f} ms x {LEARN_STEP_SLACK:g}), "
                       f"{p['available_s']:.0f}s left: its target is out of reach in this run")
    runs = [p for p in plan if p["run"]]
    results_dir = out / "learn"
    for i, p in enumerate(runs):
        method, epochs = p["method"], p["epochs"]
        left = budget - (time.perf_counter() - t_part)
        # its share and what the runs before it saved; the dry run (one epoch, not planned): an equal part
        limit = left / (len(runs) - i) if dry_run else left - sum(q["share_s"] for q in runs[i + 1 :])
        cmd = [sys.executable, "tools/fmnist_benchmark.py", "--method", method, "--data", data, "--epochs", str(epochs),
               "--eval", "features", "--knn-every", str(epochs), "--out", str(out / "learn-runs"),
               "--results-dir", str(results_dir), "--device", device.type, "--pretrain-args",
               "-b", str(batch), "--image-size", str(size), "--save-every-epochs", str(epochs),
               "--save-freq", str(epochs)]
        cmd += ["-j", "0", "--mlp-dim", "32"] if dry_run else ["--amp", "bf16", "--channels-last"]
        code, took = run_logged(cmd, out / f"learn-{method}.log", {}, limit)
        result_file = results_dir / f"results_{method}.json"
        if code != 0 or not result_file.exists():
            reached = epochs_reached(out / "learn-runs" / method / "pretrain")
            why = f"over its {limit:.0f}s" if code is None else f"exit {code}"
            checks.add("learn", f"{METHOD_NAMES.get(method, method)}", "FAIL", took,
                       f"{why} after {reached} of {epochs} pretraining epochs; see learn-{method}.log")
            continue
        r = json.loads(result_file.read_text())
        row = learn_row(r)
        row["overhead_s"] = took - 60 * r["pretrain_min"]  # what LEARN_OVERHEAD_S estimates
        figures[method] = row
        short = [f"{k} {row['margin_' + k]:+.2f}" for k in ("knn", "linear") if row["margin_" + k] < LEARN_MARGIN]
        # The run worked either way; a target missed is a finding about the recipe (MISS), not a failure.
        checks.add("learn", f"{r['name']}: {r['steps']} steps, {r['epochs']} epochs", "PASS" if dry_run or not short
                   else "MISS", took, f"kNN {row['knn']:.2f}, linear {row['linear']:.2f}; above the better baseline "
                   f"{row['margin_knn']:+.2f} / {row['margin_linear']:+.2f}"
                   + (f" (target +{LEARN_MARGIN:g}: {', '.join(short)})" if short and not dry_run else ""))
    return figures


def subset_fashion_mnist(data: str, folder: Path, n_train: int, n_test: int) -> Path:
    """The first images of each Fashion-MNIST split as idx files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    root = fashion_mnist_root(data)
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x, y = load_fashion_mnist(root, split)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x[:n])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y[:n])
    return folder


def learn_row(r: dict) -> dict:
    """One method's figures from its results JSON: kNN (T = 0.1) and linear top-1, both baselines,
    and the margins over the better one."""
    row = {"steps": r["steps"], "epochs": r["epochs"], "pretrain_min": r["pretrain_min"],
           "knn": r["pretrained"]["knn_t0.1"], "linear": r["pretrained"]["linear"],
           "random_init": r["random_init"], "raw_pixels": r["raw_pixels"]}
    for key, measure in (("knn", "knn_t0.1"), ("linear", "linear")):
        row["margin_" + key] = row[key] - max(r["random_init"][measure], r["raw_pixels"][measure])
    return row


def epochs_reached(run: Path) -> int:
    """Pretraining epochs a (possibly cut) run finished, from its metrics.jsonl."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return len({json.loads(line)["epoch"] for line in lines if line.strip() and '"epoch"' in line})


# ---------------------------------------------------------------------------------------------- main


def plan_budgets(parts: list[str], scale: float = 1.0) -> tuple[dict[str, float], dict[str, str]]:
    """Each selected part's budget (times `scale`), in PARTS' order, and the parts dropped up front
    with why: the fixed budgets are kept in PARTS' order while they fit in TOTAL_S, so a part is
    never planned into time it cannot have; learn gets what the kept ones leave."""
    budgets: dict[str, float] = {}
    dropped: dict[str, str] = {}
    for part in PARTS:
        if part not in parts or BUDGET_S[part] is None:
            continue
        left = TOTAL_S - sum(budgets.values())
        if BUDGET_S[part] > left:
            dropped[part] = (f"its {BUDGET_S[part]}s budget does not fit in the {left}s the parts before it leave of "
                             f"{TOTAL_S}s; run it on its own (--part {part})")
        else:
            budgets[part] = BUDGET_S[part]
    if "learn" in parts:
        budgets["learn"] = TOTAL_S - sum(budgets.values())
    return {part: budgets[part] * scale for part in PARTS if part in budgets}, dropped


def markdown(env: dict, checks: Checks, figures: dict, wall: float) -> str:
    versions = ", ".join(f"{name} {env[key]}" for key, name in (("torch", "torch"), ("torchvision", "torchvision"),
                                                                  ("python", "Python"), ("cuda", "CUDA"),
                                                                  ("cudnn", "cuDNN"), ("nccl", "NCCL")) if env.get(key))
    machine = env.get("gpu", env.get("device", "?")) + (f", {env['gpu_memory_gib']} GiB" if "gpu_memory_gib" in env else "")
    lines = ["# tools/gpu_check.py", "",
             f"{machine}; {versions or 'versions unknown'}; {env.get('cpu_count', '?')} CPUs. "
             f"{wall / 60:.1f} min in all, {checks.failed} failed."
             + (f" Environment probe failed: {env['error']}" if "error" in env else ""), "",
             "| part | check | status | s |", "|---|---|---|---|"]
    for r in checks.rows:
        detail = f" ({r['detail']})" if r["detail"] else ""
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['part']} | {r['name']}{detail} | {r['status']} | {seconds} |")
    if figures.get("bench"):
        lines += ["", "bench: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in figures["bench"].items())]
    rows = [(m, r) for m, r in (figures.get("learn") or {}).items() if m != "plan"]
    if rows:
        lines += ["", "| method | steps | epochs | kNN T=0.1 | linear | random init kNN / linear | raw pixels kNN / linear "
                  "| vs better baseline |", "|---|---|---|---|---|---|---|---|"]
        for m, r in rows:
            ri, px = r["random_init"], r["raw_pixels"]
            lines.append(f"| {METHOD_NAMES.get(m, m)} | {r['steps']} | {r['epochs']} | {r['knn']:.2f} | {r['linear']:.2f} "
                         f"| {ri['knn_t0.1']:.2f} / {ri['linear']:.2f} | {px['knn_t0.1']:.2f} / {px['linear']:.2f} "
                         f"| {r['margin_knn']:+.2f} / {r['margin_linear']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="where gpu_check.json, gpu_check.md and the logs go")
    p.add_argument("--part", nargs="+", choices=PARTS, default=None,
                   help=f"parts to run (default: {' '.join(DEFAULT_PARTS)}; compile runs on its own)")
    p.add_argument("--learn-methods", nargs="+", choices=learn_methods(), default=list(LEARN_DEFAULT),
                   help=f"learn's methods, in order of priority (default: {' '.join(LEARN_DEFAULT)}); one whose "
                   "LEARN_MIN_EPOCHS do not fit in what the others leave is named, not run")
    p.add_argument("--fashion-mnist", default=None, metavar="DIR", help="Fashion-MNIST idx files, for the learn part")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny sizes (the test suite)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run to exercise the command on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    configure_kernels(deterministic=False)  # what main_pretrain.py does without --deterministic
    out = Path(args.out).resolve()  # the parts' commands run in the repository
    if args.fashion_mnist and args.fashion_mnist != FASHION_MNIST_NAME and Path(args.fashion_mnist).exists():
        args.fashion_mnist = str(Path(args.fashion_mnist).resolve())
    out.mkdir(parents=True, exist_ok=True)
    try:
        env = environment(device)
    except Exception as e:  # report it, and still run the parts
        env = {"device": str(device), "error": f"{type(e).__name__}: {e}"}
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    scale = DRY_RUN_SLOWDOWN if args.dry_run else 1
    (budgets, dropped), total = plan_budgets(args.part or list(DEFAULT_PARTS), scale), TOTAL_S * scale
    if args.part is None:
        dropped["compile"] = (f"not in the default plan: its two cold torch.compile runs need "
                              f"{BUDGET_S['compile']}s, and the default parts take all {TOTAL_S}s (learn what smoke "
                              "and bench leave); run it on its own (--part compile)")
    print(f"gpu_check plan ({total}s in all{f', the dry run: x{scale}' if args.dry_run else ''}): "
          + ", ".join(f"{part} {b:.0f}s" for part, b in budgets.items()), flush=True)
    checks, figures = Checks(), {"environment": env, "budgets": budgets, "dropped": dropped}
    for part, why in dropped.items():
        checks.add(part, "part", "SKIP", detail=f"dropped from the plan: {why}")
    if "learn" in budgets:  # before anything runs: what the GPU run will do at the step time it assumes
        figures["learn_plan_assumed"] = assumed = assumed_learn_plan(args.learn_methods, budgets["learn"] / scale)
        print(plan_line(f"learn plan at the GPU step assumed before measuring (ASSUMED_GPU_STEP_S; "
                        f"{budgets['learn'] / scale:.0f}s on the GPU, Fashion-MNIST's {FASHION_MNIST_TRAIN} images)",
                        assumed, LEARN_BATCH, "assumed"), flush=True)
    for part, budget in budgets.items():
        t0 = time.perf_counter()
        budget = min(budget, total - (t0 - t_start) - sum(b for q, b in budgets.items()
                                                          if PARTS.index(q) > PARTS.index(part) and q != "learn"))
        print(f"--- {part} (budget {budget:.0f}s)", flush=True)
        try:
            if budget < 20:
                checks.add(part, "part", "SKIP", detail=f"only {budget:.0f}s of the {total}s left")
            elif part == "smoke":
                cuda_tests(checks, "smoke", "not compile", out, args.dry_run, budget)
            elif part == "bench":
                figures["bench"] = bench(checks, out, device, args.dry_run, budget)
            elif part == "learn":
                figures["learn"] = learn(checks, out, args.fashion_mnist, device, args.dry_run, budget,
                                         args.learn_methods, figures["learn_plan_assumed"])
            else:
                cuda_tests(checks, "compile", "compile", out, args.dry_run, budget)
        except Exception as e:  # one part failing must not hide the others' results
            checks.add(part, "part", "FAIL", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
        took = time.perf_counter() - t0
        print(f"--- {part}: {took:.0f}s of {budget:.0f}s", flush=True)
    wall = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps({**figures, "checks": checks.rows, "wall_s": wall,
                                                    "dry_run": args.dry_run}, indent=1))
    (out / "gpu_check.md").write_text(markdown(env, checks, figures, wall))
    print(f"gpu_check: {len(checks.rows)} checks, {checks.failed} failed, {wall:.0f}s; {out / 'gpu_check.md'}",
          flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
