#!/usr/bin/env python
"""Throughput of the input pipeline and of the training step, each next to the reference.

    python tools/benchmark.py --quick              # a few minutes on a CPU
    python tools/benchmark.py                      # more images and configurations
    python tools/benchmark.py --json out.json      # also write the figures
    python tools/benchmark.py --device cuda        # GPU augmentation, bf16 steps, 16-worker pipeline

It writes its own ImageFolder of ImageNet-like JPEGs (about 500x375, quality 90: gradients,
cloud-like texture, shapes, sensor noise) under --data (default runs/benchmark-data), so anyone
can rerun it from a fresh clone. Sections, each with the reference measured in the same run:

  (a) the loader's CPU half per worker: decode + both crops as uint8 (selfsup.data.crops) against the
      reference per-image pipeline (PIL + torchvision v1, both views, as facebookresearch/moco);
  (b) the full augmentation on the current device: CPU half + batched colour half, and images
      held in memory at 32 px, against the reference;
  (c) the training step per method/arch/resolution/precision with synthetic input, against fp32;
  (d) end-to-end epochs through main_pretrain's pipeline and train_one_epoch, against the
      reference backend.

Timings alternate between the two sides of each comparison and report medians, so a busy
machine slows both alike; "per core" figures run with one thread. The performance targets
(docs/PERFORMANCE.md) are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

from selfsup import recipes  # noqa: E402
from selfsup.backbones import flag_options as backbone_flag_options  # noqa: E402
from selfsup.builder import build_model  # noqa: E402
from selfsup.data import ImageDataset, find_samples, load_fashion_mnist  # noqa: E402
from selfsup.data.augmentations import build_multi_crop_transform, get_preset  # noqa: E402
from selfsup.data.batch_augment import ViewsAugment  # noqa: E402
from selfsup.data.crops import CropsDataset  # noqa: E402
from selfsup.data.inmemory import InMemoryImages  # noqa: E402
from selfsup.data.pipeline import build_memory_pipeline, build_pretrain_pipeline  # noqa: E402
from selfsup.distributed import DistInfo  # noqa: E402
from selfsup.engine import StepContext, train_one_epoch  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402
from selfsup.optim import build_optimizer  # noqa: E402
from selfsup.rng import augment_generator, seeded  # noqa: E402

# ---------------------------------------------------------------------------------------------- data


GENERATOR_VERSION = 2  # bump when natural_image changes: cached folders are then rewritten


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth gradient, 1/f ("cloud") texture, a few textured shapes,
    optical blur and sensor noise - JPEG statistics close to ImageNet's, unlike random noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx / width + np.sin(angle) * yy / height
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    img = rng.uniform(0, 255, 3) * (1 - t[..., None]) + rng.uniform(0, 255, 3) * t[..., None]

    def clouds(strength: float, roughness: float) -> np.ndarray:
        """Random texture with a 1/f^roughness amplitude spectrum (natural images: about 1)."""
        fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
        amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height)) ** roughness
        spectrum = amplitude * np.exp(2j * np.pi * rng.uniform(size=amplitude.shape))
        field = np.fft.irfft2(spectrum, s=(height, width))
        return strength * field / (field.std() + 1e-9)

    img = img + clouds(rng.uniform(15, 35), 1.5)[..., None] * rng.uniform(0.5, 1.0, 3)
    img = img + clouds(rng.uniform(14, 30), 0.5)[..., None] * rng.uniform(0.5, 1.0, 3)  # foliage-like grain
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    for _ in range(rng.integers(6, 20)):
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        x0, y0 = rng.uniform(-0.2, 0.9) * width, rng.uniform(-0.2, 0.9) * height
        size = rng.uniform(0.03, 0.5) * min(width, height)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + size, y0 + size * rng.uniform(0.5, 1.5)], fill=255)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + size * rng.uniform(0.5, 1.5), y0 + size], fill=255)
        else:
            draw.polygon([tuple(p) for p in rng.uniform(0, 1, (rng.integers(3, 6), 2)) * [width, height]], fill=255)
        grain = clouds(rng.uniform(15, 45), rng.uniform(0.7, 1.3))[..., None]
        texture = rng.uniform(0, 255, 3) + grain * rng.uniform(0.3, 1.0, 3)
        fill = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))
        canvas.paste(fill, (0, 0), mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0))))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    a = np.asarray(canvas).astype(np.float32)
    a += rng.normal(0, rng.uniform(2, 5), (height, width, 1)) + rng.normal(0, 2, (height, width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _write_image(job: tuple[str, int, int, int]) -> None:
    path, seed, width, height = job
    natural_image(np.random.default_rng(seed), width, height).save(path, quality=90)


def make_imagenet_like(root: Path, n: int, seed: int = 0) -> Path:
    """`n` JPEGs (quality 90) in 4 class folders, written in parallel; an existing complete
    folder of the same size is reused."""
    marker = root / f".complete-v{GENERATOR_VERSION}-{n}-{seed}"
    if marker.exists() and len(list(root.glob("class*/*.jpg"))) == n:
        return root
    for old in [*root.glob("class*/*.jpg"), *root.glob(".complete-*")]:
        old.unlink()
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (500, 500)]
    jobs = []
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = sizes[rng.integers(len(sizes))]
        jobs.append((str(folder / f"{i:05d}.jpg"), seed * 1_000_003 + i, w, h))
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(_write_image, jobs, chunksize=4)
    marker.touch()
    return root


def small_dataset(n: int) -> tuple[np.ndarray, str]:
    """Fashion-MNIST's training images when installed, else 28x28 images made like them."""
    try:
        x, _ = load_fashion_mnist(None, "train")
        return x[:n], "Fashion-MNIST"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        imgs = [np.asarray(natural_image(rng, 56, 56).convert("L").resize((28, 28), Image.BILINEAR)) for _ in range(n)]
        return np.stack(imgs), "generated 28x28 gray images"


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run each callable (which returns a rate) `rounds` times, interleaved; median per key."""
    results: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            results[k].append(fn())
    return {k: statistics.median(v) for k, v in results.items()}


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, section: str, config: str, ours: float, ref: float | None, ref_name: str,
            unit: str = "img/s") -> None:
        ratio = ours / ref if ref else None
        self.rows.append({"section": section, "config": config, "ours": ours, "reference": ref,
                          "reference_name": ref_name, "ratio": ratio, "unit": unit})
        r = f"{ratio:5.2f}x" if ratio is not None else "   -  "
        print(f"  {section:3s} {config:66s} {ours:9.1f} {unit}  vs {ref_name} {ref or float('nan'):9.1f}  {r}",
              flush=True)

    def get(self, section: str, config_prefix: str) -> dict | None:
        return next((r for r in self.rows if r["section"] == section and r["config"].startswith(config_prefix)), None)


# ---------------------------------------------------------------------------------------------- sections


def loader_half(report: Report, samples, classes, size: int, aug: str, rounds: int, tag: str = "",
                draft: bool = True) -> dict:
    """(a) per-worker rates of the reference per-image pipeline and of the CPU half; keeps the
    CPU half's views for (b)."""
    preset = get_preset(aug, size)
    ref = ImageDataset(samples, build_multi_crop_transform(preset, size), classes)
    ours = CropsDataset(samples, preset, size, classes, draft=draft)
    n = len(samples)
    kept: dict[str, list] = {}

    def run_ref() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            ref[(i, i)]
        return n / (time.perf_counter() - t0)

    def run_ours() -> float:
        t0 = time.perf_counter()
        kept["views"] = [ours[(i, i)][0] for i in range(n)]
        return n / (time.perf_counter() - t0)

    rates = alternate({"ref": run_ref, "ours": run_ours}, rounds)
    report.add("a", f"CPU half per worker, {aug} at {size}px{tag}", rates["ours"], rates["ref"], "reference")
    return {"ref": rates["ref"], "half": rates["ours"], "views": kept["views"]}


