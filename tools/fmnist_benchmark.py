#!/usr/bin/env python
"""Does it learn? Pretrain on Fashion-MNIST within a fixed CPU budget, then measure the frozen
backbone against two baselines measured in the same run.

    python tools/fmnist_benchmark.py --method simclr              # one method, 30 min budget
    python tools/fmnist_benchmark.py --method all --budget-min 20  # MoCo v2, BYOL and SimCLR in turn
    python tools/fmnist_benchmark.py --method moco --data ~/data   # torchvision's FashionMNIST layout

Data: the 60k training images, held in memory (uint8) and augmented fully batched with the
method's preset (selfsup.pipeline.build_memory_pipeline); the 10k test images for evaluation.
Found in --data (default /usr/share/datasets/fashion-mnist, Debian's `dataset-fashion-mnist`),
as idx files, .gz or torchvision's FashionMNIST/raw.

Budget: a few timed steps on a throwaway copy of the model measure the step time; the run is then
planned as a whole number of steps that fits --budget-min of training (warmup and cosine decay
over exactly those steps), and is cut short if it runs 25% over (a busy machine). Evaluation is not counted in
the budget; the wall time of everything is reported too.

Reported on the test set, for the pretrained backbone and for two baselines:
  * weighted kNN top-1 (k=200) at T=0.1 and at the repository's default T=0.07, with the 60k
    training images as the bank (selfsup.knn.knn_classify);
  * linear-probe top-1: a linear classifier on frozen, standardised features (cached), SGD with
    momentum, cosine schedule, no augmentation;
  * baselines: raw pixels (784-d) and the same network randomly initialised (the model built
    with the same seed, before its first step).
One JSON file per method (--out/<method>/results.json, plus metrics.jsonl that
tools/plot_metrics.py draws) and a summary table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

from selfsup.builder import build_model  # noqa: E402
from selfsup.checkpoint import save_atomic  # noqa: E402
from selfsup.data import FASHION_MNIST_CLASSES as CLASSES  # noqa: E402
from selfsup.data import FASHION_MNIST_DEBIAN, load_fashion_mnist
from selfsup.distributed import DistInfo  # noqa: E402
from selfsup.engine import StepContext, train_one_epoch  # noqa: E402
from selfsup.inmemory import InMemoryImages  # noqa: E402
from selfsup.knn import knn_classify, resnet_features  # noqa: E402
from selfsup.lincls import train_linear_epoch, validate  # noqa: E402
from selfsup.meters import setup_logging  # noqa: E402
from selfsup.monitor import check_collapse  # noqa: E402
from selfsup.networks import unwrap  # noqa: E402
from selfsup.optim import build_optimizer, cosine_lr  # noqa: E402
from selfsup.pipeline import build_memory_pipeline  # noqa: E402
from selfsup.presets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

logger = logging.getLogger("fmnist_benchmark")

# Recipes for ResNet-18 at 32 px on a CPU budget of minutes (a few epochs): the papers' methods
# and augmentations (MoCo v2, BYOL, SimCLR presets), with the queue, momentum, temperature and
# learning rates scaled to 60k images and ~1-3k steps. `lr` is for batch 256.
RECIPES: dict[str, dict] = {
    "moco": {"aug": "moco_v2", "optimizer": "sgd", "lr": 0.06, "wd": 5e-4,
             "model": {"dim": 128, "K": 8192, "m": 0.99, "T": 0.2, "mlp": True, "bn_splits": 8}},
    "byol": {"aug": "byol", "optimizer": "lars", "lr": 0.5, "wd": 1.5e-6,
             "model": {"dim": 128, "hidden_dim": 1024, "m": 0.99, "bn_splits": 1}},
    "simclr": {"aug": "simclr", "optimizer": "lars", "lr": 0.5, "wd": 1e-6,
               "model": {"dim": 128, "hidden_dim": 1024, "T": 0.2, "bn_splits": 1}},
}
METHOD_NAMES = {"moco": "MoCo v2", "byol": "BYOL", "simclr": "SimCLR"}
# The planned steps may take this much longer than the budget (another job slowing the machine)
# before the run is cut short; a cut run has not finished its learning-rate decay and says so.
OVERRUN = 1.25


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="all", choices=[*RECIPES, "all"])
    p.add_argument("--budget-min", default=30.0, type=float, help="minutes of pretraining per method (default 30)")
    p.add_argument("--data", default=FASHION_MNIST_DEBIAN, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--out", default="runs/fmnist-benchmark", help="results, metrics and logs go here")
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("--image-size", default=32, type=int)
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem (about 8x the compute at 32 px)")
    p.add_argument("-b", "--batch-size", default=128, type=int,
                   help="batch size (default 128: on a budget of minutes, more steps beat bigger batches)")
    p.add_argument("--lr", default=None, type=float, help="override the recipe's learning rate (for batch 256)")
    p.add_argument("--warmup-frac", default=0.05, type=float, help="share of the steps spent warming up")
    p.add_argument("--max-epochs", default=None, type=float, help="cap on epochs (default: what the budget allows)")
    p.add_argument("--monitor-every", default=0.5, type=float,
                   help="online kNN (5k-image bank, 1k queries) every this many epochs; 0: off")
    p.add_argument("--probe-epochs", default=50, type=int, help="epochs of the linear probe on cached features")
    p.add_argument("--limit-train", default=None, type=int, help="use only the first N training images (tests)")
    p.add_argument("--limit-test", default=None, type=int, help="use only the first N test images (tests)")
    p.add_argument("--threads", default=None, type=int, help="torch threads (default: all cores)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", default=0, type=int)
    return p


# ---------------------------------------------------------------------------------------------- evaluation


def eval_images(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 N x 1 x H x W -> normalised float N x 3 x S x S, as the evaluation transform does
    (resize without crop for small images, grey to RGB, ImageNet mean/std)."""
    x = x.float().div_(255)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def backbone_features(encoder: torch.nn.Module, images: torch.Tensor, image_size: int, batch: int = 500,
                      channels_last: bool = False) -> torch.Tensor:
    """Pooled features (N x D float32) of a ResNet trunk, in eval mode, for uint8 N x 1 x H x W."""
    trunk = resnet_features(encoder)
    was_training = encoder.training
    encoder.eval()
    out = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for start in range(0, len(images), batch):
            x = eval_images(images[start : start + batch], image_size).contiguous(memory_format=fmt)
            out.append(trunk(x).float())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
             k: int = 200, T: float = 0.1) -> float:
    pred, _ = knn_classify(train_f, train_y, test_f, len(CLASSES), k=k, T=T)
    return 100.0 * (pred == test_y).double().mean().item()


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch: int, g: torch.Generator
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    perm = torch.randperm(len(x), generator=g)
    for start in range(0, len(x) - batch + 1, batch):
        rows = perm[start : start + batch]
        yield x[rows], y[rows]


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 epochs: int, seed: int, lr: float = 0.1, batch: int = 256) -> float:
    """Test top-1 of a linear classifier trained on frozen features.

    Features are standardised with the training set's per-dimension mean and std (a BatchNorm
    without affine, as in MAE's linear probe), so one learning rate suits raw pixels, random and
    pretrained features alike; SGD with momentum 0.9, cosine decay, no weight decay.
    """
    mean, std = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True).clamp_min(1e-6)
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    torch.manual_seed(seed)
    fc = torch.nn.Linear(train_f.shape[1], len(CLASSES))
    optimizer = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9)
    batch = min(batch, len(train_f))
    steps = len(train_f) // batch
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        train_linear_epoch(fc, shuffled_batches(train_f, train_y, batch, g), optimizer,
                           lambda e: cosine_lr(lr, e, epochs), epoch, steps, train_f.device, reduce=False)
    rows = ((test_f[s : s + 1000], test_y[s : s + 1000]) for s in range(0, len(test_f), 1000))
    return validate(fc, rows, train_f.device, reduce=False)["val_acc1"]


