"""Fashion-MNIST as the scripts' data, and the benchmark that runs them, on generated idx files
(a few hundred images: the plumbing, not a quality claim)."""

import importlib.util
import json

import pytest
import torch
from helpers import REPO, fake_fashion_mnist, run_script

import main_knn
import main_lincls
import main_pretrain
from selfsup import recipes
from selfsup.data import FASHION_MNIST_CLASSES


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return fake_fashion_mnist(tmp_path_factory.mktemp("fm") / "idx")


TINY = ["-a", "resnet18", "--image-size", "16", "-b", "32", "-j", "0", "--mlp-dim", "32", "--moco-dim", "16",
        "-p", "100"]


@pytest.mark.e2e
def test_the_scripts_take_fashion_mnist_as_their_data(fmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output folder is named after the data
    assert main_pretrain.cli([str(fmnist), "--method", "simclr", *TINY, "--epochs", "1", "--knn-every", "1",
                              "--knn-k", "10", "--knn-subset", "50"]) == 0
    out = tmp_path / "runs" / "simclr-resnet18-fashion-mnist"
    assert "Fashion-MNIST training set (160 images)" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["data"].startswith("160 images, 10 labels, arrays ")
    ckpt = str(out / "checkpoint.pth.tar")
    assert main_knn.cli([str(fmnist), "--pretrained", ckpt, "--k", "10", "-b", "20", "-j", "0",
                         "--output-dir", str(tmp_path / "knn")]) == 0
    record = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["n"] == 60 and record["train_n"] == 160  # the test set as queries, the training set as bank
    assert main_lincls.cli([str(fmnist), "--pretrained", ckpt, "--train-aug", "none", "--epochs", "2", "-b", "32",
                            "-j", "0", "--output-dir", str(tmp_path / "lin")]) == 0
    lin = torch.load(tmp_path / "lin" / "checkpoint.pth.tar", weights_only=True)
    assert lin["classes"] == list(FASHION_MNIST_CLASSES) and lin["val"]["val_n"] == 60


@pytest.mark.e2e
def test_the_benchmark_runs_the_users_commands_and_writes_its_results(fmnist, tmp_path, repo):
    out, results = tmp_path / "out", tmp_path / "results"
    r = run_script(["tools/fmnist_benchmark.py", "--method", "simclr", "--data", str(fmnist), "--epochs", "2",
                    "--out", str(out), "--results-dir", str(results), "-j", "0", "--pretrain-args",
                    "--image-size", "16", "-b", "32", "--mlp-dim", "32"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((results / "results_simclr.json").read_text())
    assert result["epochs"] == 2 and result["preset"] == "small-simclr"
    # The preset's optimizer reached the run: LARS with the small-image trust coefficient.
    groups = torch.load(out / "simclr" / "pretrain" / "checkpoint.pth.tar", weights_only=True)["optimizer"]["param_groups"]
    assert {g["trust_coefficient"] for g in groups} == {recipes.PRESETS["small-simclr"]["lars_eta"]} != {0.001}
    for row in ("pretrained", "random_init", "raw_pixels"):
        assert set(result[row]) == {"knn_t0.1", "knn_t0.07", "linear"}
        assert all(0.0 <= v <= 100.0 for v in result[row].values())
    # The bars are trivially separable from raw pixels: the evaluation itself works.
    assert result["raw_pixels"]["knn_t0.1"] > 90 and result["raw_pixels"]["linear"] > 90
    assert [e["epoch"] for e in result["online_knn"]] == [1, 2]
    commands = (out / "simclr" / "commands.txt").read_text()
    for script in ("main_pretrain.py", "main_knn.py", "main_lincls.py"):
        assert f"python {script}" in commands
    assert "| SimCLR | 2 |" in (results / "results.md").read_text()
    # The linear protocol is pinned on the command line, not filled from SimCLR's (Nesterov).
    lincls = [c for c in commands.splitlines() if "main_lincls.py" in c]
    assert len(lincls) == 2 and all("--no-nesterov" in c and "--wd 0" in c for c in lincls)


def test_naming_fashion_mnist_without_its_files_says_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("selfsup.data.FASHION_MNIST_DEBIAN", str(tmp_path / "absent"))
    assert main_pretrain.cli(["fashion-mnist", "--epochs", "1"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_the_table_warns_when_its_files_come_from_different_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fmnist_benchmark", REPO / "tools" / "fmnist_benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = {"knn_t0.1": 80.0, "knn_t0.07": 80.0, "linear": 85.0}
    for method, epochs in (("moco", 10), ("simclr", 10)):
        (tmp_path / f"results_{method}.json").write_text(json.dumps({
            "method": method, "name": method, "epochs": epochs, "pretrain_min": 1.0, "pretrained": rows,
            "random_init": rows, "raw_pixels": rows, "environment": {"cpu": "X", "device": "cpu"}}))
    tool.write_table(tmp_path)
    assert "warning" not in capsys.readouterr().err
    assert (tmp_path / "results.md").read_text().count("| +0.00 / +0.00 |") == 2
    data = json.loads((tmp_path / "results_simclr.json").read_text())
    (tmp_path / "results_simclr.json").write_text(json.dumps({**data, "epochs": 100}))
    tool.write_table(tmp_path)
    assert "different epochs" in capsys.readouterr().err
