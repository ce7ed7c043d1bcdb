"""The Fashion-MNIST benchmark end to end on a few hundred generated images (not a quality claim)."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import write_idx
from selfsup.checkpoint import extract_backbone, load_backbone, load_checkpoint


def _fake_fashion_mnist(root, n_train=160, n_test=60, seed=0):
    """10 classes of 28 x 28 images that differ by where a bright bar lies, with noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 3 : 2 * c + 7, 4:24] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture
def benchmark(repo):
    sys.path.insert(0, str(repo / "tools"))
    import fmnist_benchmark

    return fmnist_benchmark


@pytest.mark.e2e
def test_benchmark_end_to_end_on_generated_images(tmp_path, benchmark):
    data, out = tmp_path / "fm", tmp_path / "out"
    _fake_fashion_mnist(data)
    argv = ["--method", "simclr", "--data", str(data), "--out", str(out), "--budget-min", "1",
            "--max-epochs", "2", "--batch-size", "32", "--image-size", "16", "--probe-epochs", "3",
            "--monitor-every", "1", "--threads", "1"]
    assert benchmark.main(argv) == 0
    result = json.loads((out / "simclr" / "results.json").read_text())
    assert result["steps"] == result["planned_steps"] == 2 * (160 // 32)
    assert result["epochs"] == pytest.approx(2.0)
    for baseline in ("pretrained", "random_init", "raw_pixels"):
        figures = result[baseline]
        assert set(figures) == {"knn_t0.1", "knn_t0.07", "linear", "dim"}
        assert all(0.0 <= figures[k] <= 100.0 for k in ("knn_t0.1", "knn_t0.07", "linear"))
    # The bars are trivially separable from raw pixels: the evaluation itself works.
    assert result["raw_pixels"]["knn_t0.1"] > 90 and result["raw_pixels"]["linear"] > 90
    assert result["raw_pixels"]["dim"] == 784 and result["pretrained"]["dim"] == 512
    # One metrics record per monitored epoch, in the format tools/plot_metrics.py reads.
    records = [json.loads(line) for line in (out / "simclr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1.0, 2.0]
    assert all(np.isfinite(r["loss"]) and 0 <= r["knn_top1"] <= 100 and r["embed_std"] > 0 for r in records)
    assert "| SimCLR | resnet18 | 16 | 2.00 |" in (out / "results.md").read_text()
    # The saved backbone loads into a torchvision ResNet-18 with only the classifier missing.
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    load_backbone(net, extract_backbone(load_checkpoint(out / "simclr" / "checkpoint.pth.tar")))
    assert not torch.equal(net.conv1.weight, torchvision.models.resnet18().conv1.weight)


def test_budget_stops_the_run_and_says_so(tmp_path, benchmark, monkeypatch):
    data, out = tmp_path / "fm", tmp_path / "out"
    _fake_fashion_mnist(data)
    # Steps measured as fast, then the deadline passes at once: the run stops at the budget.
    monkeypatch.setattr(benchmark, "measure_step_time", lambda *a, **k: 1e-3)
    argv = ["--method", "moco", "--data", str(data), "--out", str(out), "--budget-min", "0.0001",
            "--batch-size", "32", "--image-size", "16", "--probe-epochs", "1", "--monitor-every", "0",
            "--threads", "1"]
    assert benchmark.main(argv) == 0
    result = json.loads((out / "moco" / "results.json").read_text())
    assert result["ran_out_of_budget"] and result["steps"] < result["planned_steps"]


def test_missing_dataset_names_the_fix(tmp_path, benchmark):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        benchmark.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