def colour_half_rate(views: list, aug: str, size: int, device: torch.device, batch: int, rounds: int) -> float:
    """Images/s (both views) of the batched colour half on `device`, uint8 batches in."""
    augment = ViewsAugment(get_preset(aug, size), size).to(device)
    batch = min(batch, len(views))
    batches = []
    for s in range(0, len(views) - batch + 1, batch):
        batches.append([torch.stack([v[k] for v in views[s : s + batch]]) for k in (0, 1)])
    if device.type == "cuda":
        batches = [[b.pin_memory() for b in pair] for pair in batches]

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        for step, pair in enumerate(batches):
            augment([b.to(device, non_blocking=True) for b in pair], augment_generator(0, 0, step, 0))
        sync(device)
        return len(batches) * batch / (time.perf_counter() - t0)

    run()  # warm-up (CUDA context, allocator)
    return statistics.median(run() for _ in range(rounds))


def memory_aug(report: Report, images: np.ndarray, name: str, aug: str, size: int, device: torch.device, rounds: int):
    """(b) images held in memory (32 px): batched crops + colour on the device vs the reference
    per-image transform on PIL images already decoded."""
    n = len(images)
    pil = [Image.fromarray(a).convert("RGB") for a in images]
    transform = build_multi_crop_transform(aug, size)
    pipeline = build_memory_pipeline(InMemoryImages(images), aug=aug, image_size=size, batch_size=256,
                                     dist=DistInfo(device=device), seed=0)

    def run_ref() -> float:
        t0 = time.perf_counter()
        for i, img in enumerate(pil):
            with seeded(i):
                transform(img)
        return n / (time.perf_counter() - t0)

    def run_ours() -> float:
        pipeline.sampler.set_epoch(0)
        sync(device)
        t0 = time.perf_counter()
        count = 0
        for step, (idx, _, _) in enumerate(pipeline.loader):
            pipeline.views(idx, 0, step)
            count += len(idx)
        sync(device)
        return count / (time.perf_counter() - t0)

    run_ours()
    rates = alternate({"ref": run_ref, "ours": run_ours}, rounds)
    report.add("b", f"in memory, {aug} at {size}px ({name}), on {device.type}", rates["ours"], rates["ref"],
               "reference (decoded PIL)")


