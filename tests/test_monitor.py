"""Online monitoring: the collapse signal, the online kNN, and the plotting tool."""

import json
import logging
import math

import pytest
import torch
from helpers import make_image_folder, torchrun
from selfsup.monitor import check_collapse, collapse_ratio, embedding_std

import main_knn
import main_pretrain


def test_collapse_signal_on_constant_and_spread_embeddings(caplog):
    constant = torch.ones(64, 32) * torch.randn(1, 32)  # every sample the same embedding
    assert float(embedding_std(constant)) == pytest.approx(0.0, abs=1e-7)
    with caplog.at_level(logging.WARNING):
        assert check_collapse(float(embedding_std(constant)), 32, epoch=3)
    assert "collapsing" in caplog.text and "epoch 3" in caplog.text
    torch.manual_seed(0)
    spread = torch.randn(4000, 32)  # isotropic: per-dim std of the normalised vectors ~ 1/sqrt(32)
    assert collapse_ratio(float(embedding_std(spread)), 32) == pytest.approx(1.0, abs=0.05)
    assert not check_collapse(float(embedding_std(spread)), 32, epoch=0)


def test_online_knn_equals_main_knn_on_the_final_checkpoint(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", classes=2, per_class=10, size=20, seed=1)
    make_image_folder(root / "val", classes=2, per_class=5, size=20, seed=2)
    out = tmp_path / "run"
    code = main_pretrain.cli([str(root), "--method", "simclr", "-a", "resnet18", "--image-size", "16", "-b", "8",
                              "--epochs", "2", "-j", "0", "--mlp-dim", "32", "--moco-dim", "16", "--knn-every", "1",
                              "--knn-k", "5", "-p", "100", "--output-dir", str(out)])
    assert code == 0
    start, *records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert start["before_training"] and 0 <= start["knn_top1"] <= 100  # the random network's, first
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0 <= r["knn_top1"] <= 100 and math.isfinite(r["embed_std"]) for r in records)
    # The same kNN, computed independently by main_knn.py from the checkpoint file.
    assert main_knn.cli([str(root), "--pretrained", str(out / "checkpoint.pth.tar"), "--k", "5", "-b", "8",
                         "-j", "0", "--output-dir", str(tmp_path / "knn")]) == 0
    knn = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text().splitlines()[-1])
    assert knn["top1"] == pytest.approx(records[-1]["knn_top1"])


@pytest.mark.e2e
def test_online_knn_under_two_processes_evaluates_one_model(tmp_path):
    # DDP broadcasts no buffers here, so each process's BatchNorm statistics follow its own batches;
    # the evaluation must still see one model - the one the checkpoint holds (rank 0's).
    root = tmp_path / "data"
    make_image_folder(root / "train", classes=2, per_class=12, size=20, seed=1)
    make_image_folder(root / "val", classes=2, per_class=5, size=20, seed=2)
    out, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    r = torchrun(2, ["tests/probe_eval.py", str(root), "--method", "moco", "-a", "resnet18", "--image-size", "16",
                     "-b", "8", "--epochs", "2", "--moco-k", "16", "--moco-dim", "16", "-j", "0", "--knn-every", "1",
                     "--knn-k", "5", "-p", "100", "--output-dir", str(out)], PROBE_DIR=str(probe))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    for n in (0, 1, 2):  # the evaluations before training and after epochs 0 and 1
        rank0, rank1 = load(probe / f"rank0_{n}.pt"), load(probe / f"rank1_{n}.pt")
        assert len(rank0) == 40  # resnet18: 20 BatchNorm layers
        for k in rank0:
            assert torch.equal(rank0[k], rank1[k]), k
    state = load(out / "checkpoint.pth.tar")["state_dict"]
    for k, v in rank0.items():
        assert torch.equal(v, state[f"module.encoder_q.{k}"]), k
    # main_knn.py on the saved checkpoint, with the same processes and batches, gets the same kNN.
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    r = torchrun(2, ["main_knn.py", str(root), "--pretrained", str(out / "checkpoint.pth.tar"), "--k", "5", "-b", "8",
                     "-j", "0", "--output-dir", str(tmp_path / "knn")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    knn = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (knn["top1"], knn["top5"]) == (records[-1]["knn_top1"], records[-1]["knn_top5"])


def test_plot_metrics_writes_a_png(tmp_path, repo):
    import sys

    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(repo / "tools"))
    import plot_metrics

    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "args.json").write_text(json.dumps({"moco_dim": 128}))
        lines = [json.dumps({"epoch": e, "loss": scale / (e + 1), "lr": 0.1, "embed_std": 0.05, "knn_top1": 50 + e})
                 for e in range(4)]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"epoch\": 4, \"lo")  # a torn last line
    out = tmp_path / "cmp.png"
    assert plot_metrics.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert plot_metrics.main([str(tmp_path / "missing")]) == 2


def test_plot_metrics_gives_a_run_one_colour_in_every_panel(tmp_path, repo, monkeypatch):
    import sys

    pytest.importorskip("matplotlib")
    import matplotlib.figure

    sys.path.insert(0, str(repo / "tools"))
    import plot_metrics

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    # "a" logs no momentum (as SimCLR), "b" does: b's momentum line must keep b's loss colour.
    runs = {"a": [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(3)],
            "b": [{"epoch": e, "loss": 2.0 / (e + 1), "momentum": 0.99 + 0.001 * e} for e in range(3)]}
    plot_metrics.plot(runs, tmp_path / "c.png")
    colour = {}
    for ax in figures[0].axes:
        for line in ax.get_lines():
            if line.get_label() in runs:
                colour.setdefault(line.get_label(), set()).add(line.get_color())
    assert colour["b"] != colour["a"] and all(len(c) == 1 for c in colour.values()), colour
