#!/usr/bin/env python
"""Check every GPU path on a machine with one GPU, in one command of at most 8 minutes.

    python tools/gpu_check.py --out runs/gpu-check --fashion-mnist DIR      # every part
    python tools/gpu_check.py --part smoke bench                            # some parts
    python tools/gpu_check.py --dry-run --out /tmp/gpu-check                # the same code on the CPU, tiny

It needs only torch and torchvision (and pytest for smoke and compile) where it runs: a plain
clone, the project not installed. Parts, in the order of what would stop a user first, each
given its own budget (the parts run as subprocesses are stopped at it), PASS / FAIL / SKIP lines
as they come:

  smoke (<= 180 s)  `pytest -m cuda -k "not compile" tests/test_cuda.py`: every entry point for a few
                    steps on the GPU first (main_pretrain.py per method; torchrun with NCCL at world
                    size 1; a kill and a bitwise resume with --deterministic; --amp bf16 with the
                    batched pipeline; main_lincls.py, main_knn.py, detection; two gloo processes on one
                    GPU), then the kernels (the collectives on an NCCL group, bf16/fp16 steps against
                    fp32, SyncBN, channels_last, the batched augmentation against the CPU path).
  bench (<= 75 s)   MoCo v2 ResNet-50 at 224 px: the training step on synthetic input (fp32, bf16 +
                    channels_last), MoCo v3 ViT-S/16's bf16 step at batch 128, the ResNet step
                    through the engine, and the whole input pipeline.
  learn (the rest)  Fashion-MNIST (--fashion-mnist DIR): each method's small-image preset at batch
                    512, bf16, channels_last, sized in optimizer steps - each method gets an equal
                    share of the part's time, its step time measured first - with the online kNN and the checkpoint
                    at the end only, then kNN and linear top-1 from features cached on the GPU against
                    both baselines measured in the same run (tools/fmnist_benchmark.py --eval features).
                    Target: each method 3 points above the better baseline on both (a miss is
                    reported as MISS, not a failure: the run worked, the recipe fell short).
  compile (<= 45 s) `pytest -m cuda -k compile`: torch.compile'd networks against eager ones and a
                    --compile run of main_pretrain.py; optional, so last (cut by its budget: CUT).

The plan (every part's budget, learn's steps per method) is printed before anything runs, so a
cut run says how far it got. Writes OUT/gpu_check.json (every figure and check) and OUT/gpu_check.md
(a summary to paste). --dry-run runs the same code on the CPU with tiny sizes (gloo instead of
NCCL); the test suite runs it so the command cannot rot between GPU runs. Exit status 0 when
nothing failed.
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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

import benchmark  # noqa: E402
from fmnist_benchmark import NAMES as METHOD_NAMES  # noqa: E402
from selfsup import recipes  # noqa: E402
from selfsup.builder import build_model  # noqa: E402
from selfsup.data import FASHION_MNIST_NAME, fashion_mnist_root, load_fashion_mnist, write_idx  # noqa: E402
from selfsup.distributed import DistInfo, configure_kernels  # noqa: E402
from selfsup.engine import StepContext, train_one_epoch  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402
from selfsup.optim import build_optimizer  # noqa: E402

PARTS = ("smoke", "bench", "learn", "compile")
TOTAL_S = 480  # the whole command: 8 minutes of the lease's 15 (a machine's start takes 1-2)
BUDGET_S = {"smoke": 180, "bench": 75, "learn": None, "compile": 45}  # learn: what is left, less compile's
OPTIONAL_PARTS = ("compile",)  # cut by its budget: CUT, not FAIL (a cold compile can take minutes)
LEARN_BATCH = 512
# Per method, beyond its pretraining steps: starting two processes and CUDA, the data to the GPU,
# the final online kNN and checkpoint, two feature extractions, the raw-pixel baseline and three
# linear fits. An estimate until a GPU run measures it.
LEARN_OVERHEAD_S = 40.0
# The calibration times the step on synthetic views; the real step also augments them on the GPU,
# about as many kernel launches again as a step (counted on the CPU), more for SimCLR's short step.
AUGMENT_FACTOR = 2.0
# --dry-run: the same processes on a CPU (2 cores in CI) without a GPU take longer than the real
# sizes on the GPU machine; its budgets are these times longer.
DRY_RUN_SLOWDOWN = 3

# What each method should reach: this many points above the better of the two baselines, on kNN
# (T = 0.1) and linear top-1. Unmeasured until a GPU run.
LEARN_MARGIN = 3.0


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
    if code is None:  # an optional part cut by its budget says so without failing the command
        checks.add(part, f"pytest -k {selector!r}", "CUT" if part in OPTIONAL_PARTS else "FAIL", took,
                   f"over its {budget:.0f}s budget after {len(results)} tests; stopped (see {log.name})")
    elif code == 5 and not results:  # nothing selected: every test of the part skipped or deselected
        checks.add(part, f"pytest -k {selector!r}", "SKIP", took, "no test ran")
    else:
        checks.add(part, f"pytest -k {selector!r}: {len(results)} tests", "PASS" if code == 0 and results else "FAIL",
                   took, "" if code == 0 else f"exit {code}, see {log.name}")


# ---------------------------------------------------------------------------------------------- bench


def bench(checks: Checks, out: Path, device: torch.device, dry_run: bool, budget: float) -> dict:
    """Step throughput (synthetic), through the engine, and the whole input pipeline."""
    t_part = time.perf_counter()
    # 16: the small-moco options split BN 8 ways, and BatchNorm needs 2 samples a split
    arch, size, batch, steps = ("resnet18", 32, 16, 2) if dry_run else ("resnet50", 224, 256, 10)
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

    # MoCo v3 ViT-S/16 at 224 px, bf16, 128 a GPU (mocov3-vit-small-b1024 on 8 GPUs)
    t0 = time.perf_counter()
    vit, vit_size, vit_batch = ("vit_small_p4", 32, 4) if dry_run else ("vit_small", 224, 128)
    rates = benchmark.train_step(report, "mocov3", vit, vit_size, vit_batch, device, ["bf16"], steps,
                                 preset="mocov3-vit-small")
    figures.update(vit_arch=vit, vit_image_size=vit_size, vit_batch=vit_batch, vit_step_bf16_img_s=rates["bf16"])
    checks.add("bench", f"MoCo v3 {vit} {vit_size}px b{vit_batch} bf16 step: {rates['bf16']:.0f} img/s", "PASS",
               time.perf_counter() - t0)

    t0 = time.perf_counter()
    model = build_model("moco", arch, K=4096, mlp=True, T=0.2)
    figures["engine_img_s"] = batch / step_seconds(model, "sgd", 0.03, size, batch, device, 3 if dry_run else 20)
    checks.add("bench", f"bf16+channels_last through train_one_epoch (one fused check per step): "
               f"{figures['engine_img_s']:.0f} img/s", "PASS", time.perf_counter() - t0)

    left = budget - (time.perf_counter() - t_part)
    if left < 40 and not dry_run:
        checks.add("bench", "input pipeline", "SKIP", detail=f"{left:.0f}s of the part's budget left")
        return figures
    t0 = time.perf_counter()
    workers = 1 if dry_run else max(1, (os.cpu_count() or 2) - 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = benchmark.make_imagenet_like(Path(tmp) / "jpegs", 32 if dry_run else 1024)
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


def step_seconds(model: torch.nn.Module, optimizer: str, lr: float, size: int, batch: int, device: torch.device,
                 steps: int, **optim_options) -> float:
    """Seconds per optimizer step of `model` (bf16 on a GPU, channels_last) through
    train_one_epoch, on synthetic batches already on the device: the engine's step without the
    input pipeline. The first of two rounds warms up (cuDNN's autotuner, the allocator)."""
    model = model.to(device, memory_format=torch.channels_last)
    opt = build_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, 0.9, 1e-4,
                          **optim_options)
    views = [torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last) for _ in range(2)]
    amp = "bf16" if device.type == "cuda" else "none"
    batches = [(views, torch.zeros(batch), torch.zeros(batch, dtype=torch.long))] * steps
    ctx = StepContext(epochs=1, steps_per_epoch=steps, base_lr=lr, cos=True, schedule=[],
                      warmup_epochs=0.0, amp=amp, print_freq=10**9, global_batch=batch,
                      dist=DistInfo(device=device))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    times = []
    for _ in range(2):
        benchmark.sync(device)
        t0 = time.perf_counter()
        train_one_epoch(model, batches, lambda v, e, s: v, opt, scaler, 0, 0, ctx)
        benchmark.sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return times[-1]