def evaluate(name: str, train_f, train_y, test_f, test_y, args) -> dict:
    t0 = time.perf_counter()
    r = {
        "knn_t0.1": knn_top1(train_f, train_y, test_f, test_y, 200, 0.1),
        "knn_t0.07": knn_top1(train_f, train_y, test_f, test_y, 200, 0.07),
        "linear": linear_probe(train_f, train_y, test_f, test_y, args.probe_epochs, args.seed),
        "dim": train_f.shape[1],
    }
    logger.info("%-22s kNN(k=200,T=0.1) %.2f  kNN(T=0.07) %.2f  linear %.2f  (%.0f s)",
                name, r["knn_t0.1"], r["knn_t0.07"], r["linear"], time.perf_counter() - t0)
    return r


# ---------------------------------------------------------------------------------------------- pretraining


class Budgeted:
    """The first `steps` batches of `loader`, ending early once `deadline` (perf_counter) passed."""

    def __init__(self, loader, steps: int, deadline: float) -> None:
        self.loader, self.steps, self.deadline = loader, steps, deadline
        self.ran_out = False
        self.yielded = 0

    def __iter__(self):
        for batch in self.loader:
            if self.yielded >= self.steps:
                return
            if time.perf_counter() > self.deadline:
                self.ran_out = True
                return
            self.yielded += 1
            yield batch


