#!/usr/bin/env python
"""Does it learn? Fashion-MNIST through the user's own commands, against two baselines measured
in the same run.

    python tools/fmnist_benchmark.py --method moco --epochs 10          # one method, a CPU
    python tools/fmnist_benchmark.py --method all --epochs 10           # every method in turn
    python tools/fmnist_benchmark.py --method all --epochs 100 --device cuda   # a GPU (gpu_check's learn)

For each method, the commands a user types (logged in OUT/<method>/commands.txt):

  1. main_pretrain.py DATA --preset small-<method> --epochs E: the method's small-image recipe
     (its module in selfsup/methods/), with the online kNN after every epoch on a fixed subset;
  2. main_knn.py DATA --pretrained CKPT --k 200 -t 0.1 (and -t 0.07): the 60k training images as
     the bank, the 10k test images as queries;
  3. main_lincls.py DATA --pretrained CKPT --train-aug none --feature-bn --optimizer sgd --no-nesterov
     --wd 0 --epochs 50 --cos --lr 0.1: a linear classifier on frozen, standardised features, the
     same protocol for every row and every method (every flag of the protocol given, so none is
     filled from the checkpoint's method).

Baselines, measured in the same run: the same network randomly initialised (the model as
main_pretrain.py builds it with the same seed, saved before any step, through steps 2 and 3) and
raw pixels (784 values: the same kNN, and the same linear protocol on standardised pixels).

DATA is Fashion-MNIST's idx files (--data; default Debian's location, `apt-get install
dataset-fashion-mnist`; torchvision's FashionMNIST folder works too). Results: OUT/<method>/ (the
runs) and RESULTS/results_<method>.json (--results-dir, default docs/fmnist) with the keys
pretrained / random_init / raw_pixels, each {knn_t0.1, knn_t0.07, linear}, the epochs, the
minutes, the online kNN per epoch, the machine and the commands (the --out folder written OUT).

Run again into the same OUT with the same flags, a finished pretraining is kept (main_pretrain.py
finds nothing to do; the JSON's wall_min then counts the evaluations only) and the evaluations are
made afresh. A larger --epochs continues that run under a schedule planned for the new total,
which is not the same as a run planned for it from the start: use a fresh OUT for a new budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

from selfsup import recipes
from selfsup.backbones import Features, record
from selfsup.backbones import flag_options as backbone_flag_options
from selfsup.builder import build_model
from selfsup.checkpoint import save_atomic
from selfsup.data import FASHION_MNIST_NAME, fashion_mnist_root, load_fashion_mnist
from selfsup.knn import extract_features, knn_classify, make_eval_loader
from selfsup.lincls import row_batches, train_linear_epoch, validate
from selfsup.methods import METHODS
from selfsup.optim import build_optimizer, learning_rate
from selfsup.probe import build_probe, eval_transform, linear_eval_datasets, load_pretrained
from selfsup.resume import run_definition

REPO = Path(__file__).resolve().parents[1]
# How the tables name each method: its small-image preset's title (MoCo v2, BYOL, SimCLR).
NAMES = {method: recipes.PRESETS[recipes.small_preset(method)]["title"] for method in METHODS}
# The linear protocol of every row (features standardised first, so one lr fits all of them).
LINEAR = {"epochs": 50, "lr": 0.1, "batch_size": 256}
KNN_K, KNN_TEMPERATURES = 200, (0.1, 0.07)


def run(cmd: list[str], log: Path, env: dict) -> None:
    """A repository script in a subprocess; its output goes to `log`; a failure stops the benchmark."""
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, *cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with status {code}; see {log}:\n{log.read_text()[-2000:]}")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(ckpt: Path, data: str, out: Path, common: list[str], env: dict, commands: list[str],
             batch: int, args: argparse.Namespace) -> dict:
    """main_knn.py at both temperatures and main_lincls.py on the backbone of `ckpt` (`--eval
    commands`), or its features extracted once and the raw-pixel row's protocol in this process
    (`--eval features`). `out` is made afresh: a classifier left by an earlier run belongs to
    another backbone."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.eval == "features":
        device = eval_device(args)
        workers = args.workers if args.workers is not None else min(8, max(1, (os.cpu_count() or 2) - 1))
        return evaluate_features(*backbone_features(ckpt, Path(data), device, workers), args.seed, batch, device)
    figures = {}
    for t in KNN_TEMPERATURES:
        folder = out / f"knn-t{t}"
        cmd = ["main_knn.py", data, "--pretrained", str(ckpt), "--k", str(KNN_K), "-t", str(t), "--output-dir",
               str(folder), *common]
        commands.append(" ".join(cmd))
        run(cmd, out / f"knn-t{t}.log", env)
        figures[f"knn_t{t}"] = jsonl(folder / "metrics.jsonl")[-1]["top1"]
    folder = out / "lincls"
    cmd = ["main_lincls.py", data, "--pretrained", str(ckpt), "--train-aug", "none", "--feature-bn",
           "--optimizer", "sgd", "--no-nesterov", "--wd", "0", "--cos", "--epochs", str(LINEAR["epochs"]),
           "--lr", str(LINEAR["lr"]), "-b", str(batch),
           "--output-dir", str(folder), *common]
    commands.append(" ".join(cmd))
    run(cmd, out / "lincls.log", env)
    epochs = [r for r in jsonl(folder / "metrics.jsonl") if "val_acc1" in r and "epoch" in r]
    figures["linear"] = epochs[-1]["val_acc1"]  # the last epoch's, not the best on the test set
    return figures