def train_step(report: Report, method: str, arch: str, size: int, batch: int, device: torch.device,
               precisions: list[str], steps: int, small_stem: bool = False, preset: str | None = None,
               versus: tuple[str, float] | None = None) -> dict[str, float]:
    """(c) images/s of one optimizer step with synthetic input, per precision, vs fp32 (or vs
    `versus`, a (name, img/s) row of another step); the method with the options (heads, queue,
    momentum, a ViT's stop-grad conv1) of `preset`, by default its small-image one, at this batch.
    The optimizer is SGD whatever the preset's: its update is a small part of these steps."""
    cfg = recipes.resolve(method, preset or recipes.small_preset(method), False,
                          {"batch_size": batch, "arch": arch, "image_size": size})
    options = METHODS[method].options(cfg)
    backbone_options = backbone_flag_options(arch, cfg)
    views = get_preset(cfg["aug"], size, **recipes.aug_options(cfg))  # DINO: its global and local crops
    x = [torch.randn(batch, 3, s, s, device=device) for s in views.sizes(size)]
    rates = {}
    for prec in precisions:
        amp = "bf16" if "bf16" in prec else "none"
        cl = "channels_last" in prec
        torch.manual_seed(0)
        model = build_model(method, arch, small_stem=small_stem, backbone_options=backbone_options,
                            **options).to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.01, 0.9, 1e-4)
        fmt = torch.channels_last if cl else torch.contiguous_format
        inputs = [v.contiguous(memory_format=fmt) for v in x]
        if amp == "bf16":
            inputs = [v.bfloat16() for v in inputs]

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                loss = model(*inputs, return_loss=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            model.before_optimizer_step(opt)  # DINO: each gradient clipped
            opt.step()
            model.after_optimizer_step()  # DINO: the teacher's EMA

        step()
        sync(device)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        rates[prec] = batch / statistics.median(times)
    for prec in precisions:
        ref_name, ref = versus or ("fp32", rates.get("fp32"))
        report.add("c", f"step {method} {arch} {views.describe(size)[3:]} b{batch} {prec} on {device.type}", rates[prec],
                   ref, ref_name)
    return rates


def vit_vs_resnet(report: Report, device: torch.device, batch: int, precisions: list[str], steps: int) -> float:
    """(c) the MoCo v3 step of ViT-Small/16 (mocov3-vit-small's heads, stop-grad conv1) against
    ResNet-50's (mocov3-resnet50's) at 224 px, same batch and precision; returns the ViT's img/s
    in the last precision."""
    resnet = train_step(report, "mocov3", "resnet50", 224, batch, device, precisions, steps, preset="mocov3-resnet50")
    vit = {}
    for prec in precisions:
        vit = train_step(report, "mocov3", "vit_small", 224, batch, device, [prec], steps, preset="mocov3-vit-small",
                         versus=(f"ResNet-50 {prec}", resnet[prec]))
    return vit[precisions[-1]]


def end_to_end(report: Report, data_dir: str, aug: str, size: int, arch: str, batch: int, workers: int,
               device: torch.device, backends: list[str], rounds: int, label: str, amp: str = "none",
               channels_last: bool = False) -> dict[str, float]:
    """(d) images/s of whole epochs (loader + augmentation + step) through main_pretrain's
    pipeline and train_one_epoch, after one warm-up epoch (worker start-up, compilation)."""
    runs = {}
    out_dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    for backend in backends:
        torch.manual_seed(0)
        pipeline = build_pretrain_pipeline(data_dir, aug=aug, image_size=size, batch_size=batch, workers=workers,
                                           dist=DistInfo(device=device), seed=0, backend=backend,
                                           channels_last=channels_last, out_dtype=out_dtype)
        model = build_model("moco", arch, K=4096, mlp=True, T=0.2).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.03, 0.9, 1e-4)
        ctx = StepContext(epochs=100, steps_per_epoch=pipeline.sampler.steps_per_epoch, base_lr=0.03,
                          cos=True, schedule=[], warmup_epochs=0, amp=amp,
                          print_freq=10**9, global_batch=batch, dist=DistInfo(device=device))
        runs[backend] = (pipeline, model, opt, ctx)

    def epoch(backend: str, e: int) -> float:
        pipeline, model, opt, ctx = runs[backend]
        pipeline.sampler.set_epoch(e)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        sync(device)
        t0 = time.perf_counter()
        train_one_epoch(model, pipeline.loader, pipeline.views, opt, scaler, e, 0, ctx)
        sync(device)
        return pipeline.sampler.steps_per_epoch * batch / (time.perf_counter() - t0)

    for backend in backends:
        epoch(backend, 0)
    rates = alternate({b: (lambda b=b, e=iter(range(1, 10**6)): epoch(b, next(e))) for b in backends}, rounds)
    for backend in backends:
        if backend != "reference":
            report.add("d", f"epoch {label}, {arch} {size}px b{batch} {amp}{'+cl' if channels_last else ''}, "
                            f"{workers} worker(s), {runs[backend][0].backend}",
                       rates[backend], rates.get("reference"), "reference backend")
    return rates


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and configurations (a few minutes on a CPU)")
    p.add_argument("--data", default=str(REPO / "runs" / "benchmark-data"), help="where the generated JPEGs go")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers in (d) (default: CPUs - 1 on a CPU-only run, min(16, CPUs) with CUDA)")
    p.add_argument("--sections", default="abcd", help="which sections to run, e.g. 'ab'")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    quick = args.quick
    cpu = torch.device("cpu")
    # One thread per process throughout: per-core figures, and no OpenMP oversubscription when
    # the machine is shared (which slows multi-threaded steps by several times).
    torch.set_num_threads(1)
    rounds = 3 if quick else 5
    n_images = (256 if quick else 1024) if cuda else (48 if quick else 160)
    cpus = os.cpu_count() or 1

    print(f"machine: {platform.processor() or platform.machine()}, {cpus} CPU(s), torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
          + f"; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    data = make_imagenet_like(Path(args.data) / "imagenet-like", n_images)
    samples, classes = find_samples(data)
    sizes = [os.path.getsize(s[0]) for s in samples]
    print(f"data: {len(samples)} JPEGs in {data}, mean {np.mean(sizes) / 1024:.0f} KiB", flush=True)
    report = Report()

    if "a" in args.sections or "b" in args.sections:
        print("(a) loader CPU half per worker (one process, one thread); (b) full augmentation", flush=True)
        ab = samples[: 48 if quick and not cuda else 160]
        half = {aug: loader_half(report, ab, classes, 224, aug, rounds) for aug in (["moco_v2"] if quick else
                                                                                   ["moco_v2", "byol"])}
        for size in ((112,) if quick else (112, 64)):
            loader_half(report, ab, classes, size, "moco_v2", rounds, tag=", JPEG draft where allowed")
            loader_half(report, ab, classes, size, "moco_v2", rounds, tag=", draft off", draft=False)
        if "b" in args.sections:
            for aug, h in half.items():
                colour_cpu = colour_half_rate(h["views"], aug, 224, cpu, 16, rounds)
                full = 1.0 / (1.0 / h["half"] + 1.0 / colour_cpu)
                report.add("b", f"colour half alone, {aug} at 224px, CPU", colour_cpu, h["ref"], "reference")
                report.add("b", f"full augmentation per core, {aug} at 224px, CPU only", full, h["ref"], "reference")
                if cuda:
                    gpu = colour_half_rate(h["views"], aug, 224, device, 64, rounds)
                    report.add("b", f"colour half on the GPU, {aug} at 224px", gpu, h["ref"], "reference per core")
            small, name = small_dataset(1024 if quick else 4096)
            memory_aug(report, small, name, "simclr", 32, cpu, rounds)
            if cuda:
                memory_aug(report, small, name, "simclr", 32, device, rounds)

    if "c" in args.sections:
        print(f"(c) train step, synthetic input, {torch.get_num_threads()} CPU thread(s)", flush=True)
        precs = ["fp32", "fp32+channels_last", "bf16", "bf16+channels_last"]
        steps = 2 if quick else 3
        for size in ((32,) if quick else (32, 64)):
            train_step(report, "moco", "resnet18", size, 16 if quick else 32, cpu, precs, steps)
        if not quick:
            for method in [m for m in METHODS if m != "moco"]:  # MoCo's rows are above
                train_step(report, method, "resnet18", 32, 32, cpu, ["fp32", "bf16+channels_last"], steps)
        # MoCo v3 at ImageNet's size with its own recipes' heads: ViT-S/16 next to ResNet-50.
        vit_vs_resnet(report, cpu, 4 if quick else 8, ["fp32"], steps)
        if cuda:
            for method in METHODS:
                train_step(report, method, "resnet18", 64, 256, device, ["fp32", "bf16+channels_last"], 10)
            train_step(report, "moco", "resnet50", 224, 256, device, precs, 10)
            vit_vs_resnet(report, device, 128, ["bf16"], 10)

    if "d" in args.sections:
        workers = args.workers if args.workers is not None else (min(16, cpus) if cuda else max(1, cpus - 1))
        print(f"(d) end to end: epochs through build_pretrain_pipeline + train_one_epoch, {workers} worker(s)",
              flush=True)
        if cuda:
            end_to_end(report, str(data), "moco_v2", 224, "resnet50", 128, workers, device, ["reference", "auto"],
                       rounds, "ImageNet-like JPEGs", amp="bf16", channels_last=True)
        else:
            end_to_end(report, str(data), "moco_v2", 64, "resnet18", 16, workers, device, ["reference", "auto"],
                       2 if quick else rounds, "ImageNet-like JPEGs")
        small, name = small_dataset(256 if quick else 1024)
        with tempfile.TemporaryDirectory() as tmp:
            for i, a in enumerate(small):
                folder = Path(tmp) / f"c{i % 4}"
                folder.mkdir(exist_ok=True)
                Image.fromarray(a, "L").save(folder / f"{i:05d}.png")
            end_to_end(report, tmp, "moco_v2", 32, "resnet18", 64, workers, device, ["reference", "auto"],
                       2 if quick else rounds, f"{name} PNGs")

    print(f"load average at end {os.getloadavg()[0]:.1f}", flush=True)
    targets = check_targets(report, cuda)
    if args.json:
        figures = {"machine": {"processor": platform.processor() or platform.machine(), "cpus": cpus,
                               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")},
                   "quick": quick, "rows": report.rows, "targets": targets}
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def check_targets(report: Report, cuda: bool) -> list[dict]:
    """The performance targets (docs/PERFORMANCE.md), met or not, from the figures above."""
    out = []

    def target(name: str, value: float | None, need: float, unit: str = "x", why: str = "") -> None:
        if value is None:
            out.append({"target": name, "status": "not measured"})
            print(f"  {name}: not measured")
            return
        met = value >= need
        out.append({"target": name, "value": value, "need": need, "met": met})
        print(f"  {name}: {value:.2f}{unit} (need >= {need:g}{unit}) -> {'MET' if met else 'NOT MET' + why}")

    def ratio(section: str, prefix: str) -> float | None:
        row = report.get(section, prefix)
        return row["ratio"] if row else None

    print("targets (docs/PERFORMANCE.md):")
    target("CPU half >= 4x the reference per core at 224", ratio("a", "CPU half per worker, moco_v2 at 224px"), 4.0)
    target("full augmentation on a CPU-only run >= 1.3x the reference per core",
           ratio("b", "full augmentation per core, moco_v2"), 1.3)
    why = ""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        why = (f" (CPU capability {torch.backends.cpu.get_cpu_capability()}: oneDNN has no bf16 kernels here - they "
               "need AVX-512, and AVX512-BF16/AMX to be fast - so bf16 convolutions fall back to the slow im2col "
               "path, aten::_slow_conv2d_forward)")
    for size in (32, 64):
        target(f"ResNet-18 {size}px MoCo step, bf16+channels_last >= 2x fp32 on the CPU",
               ratio("c", f"step moco resnet18 {size}px b16 bf16+channels_last on cpu")
               or ratio("c", f"step moco resnet18 {size}px b32 bf16+channels_last on cpu"), 2.0, why=why)
    if cuda:
        row = report.get("c", "step moco resnet50 224px b256 bf16+channels_last")
        step = row["ours"] if row else None
        target("MoCo v2 ResNet-50 224 bf16 step >= 3000 img/s (H100, synthetic input)", step, 3000.0, " img/s")
        e2e = report.get("d", "epoch ImageNet-like JPEGs, resnet50 224px")
        target("full pipeline (workers + GPU augmentation) >= 80% of the step",
               e2e["ours"] / step if e2e and step else None, 0.8)
    else:
        print("  GPU targets (MoCo v2 ResNet-50 224 bf16 step >= 3000 img/s on an H100; the full pipeline within 80% "
              "of it): no GPU here; rerun with --device cuda on one")
    return out


if __name__ == "__main__":
    sys.exit(main())