def measure_step_time(model, pipe, optimizer_args: dict, method: str, steps: int = 6) -> float:
    """Seconds per training step (median of `steps` after one warm-up step) on a throwaway copy."""
    trial = copy.deepcopy(model)
    opt = build_optimizer(optimizer_args["name"], trial.parameters(), optimizer_args["lr"],
                          weight_decay=optimizer_args["wd"])
    pipe.sampler.set_epoch(0)
    times = []
    for i, (views, _, _) in enumerate(pipe.loader):
        if i > steps:
            break
        t0 = time.perf_counter()
        views = pipe.views(views, 0, i)
        loss = trial(views[0], views[1], return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def pretrain(method: str, args, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
             y_test: torch.Tensor, out: Path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Pretrain `method` within the budget. Returns (encoder at init, trained encoder, run info)."""
    recipe = RECIPES[method]
    dist = DistInfo()
    torch.manual_seed(args.seed)
    opts = dict(recipe["model"])
    if method == "moco":
        opts["global_batch_size"] = args.batch_size
    model = build_model(method, args.arch, small_stem=args.small_stem, **opts)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    init_encoder = copy.deepcopy(unwrap(model).encoder_q)
    data = InMemoryImages(x_train, y_train, CLASSES)
    pipe = build_memory_pipeline(data, aug=recipe["aug"], image_size=args.image_size, batch_size=args.batch_size,
                                 dist=dist, seed=args.seed, channels_last=args.channels_last,
                                 description="Fashion-MNIST train")
    logger.info("%s: %s", METHOD_NAMES[method], pipe.description)
    lr = (args.lr if args.lr is not None else recipe["lr"]) * args.batch_size / 256
    opt_args = {"name": recipe["optimizer"], "lr": lr, "wd": recipe["wd"]}

    steps_per_epoch = len(pipe.loader)
    step_time = measure_step_time(model, pipe, opt_args, method)
    steps = max(1, int(args.budget_min * 60 / step_time * 0.97))
    if args.max_epochs is not None:
        steps = min(steps, max(1, round(args.max_epochs * steps_per_epoch)))
    epochs = steps / steps_per_epoch
    logger.info("%s: %.3f s/step (batch %d) -> %d steps = %.2f epochs in %.1f min", METHOD_NAMES[method],
                step_time, args.batch_size, steps, epochs, args.budget_min)

    optimizer = build_optimizer(opt_args["name"], model.parameters(), lr, weight_decay=opt_args["wd"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = StepContext(epochs=epochs, steps_per_epoch=steps_per_epoch, base_lr=lr, cos=True,
                      schedule=[], warmup_epochs=args.warmup_frac * epochs, amp="none", print_freq=50, global_batch=args.batch_size, dist=dist)
    # Monitor: a fixed 5k-image bank and 1k queries from the test set (not the reported figures).
    g = torch.Generator().manual_seed(args.seed)
    bank = torch.randperm(len(x_train), generator=g)[:5000]
    queries = torch.arange(min(1000, len(x_test)))
    metrics = open(out / "metrics.jsonl", "w")
    chunk = steps_per_epoch if args.monitor_every <= 0 else max(1, round(args.monitor_every * steps_per_epoch))
    done, train_time = 0, 0.0
    deadline = time.perf_counter() + args.budget_min * 60 * OVERRUN
    ran_out = False
    while done < steps and not ran_out:
        epoch, start = divmod(done, steps_per_epoch)
        n = min(chunk - done % chunk, steps_per_epoch - start, steps - done)
        pipe.sampler.set_epoch(epoch, start)
        batches = Budgeted(pipe.loader, n, deadline)
        t0 = time.perf_counter()
        stats = train_one_epoch(model, batches, pipe.views, optimizer, scaler, epoch, start, ctx)
        train_time += time.perf_counter() - t0
        ran_out = batches.ran_out
        done += batches.yielded
        record = {"epoch": round(done / steps_per_epoch, 4), "step": done, "loss": stats["loss"], "lr": stats["lr"],
                  "momentum": stats["momentum"], "embed_std": stats["embed_std"],
                  "images_per_s": stats["images_per_s"], "train_min": train_time / 60}
        if args.monitor_every > 0:
            enc = unwrap(model).encoder_q
            t1 = time.perf_counter()
            bank_f = backbone_features(enc, x_train[bank], args.image_size, channels_last=args.channels_last)
            query_f = backbone_features(enc, x_test[queries], args.image_size, channels_last=args.channels_last)
            record["knn_top1"] = knn_top1(bank_f, y_train[bank], query_f, y_test[queries], 200, 0.1)
            deadline += time.perf_counter() - t1  # monitoring is not training time
        check_collapse(stats["embed_std"], opts["dim"], epoch)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        logger.info("%s: %d/%d steps (%.2f epochs), loss %.4f, embed std %.4f%s, %.1f min", METHOD_NAMES[method],
                    done, steps, done / steps_per_epoch, stats["loss"], stats["embed_std"] or float("nan"),
                    f", monitor kNN {record['knn_top1']:.2f}" if "knn_top1" in record else "", train_time / 60)
    metrics.close()
    info = {"steps": done, "planned_steps": steps, "epochs": done / steps_per_epoch, "train_min": train_time / 60,
            "step_time_s": step_time, "batch_size": args.batch_size, "lr": lr, "optimizer": opt_args["name"],
            "aug": recipe["aug"], "model": opts, "ran_out_of_budget": ran_out}
    return init_encoder, unwrap(model).encoder_q, info


# ---------------------------------------------------------------------------------------------- main


def load(args) -> tuple[torch.Tensor, ...]:
    try:
        x_train, y_train = load_fashion_mnist(args.data, "train")
        x_test, y_test = load_fashion_mnist(args.data, "test")
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    x_train, y_train = x_train[: args.limit_train], y_train[: args.limit_train]
    x_test, y_test = x_test[: args.limit_test], y_test[: args.limit_test]
    as_t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    return as_t(x_train).unsqueeze(1), as_t(y_train), as_t(x_test).unsqueeze(1), as_t(y_test)


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    setup_logging(0, out_root, "benchmark.log")
    if args.threads:
        torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    x_train, y_train, x_test, y_test = load(args)
    logger.info("Fashion-MNIST: %d train, %d test images from %s; %s", len(x_train), len(x_test), args.data,
                environment())

    # Baseline 1: raw pixels (784-d), the same evaluation.
    raw = evaluate("raw pixels", x_train.flatten(1).float(), y_train, x_test.flatten(1).float(), y_test, args)

    methods = list(RECIPES) if args.method == "all" else [args.method]
    results = []
    for method in methods:
        t_method = time.perf_counter()
        out = out_root / method
        out.mkdir(parents=True, exist_ok=True)
        init_enc, enc, info = pretrain(method, args, x_train, y_train, x_test, y_test, out)
        feats = lambda e, x: backbone_features(e, x, args.image_size, channels_last=args.channels_last)  # noqa: E731
        # Baseline 2: the same network at initialisation (same seed, before the first step).
        rand = evaluate(f"{args.arch} random init", feats(init_enc, x_train), y_train, feats(init_enc, x_test),
                        y_test, args)
        ours = evaluate(f"{METHOD_NAMES[method]} pretrained", feats(enc, x_train), y_train, feats(enc, x_test),
                        y_test, args)
        # The trained backbone in main_pretrain's layout, for main_lincls.py, main_knn.py and
        # tools/show_neighbors.py (--image-size defaults to the recorded one).
        save_atomic({"arch": args.arch, "method": method,
                     "args": {"arch": args.arch, "method": method, "small_stem": args.small_stem,
                              "image_size": args.image_size},
                     "state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}},
                    out / "checkpoint.pth.tar")
        result = {"method": method, "name": METHOD_NAMES[method], "arch": args.arch, "image_size": args.image_size,
                  "small_stem": args.small_stem, "budget_min": args.budget_min, **info,
                  "pretrained": ours, "random_init": rand, "raw_pixels": raw,
                  "wall_min": (time.perf_counter() - t_method) / 60, "environment": environment(),
                  "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
        (out / "results.json").write_text(json.dumps(result, indent=1))
        results.append(result)

    header = "| method | arch | px | epochs | train min | kNN T=0.1 | kNN T=0.07 | linear | random init kNN / linear | raw pixels kNN / linear |"
    lines = [header, "|" + "---|" * 10]
    for r in results:
        p, q = r["pretrained"], r["random_init"]
        lines.append(f"| {r['name']} | {r['arch']} | {r['image_size']} | {r['epochs']:.2f} | {r['train_min']:.1f} | "
                     f"{p['knn_t0.1']:.2f} | {p['knn_t0.07']:.2f} | {p['linear']:.2f} | "
                     f"{q['knn_t0.1']:.2f} / {q['linear']:.2f} | {raw['knn_t0.1']:.2f} / {raw['linear']:.2f} |")
    table = "\n".join(lines)
    logger.info("results (test set, %d images; total wall time %.1f min):\n%s", len(x_test),
                (time.perf_counter() - wall0) / 60, table)
    (out_root / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