def random_init_checkpoint(method: str, cfg: dict, seed: int, path: Path) -> Path:
    """The network main_pretrain.py trained (`cfg`: its args.json), built as it builds it (same
    seed), before any step."""
    torch.manual_seed(seed)
    model = build_model(method, cfg["arch"], small_stem=cfg["small_stem"],
                        backbone_options=backbone_flag_options(cfg["arch"], cfg), **METHODS[method].options(cfg))
    args = {k: cfg[k] for k in ("arch", "small_stem", "image_size")} | {"method": method}
    save_atomic({"epoch": 0, "arch": cfg["arch"], "backbone_variant": record(model.encoder_q), "method": method, "args": args,
                 "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def raw_pixels(data: Path, seed: int, batch: int, device: torch.device) -> dict:
    """The baseline without any network: the same kNN and linear protocol on the 784 pixels."""
    (x, y), (xt, yt) = load_fashion_mnist(data, "train"), load_fashion_mnist(data, "test")
    train = torch.from_numpy(x.reshape(len(x), -1)).float() / 255  # 60000 x 784
    test = torch.from_numpy(xt.reshape(len(xt), -1)).float() / 255
    return evaluate_features(train, torch.from_numpy(y), test, torch.from_numpy(yt), seed, batch, device)


def evaluate_features(train: torch.Tensor, y: torch.Tensor, test: torch.Tensor, yt: torch.Tensor, seed: int,
                      batch: int, device: torch.device) -> dict:
    """kNN at both temperatures and the linear protocol (LINEAR, on standardised features, as
    --feature-bn standardises them) on fixed features: train N x D, test M x D, on `device`."""
    train, test, y, yt = train.to(device), test.to(device), y.to(device), yt.to(device)
    figures = {}
    for t in KNN_TEMPERATURES:
        pred, _ = knn_classify(train, y, test, 10, KNN_K, t)
        figures[f"knn_t{t}"] = 100.0 * (pred == yt).double().mean().item()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)  # standardised, as --feature-bn does
    train, test = (train - mean) / std, (test - mean) / std
    torch.manual_seed(seed)
    fc = torch.nn.Linear(train.shape[1], 10)
    torch.nn.init.normal_(fc.weight, std=0.01)
    torch.nn.init.zeros_(fc.bias)
    fc.to(device)
    opt = build_optimizer("sgd", fc.parameters(), LINEAR["lr"], 0.9)
    steps = len(train) // batch
    g = torch.Generator().manual_seed(seed)
    for epoch in range(LINEAR["epochs"]):
        order = torch.randperm(len(train), generator=g)[: steps * batch].to(device)
        batches = ((train[i], y[i]) for i in order.split(batch))
        train_linear_epoch(fc, batches, opt, lambda e: learning_rate(LINEAR["lr"], e, LINEAR["epochs"], True), epoch,
                           steps, device, reduce=False)
    figures["linear"] = validate(fc, row_batches(test, yt, 1000), device, reduce=False)["val_acc1"]
    return figures


def backbone_features(ckpt: Path, data: Path, device: torch.device,
                      workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen backbone of `ckpt` on the training and test images, extracted once on `device`
    as main_knn.py extracts them: train N x D, labels N, test M x D, labels M."""
    pretrained = load_pretrained(ckpt)
    transform = eval_transform(pretrained.image_size or 32)
    train_ds, test_ds, classes = linear_eval_datasets(str(data), transform, transform)
    backbone = Features(build_probe(pretrained.arch, pretrained.small_stem, len(classes), pretrained.weights).backbone)
    backbone.to(device)
    pin = device.type == "cuda"
    train, y = extract_features(backbone, make_eval_loader(train_ds, 512, workers, pin), device)  # float32
    test, yt = extract_features(backbone, make_eval_loader(test_ds, 512, workers, pin), device)
    return train, y, test, yt


def benchmark(method: str, args: argparse.Namespace, data: Path, raw: dict, batch: int) -> dict:
    out = Path(args.out) / method
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    device = ["--device", args.device] if args.device else []
    common = ["-j", str(args.workers), *device] if args.workers is not None else device
    preset, name = recipes.small_preset(method), NAMES[method]
    commands: list[str] = []
    t0 = time.time()
    pretrain = out / "pretrain"
    cmd = ["main_pretrain.py", str(data), "--preset", preset, "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--knn-every", str(args.knn_every), "--knn-subset", "5000", "--knn-k", str(KNN_K), "--knn-t", "0.1",
           "--output-dir", str(pretrain), *args.pretrain_args, *common]
    commands.append(" ".join(cmd))
    print(f"{name}: pretraining {args.epochs} epochs ({preset}) -> {pretrain}", flush=True)
    run(cmd, out / "pretrain.log", env)
    cfg = json.loads((pretrain / "args.json").read_text())  # the recipe as main_pretrain.py resolved it
    # The last record of each epoch: a run resumed mid-epoch logs that epoch again.
    records = sorted({r["epoch"]: r for r in jsonl(pretrain / "metrics.jsonl") if "epoch" in r}.values(),
                     key=lambda r: r["epoch"])
    print(f"{name}: evaluating", flush=True)
    pretrained = evaluate(pretrain / "checkpoint.pth.tar", str(data), out / "pretrained", common, env, commands, batch,
                          args)
    ckpt = random_init_checkpoint(method, cfg, args.seed, out / "random_init.pth.tar")
    random_init = evaluate(ckpt, str(data), out / "random_init", common, env, commands, batch, args)
    (out / "commands.txt").write_text("\n".join(f"python {c}" for c in commands) + "\n")
    return {
        "method": method, "name": name, "preset": preset, "epochs": args.epochs,
        "arch": cfg["arch"], "image_size": cfg["image_size"], "small_stem": cfg["small_stem"],
        "pretrain_min": sum(r["epoch_time_s"] for r in records) / 60, "wall_min": (time.time() - t0) / 60,
        "pretrained": pretrained, "random_init": random_init, "raw_pixels": raw,
        "online_knn": [{"epoch": r["epoch"] + 1, "knn_top1": r.get("knn_top1"), "loss": r["loss"]} for r in records],
        "recipe": {k: v for k, v in run_definition(cfg).items() if k != "data"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
                        "cores": os.cpu_count(), "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        # The machine's own folders stay out of the results: the --out folder is written OUT.
        "commands": [c.replace(str(Path(args.out)), "OUT") for c in commands],
        "linear_protocol": {**LINEAR, "batch_size": batch}, "eval": args.eval,
        "steps": steps_done(pretrain), "batch_size": cfg["batch_size"],
    }


def steps_done(run: Path) -> int:
    """The optimizer steps a pretraining run has made, from its checkpoint."""
    return int(torch.load(run / "checkpoint.pth.tar", map_location="cpu", weights_only=True)["global_step"])


def eval_device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(results: list[dict]) -> str:
    """The README's table: each method against its own random-init network (built as its run built
    it) and raw pixels, the differences to the better of the two."""
    rows = ["| method | epochs | pretrain min | kNN T=0.1 | kNN T=0.07 | linear | random init kNN / linear "
            "| vs better baseline: kNN / linear |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, ri = r["pretrained"], r["random_init"]
        best_knn = max(ri["knn_t0.1"], r["raw_pixels"]["knn_t0.1"])
        best_lin = max(ri["linear"], r["raw_pixels"]["linear"])
        rows.append(f"| {r['name']} | {r['epochs']} | {r['pretrain_min']:.1f} | {p['knn_t0.1']:.2f} | "
                    f"{p['knn_t0.07']:.2f} | {p['linear']:.2f} | {ri['knn_t0.1']:.2f} / {ri['linear']:.2f} | "
                    f"{p['knn_t0.1'] - best_knn:+.2f} / {p['linear'] - best_lin:+.2f} |")
    if results:
        b = results[0]["raw_pixels"]
        rows.append(f"| *raw pixels* | - | - | {b['knn_t0.1']:.2f} | {b['knn_t0.07']:.2f} | {b['linear']:.2f} | | |")
    return "\n".join(rows)


def write_table(results_dir: Path) -> str:
    """RESULTS/results.md from every results_<method>.json there (runs of one method at a time add up)."""
    results = [json.loads(f.read_text()) for m in METHODS if (f := results_dir / f"results_{m}.json").exists()]
    # Files left by other runs would share a table with this one: say so rather than mix them silently.
    runs = {(r["epochs"], r["environment"]["cpu"], r["environment"]["device"], r["raw_pixels"]["linear"])
            for r in results}
    if len(runs) > 1:
        print(f"warning: the results in {results_dir} come from runs with different epochs, machines or data: "
              + "; ".join(f"{r['method']}: {r['epochs']} epochs on {r['environment']['cpu']} "
                          f"({r['environment']['device']})" for r in results), file=sys.stderr)
    text = table(results)
    (results_dir / "results.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="all", choices=[*METHODS, "all"])
    p.add_argument("--epochs", default=10, type=int, help="pretraining epochs per method (default: 10)")
    p.add_argument("--data", default=FASHION_MNIST_NAME, help="Fashion-MNIST's idx files (default: Debian's)")
    p.add_argument("--out", default="runs/fmnist-benchmark", help="where the runs go")
    p.add_argument("--results-dir", default="docs/fmnist", help="where results_<method>.json go")
    p.add_argument("--device", default=None, help="cpu, cuda (default: the scripts' choice)")
    p.add_argument("-j", "--workers", default=None, type=int, help="loader workers of every command")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--knn-every", default=1, type=int, help="online kNN every N pretraining epochs (and after the last)")
    p.add_argument("--eval", default="commands", choices=["commands", "features"],
                   help="commands (default): main_knn.py and main_lincls.py per row; features: each backbone's "
                   "features extracted once on --device, then the raw-pixel row's kNN and linear code in this "
                   "process (tools/gpu_check.py's learn part)")
    p.add_argument("--pretrain-args", nargs=argparse.REMAINDER, default=[],
                   help="more flags for main_pretrain.py (recipe experiments); give it last: every "
                   "word after it goes to main_pretrain.py, before -j and --device")
    args = p.parse_args(argv)
    # The scripts run with the repository as their working directory: every path made absolute here.
    args.out, args.results_dir = str(Path(args.out).resolve()), str(Path(args.results_dir).resolve())
    try:
        data = fashion_mnist_root(args.data)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if data is None:
        print(f"error: no Fashion-MNIST idx files in {args.data}", file=sys.stderr)
        return 2
    data = data.resolve()
    methods = list(METHODS) if args.method == "all" else [args.method]
    batch = min(LINEAR["batch_size"], len(load_fashion_mnist(data, "train")[1]))  # tiny training sets: one batch
    print("raw pixels baseline", flush=True)
    raw = raw_pixels(data, args.seed, batch, eval_device(args) if args.eval == "features" else torch.device("cpu"))
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    for method in methods:
        result = benchmark(method, args, data, raw, batch)
        (results_dir / f"results_{method}.json").write_text(json.dumps(result, indent=1))
        print(table([result]), flush=True)
    print(f"{results_dir / 'results.md'}:")
    print(write_table(results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