# ---------------------------------------------------------------------------------------------- learn


def learn_methods() -> list[str]:
    """The methods with a small-image preset (small-<method>), in METHODS' order."""
    return [m for m in METHODS if f"small-{m}" in recipes.PRESETS]


def plan_learn(data: str, device: torch.device, budget: float, dry_run: bool) -> list[dict]:
    """Steps per method: each method gets an equal share (1/len) of `budget`; its step is timed here on
    synthetic views (the preset's model and optimizer at batch LEARN_BATCH), and what remains of
    its share after LEARN_OVERHEAD_S becomes whole epochs of steps, at least one."""
    methods = learn_methods()
    batch, size = (32, 16) if dry_run else (LEARN_BATCH, 32)
    n_train = len(load_fashion_mnist(fashion_mnist_root(data), "train")[1])
    per_epoch = n_train // batch
    share = budget / len(methods)
    plan = []
    for method in methods:
        cfg = recipes.resolve(method, f"small-{method}", False, {"batch_size": batch, "image_size": size,
                                                                 **({"mlp_dim": 32} if dry_run else {})})
        torch.manual_seed(0)
        model = build_model(method, cfg["arch"], small_stem=cfg["small_stem"], **METHODS[method].options(cfg))
        step_s = step_seconds(model, cfg["optimizer"], cfg["lr"], size, batch, device, 3 if dry_run else 15,
                              classic_momentum=cfg["classic_momentum"], trust_coefficient=cfg["lars_eta"])
        del model
        steps = int(max(0.0, share - LEARN_OVERHEAD_S) / (step_s * AUGMENT_FACTOR))
        epochs = 1 if dry_run else max(1, steps // per_epoch)
        plan.append({"method": method, "share_s": share, "step_ms": 1000 * step_s, "steps_per_epoch": per_epoch,
                     "epochs": epochs, "steps": epochs * per_epoch, "batch_size": batch, "image_size": size})
    return plan


def learn(checks: Checks, out: Path, data: str | None, device: torch.device, dry_run: bool, budget: float) -> dict:
    """Each method's small-image preset through tools/fmnist_benchmark.py (main_pretrain.py, then
    the features path of the evaluation), as planned by plan_learn; a line per method against
    the target (the dry run, on a few tiny images, checks only that the figures come back)."""
    if not data:
        checks.add("learn", "Fashion-MNIST", "SKIP", detail="no --fashion-mnist DIR given")
        return {}
    t_part = time.perf_counter()
    if dry_run:  # a few hundred images: the whole chain of commands, in seconds on a CPU
        data = str(subset_fashion_mnist(data, out / "learn-data", 320, 100))
    plan = plan_learn(data, device, budget - 5 * len(learn_methods()), dry_run)  # the calibration's own time
    print("learn plan: " + "; ".join(f"{METHOD_NAMES.get(p['method'], p['method'])} {p['steps']} steps = "
                                     f"{p['epochs']} epochs x {p['steps_per_epoch']} at batch {p['batch_size']} "
                                     f"({p['step_ms']:.1f} ms/step measured)" for p in plan), flush=True)
    figures: dict = {"plan": plan}
    results_dir = out / "learn"
    for i, p in enumerate(plan):
        method, epochs = p["method"], p["epochs"]
        limit = (budget - (time.perf_counter() - t_part)) / (len(plan) - i)  # an equal share of what is left
        cmd = [sys.executable, "tools/fmnist_benchmark.py", "--method", method, "--data", data, "--epochs", str(epochs),
               "--eval", "features", "--knn-every", str(epochs), "--out", str(out / "learn-runs"),
               "--results-dir", str(results_dir), "--device", device.type, "--pretrain-args",
               "-b", str(p["batch_size"]), "--image-size", str(p["image_size"]), "--save-every-epochs", str(epochs),
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


def plan_budgets(parts: list[str], scale: float = 1.0) -> dict[str, float]:
    """Each selected part's budget (times `scale`); learn gets what the others leave of TOTAL_S."""
    budgets = {part: BUDGET_S[part] for part in parts if BUDGET_S[part] is not None}
    if "learn" in parts:
        budgets["learn"] = TOTAL_S - sum(budgets.values())
    return {part: budgets[part] * scale for part in PARTS if part in budgets}


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
    p.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
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
    budgets, total = plan_budgets(args.part, scale), TOTAL_S * scale
    print(f"gpu_check plan ({total}s in all{f', the dry run: x{scale}' if args.dry_run else ''}): "
          + ", ".join(f"{part} {b:.0f}s" for part, b in budgets.items()), flush=True)
    checks, figures = Checks(), {"environment": env, "budgets": budgets}
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
                figures["learn"] = learn(checks, out, args.fashion_mnist, device, args.dry_run, budget)
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
