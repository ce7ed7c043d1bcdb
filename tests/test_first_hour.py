"""A new user's first hour: one run per output folder, no folder for a refused run, exit statuses
a shell can chain on, a demo that says what it learned, each method's own defaults, pictures next
to their run, an extended run that says what changes, messages that name the fix."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_image_folder, script_env

import main_pretrain
from selfsup import recipes
from selfsup.errors import UsageError
from selfsup.losses import pretext_accuracy
from selfsup.resume import LOCK_NAME, RunLock

RUN = ["--method", "moco", "-a", "resnet18", "--image-size", "16", "-b", "8", "--moco-k", "16", "--moco-dim", "16",
       "--mlp", "--aug", "moco_v2", "-j", "0", "--device", "cpu", "-p", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("first") / "data", classes=2, per_class=12, size=20, seed=1)


# ---------------------------------------------------------------------------------------------- one run per folder


@pytest.mark.e2e
def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_finishes_undisturbed(folder, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "main_pretrain.py", str(folder), *RUN, "--epochs", "40", "--output-dir", str(out)]
    first = subprocess.Popen(args, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if "Epoch: [0][0/3]" in line:
            break
    second = subprocess.run(args, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    lines += first.stdout.readlines()
    assert first.wait(timeout=300) == 0, "".join(lines)
    assert second.returncode == 2
    refusal = second.stderr.strip().splitlines()
    assert len(refusal) == 1 and f"is in use by another run (pid {first.pid} on {socket.gethostname()}, since " \
        in refusal[0], second.stderr
    epochs = [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in r]
    assert epochs == list(range(40))  # each once: the second run wrote nothing
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_lock_left_by_a_run_that_died_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "since": "earlier", "start": "1"}))
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path).acquire()
    assert "ended without unlocking it" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists() and tmp_path.exists()  # a folder it did not create stays


def test_a_live_lock_is_refused_and_another_hosts_names_the_file_to_delete(tmp_path, monkeypatch):
    mine = RunLock(tmp_path).acquire()  # held by this (live) process
    with pytest.raises(UsageError, match=rf"in use by another run \(pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    mine.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "noon"}))
    with pytest.raises(UsageError, match=f"if that run is gone, delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()
    # The same SLURM job's earlier run (requeued, so ended), wherever it ran: taken over.
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "noon", "slurm_job": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    RunLock(tmp_path).acquire().release()


def test_a_refused_run_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "x"
    assert main_pretrain.cli([str(tmp_path / "does-not-exist"), *RUN, "--output-dir", str(out)]) == 2
    (tmp_path / "empty").mkdir()
    assert main_pretrain.cli([str(tmp_path / "empty"), *RUN, "--output-dir", str(out)]) == 2
    assert main_pretrain.cli([str(tmp_path / "empty"), *RUN, "--no-resume", "--output-dir", str(out)]) == 2
    assert not out.exists() and not (tmp_path / "runs").exists(), list(tmp_path.rglob("*"))
    assert "no images found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- what the demo says


def test_pretext_accuracy_is_the_positives_rank_among_the_candidates():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 12), torch.randint(0, 12, (50,))
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)  # candidates scoring above the positive
    got = pretext_accuracy(logits, labels)
    assert got["acc1"].item() == pytest.approx(100 * (rank == 0).float().mean().item())
    assert got["acc5"].item() == pytest.approx(100 * (rank < 5).float().mean().item())


def test_moco_reports_the_accuracy_of_its_instance_discrimination():
    from selfsup.accumulation import Accumulation
    from selfsup.methods import MoCo
    from test_builder import tiny_encoder

    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    logits, labels = MoCo(tiny_encoder, dim=8, K=16, m=0.9, mlp=True)(x1, x2)  # facebookresearch/moco's contract
    torch.manual_seed(0)
    torch.randn(2, 6, 3, 8, 8)
    model = MoCo(tiny_encoder, dim=8, K=16, m=0.9, mlp=True)  # the same one, as the engine runs it
    with torch.no_grad():
        plan = model.prepare([[x1, x2]], Accumulation())
    model(x1, x2, plan=plan, micro=0)
    assert labels.eq(0).all()
    torch.testing.assert_close(model.last_pretext["acc1"], 100 * (logits.argmax(1) == 0).float().mean())


def test_plot_metrics_draws_the_panels_that_carry_information(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics

    records = [{"before_training": True, "knn_top1": 60.0}] + [
        {"epoch": e, "loss": 5 - e, "acc1": 10.0 * e, "lr": 0.03, "momentum": 0.99, "knn_top1": 61.0 + e,
         "embed_std": 0.05} for e in range(3)]
    runs = {"run": records}
    kept = [key for key, _, _ in plot_metrics.PANELS if plot_metrics.informative(runs, key)]
    assert kept == ["loss", "acc1", "knn_top1"]  # constant lr, momentum and std carry nothing; no cos
    assert plot_metrics.series(records, "knn_top1") == ([0, 1, 2, 3], [60.0, 61.0, 62.0, 63.0])  # the start at 0


# ---------------------------------------------------------------------------------------------- each method's own recipe


@pytest.mark.parametrize("method, expected", [
    # deepmind-research byol (main_loop.py 1000 epochs; configs/byol.py), google-research/simclr
    # tf2/run.py, moco-v3 main_moco.py: optimizer, lr per 256, wd, warmup, epochs
    ("byol", ("lars", 0.2, 1.5e-6, 10, 1000)),
    ("simclr", ("lars", 0.3, 1e-6, 10, 100)),
    ("mocov3", ("lars", 0.6, 1e-6, 10, 100)),
    ("moco", ("sgd", 0.03, 1e-4, 0.0, 200)),  # facebookresearch/moco main_moco.py
])
def test_each_method_trains_with_its_own_optimisation_without_a_preset(method, expected):
    cfg = recipes.resolve(method, None, False, {"batch_size": 512})
    lr = expected[1] * (512 / 256 if method != "moco" else 1)
    assert (cfg["optimizer"], cfg["lr"], cfg["wd"], cfg["warmup_epochs"], cfg["epochs"]) == \
        (expected[0], pytest.approx(lr), expected[2], expected[3], expected[4])
    line = recipes.optimisation_line(cfg, None)
    assert f"{method}'s defaults" in line or method == "moco"
    assert "the paper's whole recipe: --preset" in line and "batch 512: the command line" in line


def test_the_demo_trains_simclr_and_says_so():
    cfg = recipes.resolve(None, None, True, {})
    assert cfg["method"] == recipes.DEMO_METHOD == "simclr" and (cfg["batch_size"], cfg["epochs"]) == (64, 5)
    assert recipes.resolve(None, None, False, {})["method"] == "moco"  # with a data folder: MoCo's scripts' default


# ---------------------------------------------------------------------------------------------- pictures, extensions, messages


def test_neighbour_pictures_go_next_to_their_run():
    sys.path.insert(0, str(REPO / "tools"))
    import show_neighbors

    args = show_neighbors.get_args_parser().parse_args(["--pretrained", "runs/x/checkpoint.pth.tar"])
    assert str(show_neighbors.default_out(args)) == os.path.join("runs", "x", "neighbors.png")
    args = show_neighbors.get_args_parser().parse_args(["--pretrained", "runs/x/checkpoint_0009.pth.tar"])
    assert str(show_neighbors.default_out(args)) == os.path.join("runs", "x", "neighbors-checkpoint_0009.png")


def test_extending_a_finished_run_says_what_changes(caplog):
    from selfsup.engine import _warn_if_extended
    from selfsup.optim import cosine_lr

    args = main_pretrain.resolve_config(main_pretrain.get_args_parser().parse_args(["--epochs", "4"]))
    with caplog.at_level(logging.WARNING):
        _warn_if_extended(args, planned=3, at=3.0)
    before, after = cosine_lr(args.lr, 3.0, 3, args.warmup_epochs), cosine_lr(args.lr, 3.0, 4, args.warmup_epochs)
    assert f"planned for 3 epochs, this command says 4" in caplog.text
    assert f"from {before:.3g} to {after:.3g}" in caplog.text and after > 100 * max(before, 1e-9)


def test_an_unknown_preset_or_method_is_one_line(capsys):
    for flag in ("--preset", "--method"):
        assert main_pretrain.cli([flag, "nonexistent"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"unknown {flag} 'nonexistent'; valid:" in err[0], err


def test_messages_count_the_images_the_run_holds_and_do_not_advise_what_was_done(tmp_path, caplog):
    from PIL import Image
    from selfsup.data.pipeline import build_pretrain_pipeline
    from selfsup.distributed import DistInfo

    root = make_image_folder(tmp_path / "bad", classes=2, per_class=20, size=20)
    (root / "class0" / "c0_000.png").write_bytes(b"not an image")
    p = build_pretrain_pipeline(str(root), aug="moco_v2", image_size=16, batch_size=8, workers=0, dist=DistInfo(),
                                seed=0, backend="auto")
    assert p.num_images == 39 and p.description.startswith("39 images") and "1 unreadable of 40" in p.description
    mixed = make_image_folder(tmp_path / "mixed", classes=1, per_class=4, size=20)
    Image.new("RGB", (24, 20)).save(mixed / "class0" / "wide.png")
    with caplog.at_level(logging.INFO):
        p = build_pretrain_pipeline(str(mixed), aug="moco_v2", image_size=16, batch_size=4, workers=0,
                                    dist=DistInfo(), seed=0, backend="auto")
    assert p.backend == "batched" and "share one size" in caplog.text and "use --aug-backend" not in caplog.text
