"""Runs that survive: kill and resume bitwise, torchrun restarts, two nodes, SIGTERM, bad data,
NaN, bad checkpoints, full disks."""

import argparse
import errno
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers import REPO, THREADS, free_port, make_image_folder, run_script, script_env, torchrun
from selfsup.checkpoint import CheckpointError, load_checkpoint, save_atomic

import main_pretrain

pytestmark = pytest.mark.e2e  # every test here runs the scripts end to end

# 24 images, global batch 8: 3 steps per epoch, 2 epochs = 6 steps.
RUN = ["--method", "moco", "-a", "resnet18", "--image-size", "16", "-b", "8", "--epochs", "2", "--moco-k", "16",
       "--moco-dim", "16", "--mlp", "--aug", "moco_v2", "-p", "1", "--seed", "5"]
# One process: split BN's permutations of the keys draw from the global torch stream, so a resume
# that did not restore it would diverge (the run above draws nothing else from it).
RUN_1PROC = [*RUN, "--bn-splits", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ft") / "imgs", classes=2, per_class=12, size=20)


# Bitwise comparisons are like with like: the reference and the runs it is compared with are
# processes started the same way, with the same thread count (helpers.THREADS) and backend. Only
# the number of loader workers may differ, which the project makes irrelevant.


@pytest.fixture(scope="module")
def reference_1proc(folder, tmp_path_factory):
    """An uninterrupted one-process run (a fresh process, no loader workers)."""
    out = tmp_path_factory.mktemp("ref1")
    r = run_script(["main_pretrain.py", str(folder), *RUN_1PROC, "-j", "0", "--output-dir", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return load(out / "checkpoint.pth.tar")


@pytest.fixture(scope="module")
def reference_2proc(folder, tmp_path_factory):
    """An uninterrupted run of two processes on one node."""
    out = tmp_path_factory.mktemp("ref2")
    r = torchrun(2, ["main_pretrain.py", str(folder), *RUN, "-j", "0", "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return load(out / "checkpoint.pth.tar")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bitwise_equal(a, b):
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, state in a["optimizer"]["state"].items():  # SGD's momentum buffers, AdamW's moments and step
        for name, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][k][name])), (k, name)


def inject(fault: str, args: list[str], **env) -> subprocess.CompletedProcess:
    return run_script(["tests/fault_inject.py", *args], FAULT=fault, **env)


# ---------------------------------------------------------------------------------------------- exact resume


def test_kill_and_resume_is_bitwise_identical_one_process(folder, tmp_path, reference_1proc):
    out = tmp_path / "run"
    # Two loader workers here, none in the reference: augmentation must not depend on them.
    args = [str(folder), *RUN_1PROC, "-j", "2", "--save-every-steps", "2", "--output-dir", str(out)]
    killed = inject("kill:5", args)
    assert killed.returncode == 137
    ckpt = load(out / "checkpoint.pth.tar")
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (1, 1, 4)  # 1 step lost (at most N=2)
    resumed = run_script(["main_pretrain.py", *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1, step 1 (global step 4)" in resumed.stdout
    assert_bitwise_equal(reference_1proc, load(out / "checkpoint.pth.tar"))


def test_mocov3_with_adamw_kill_and_resume_is_bitwise_identical(folder, tmp_path):
    # MoCo v3's own state: the momentum encoder, its cosine momentum (a function of the global step),
    # the predictor, AdamW's moments and step counts; --no-moco-m-cos would hide a schedule restarted
    # from 0, so it stays on.
    run = [str(folder), "--method", "mocov3", "-a", "resnet18", "--image-size", "16", "-b", "8", "--epochs", "2",
           "--moco-dim", "16", "--mlp-dim", "32", "--moco-t", "0.2", "--moco-m", "0.9", "--moco-m-cos",
           "--optimizer", "adamw", "--lr", "1e-3", "--wd", "0.1", "--aug", "byol", "-p", "1", "--seed", "5"]
    reference = kill_at_step_5_and_resume(run, tmp_path, workers=0)
    assert any(k.startswith("module.predictor.") for k in reference["state_dict"])
    assert any("exp_avg" in s for s in reference["optimizer"]["state"].values())


def test_dino_multi_crop_kill_and_resume_is_bitwise_identical(folder, tmp_path):
    # DINO's own state: the teacher, the centre (an EMA of the teacher's outputs), the weight decay's
    # and the teacher temperature's schedules, the last layer frozen in epoch 0 and free in epoch 1
    # (the kill lands in epoch 1), AdamW's moments; 2 global crops of 16 px and 2 local of 8 px,
    # cut in two loader workers here and in none in the reference.
    run = [str(folder), "--method", "dino", "-a", "resnet18", "--image-size", "16", "-b", "8", "--epochs", "2",
           "--out-dim", "32", "--moco-dim", "16", "--mlp-dim", "32", "--local-crops-number", "2",
           "--local-crops-size", "8", "--warmup-teacher-temp", "0.04", "--teacher-temp", "0.07",
           "--warmup-teacher-temp-epochs", "2", "--lr", "1e-3", "--warmup-epochs", "1", "--aug-backend", "batched",
           "-p", "1", "--seed", "5"]
    reference = kill_at_step_5_and_resume(run, tmp_path, workers=2)
    assert reference["state_dict"]["module.center"].abs().sum() > 0
    assert any(k.startswith("module.encoder_k.") for k in reference["state_dict"])


def kill_at_step_5_and_resume(run: list[str], tmp_path, workers: int) -> dict:
    """Run `run` (6 steps) uninterrupted without loader workers, then with `workers` saving every 2
    steps, killed at step 5 and resumed; assert the two end bit for bit the same and return the
    uninterrupted run's checkpoint."""
    ref = tmp_path / "ref"
    r = run_script(["main_pretrain.py", *run, "-j", "0", "--output-dir", str(ref)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "run"
    args = [*run, "-j", str(workers), "--save-every-steps", "2", "--output-dir", str(out)]
    assert inject("kill:5", args).returncode == 137
    assert load(out / "checkpoint.pth.tar")["global_step"] == 4
    resumed = run_script(["main_pretrain.py", *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = load(ref / "checkpoint.pth.tar")
    assert_bitwise_equal(reference, load(out / "checkpoint.pth.tar"))
    return reference


def test_save_every_epochs_writes_the_checkpoint_that_often_and_after_the_last(folder, tmp_path):
    out = tmp_path / "run"
    args = [str(folder), *RUN, "--epochs", "3", "-j", "0", "--save-every-epochs", "2", "--output-dir", str(out)]
    assert inject("kill:5", args).returncode == 137  # in epoch 1: only epoch 0 has ended, no checkpoint yet
    assert not (out / "checkpoint.pth.tar").exists()
    assert inject("kill:8", args).returncode == 137  # in epoch 2: the checkpoint of epoch 1's end
    assert load(out / "checkpoint.pth.tar")["global_step"] == 6
    assert run_script(["main_pretrain.py", *args]).returncode == 0
    assert load(out / "checkpoint.pth.tar")["global_step"] == 9


def test_torchrun_restart_after_a_killed_worker_resumes_bitwise(folder, tmp_path, reference_2proc):
    out = tmp_path / "run"
    args = ["tests/fault_inject.py", str(folder), *RUN, "-j", "1", "--save-every-steps", "1", "--output-dir", str(out)]
    r = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1", *args],
                   FAULT="kill:4", FAULT_RANK="1", FAULT_MARKER=str(tmp_path / "fired"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "fired").exists()  # rank 1 really died mid-epoch, after global step 4
    # The restarted group resumed from the step-4 checkpoint, or from step 3 if rank 0 was stopped
    # while writing it: at most one step (N=1) lost.
    assert re.search(r"resumed from .*\(global step [34]\)", r.stdout), r.stdout[-3000:]
    assert_bitwise_equal(reference_2proc, load(out / "checkpoint.pth.tar"))


def test_two_nodes_equal_one_node_with_two_processes(folder, tmp_path, reference_2proc):
    out = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=ft-test", "main_pretrain.py", str(folder), *RUN, "-j", "0",
           "--output-dir", str(out)]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(l[-2000:] for l in logs)
    assert_bitwise_equal(reference_2proc, load(out / "checkpoint.pth.tar"))


def test_sigterm_writes_a_resumable_checkpoint(folder, tmp_path, reference_1proc):
    out = tmp_path / "run"
    args = [str(folder), *RUN_1PROC, "-j", "0", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "main_pretrain.py", *args], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Epoch: [0][0/3]" in line:  # training has started (the handler is installed by then)
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 143, "".join(lines)  # stopped before its end: the shell's 128 + 15
    assert any("SIGTERM: checkpoint written" in l for l in lines) and "Traceback" not in "".join(lines), "".join(lines)
    ckpt = load(out / "checkpoint.pth.tar")
    assert 1 <= ckpt["global_step"] < 6
    resumed = run_script(["main_pretrain.py", *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(reference_1proc, load(out / "checkpoint.pth.tar"))


def test_resume_with_another_thread_count_says_it_is_not_bitwise(folder, tmp_path):
    out = tmp_path / "run"
    first = run_script(["main_pretrain.py", str(folder), *RUN, "--epochs", "1", "-j", "0", "--output-dir", str(out)])
    assert first.returncode == 0, first.stderr[-3000:]
    assert load(out / "checkpoint.pth.tar")["num_threads"] == THREADS
    args = ["main_pretrain.py", str(folder), *RUN, "-j", "0", "--output-dir", str(out), "--epochs", "2"]
    same = subprocess.run([sys.executable, *args[:-1], "3"], cwd=REPO, env=script_env(), capture_output=True,
                          text=True, timeout=300)
    assert same.returncode == 0 and "bit for bit" not in same.stdout, same.stdout[-3000:]
    more = str(THREADS + 1)
    other = subprocess.run([sys.executable, *args[:-1], "4"], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**script_env(), "OMP_NUM_THREADS": more, "MKL_NUM_THREADS": more})
    assert other.returncode == 0, other.stderr[-3000:]
    assert f"written with {THREADS} CPU thread(s) per process, this run has {THREADS + 1}" in other.stdout
    assert f"OMP_NUM_THREADS={THREADS} resumes bitwise" in other.stdout


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """train/ and val/ class folders, for the online kNN."""
    root = tmp_path_factory.mktemp("ftl") / "data"
    make_image_folder(root / "train", classes=2, per_class=12, size=20, seed=1)
    make_image_folder(root / "val", classes=2, per_class=4, size=20, seed=2)
    return root


def metrics_of(folder):
    """The epochs' records (not the online kNN of the network before training)."""
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]


def test_ctrl_c_writes_a_checkpoint_and_resumes_bitwise_with_the_online_knn(labelled, tmp_path):
    # The demo's defaults include the online kNN after every epoch: it must not move the random
    # streams that the epoch checkpoint saved.
    # As the demo: one loader worker, and split BN, whose permutations draw from the global generator.
    args = [str(labelled), *RUN, "-j", "1", "--bn-splits", "2", "--knn-every", "1", "--knn-k", "5"]
    ref = run_script(["main_pretrain.py", *args, "--output-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "main_pretrain.py", *args, "--output-dir", str(out)], cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Epoch: [1][0/3]" in line:  # after epoch 0's checkpoint and online kNN
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stdout.readlines()
    log = "".join(lines)
    assert proc.wait(timeout=120) == 130, log  # as a shell reports Ctrl-C: `pretrain && evaluate` stops here
    assert "Ctrl-C: stopping after this step" in log and "Traceback" not in log
    assert re.search(r"Ctrl-C \(SIGINT\): checkpoint written at epoch 1 step [12]; rerun the same command", log), log
    resumed = run_script(["main_pretrain.py", *args, "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(load(tmp_path / "ref" / "checkpoint.pth.tar"), load(out / "checkpoint.pth.tar"))
    # The interrupted epoch's averages cover all of its steps, before and after the interruption.
    want, got = metrics_of(tmp_path / "ref"), metrics_of(out)
    assert [r["epoch"] for r in got] == [0, 1]
    for a, b in zip(want, got):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12) and a["knn_top1"] == b["knn_top1"]


def test_resume_from_an_epoch_end_is_bitwise_although_the_online_knn_ran_after_it(labelled, tmp_path):
    # The epoch-end checkpoint is written before the online kNN, whose loaders draw from the global
    # generator; a resume from it must see the streams as the uninterrupted run did.
    args = [str(labelled), *RUN, "-j", "1", "--bn-splits", "2", "--knn-every", "1", "--knn-k", "5"]
    ref = run_script(["main_pretrain.py", *args, "--output-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    killed = inject("kill:4", [*args, "--output-dir", str(out)])  # no step checkpoints: the last is epoch 0's end
    assert killed.returncode == 137
    assert load(out / "checkpoint.pth.tar")["global_step"] == 3
    resumed = run_script(["main_pretrain.py", *args, "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(load(tmp_path / "ref" / "checkpoint.pth.tar"), load(out / "checkpoint.pth.tar"))


def test_a_second_ctrl_c_stops_at_once_in_one_line(capsys, monkeypatch):
    from selfsup.cli import launch
    from selfsup.stopping import StopRequest

    stop = StopRequest(announce=False)
    stop._handle(signal.SIGINT, None)  # the first: a flag for the next step boundary
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):  # the second: at once
        stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGTERM, None)  # a pre-emption signal after it changes nothing

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.delenv("RANK", raising=False)
    assert launch(interrupted, argparse.Namespace()) == 130
    err = capsys.readouterr().err
    assert "interrupted: stopped at once" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- bad data


def test_corrupt_images_are_skipped_under_two_processes(tmp_path):
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=8, size=20)
    png = (data / "class0" / "c0_000.png").read_bytes()
    (data / "class0" / "truncated.png").write_bytes(png[: len(png) // 2])
    (data / "class1" / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    (data / "class1" / "empty.png").write_bytes(b"")
    r = torchrun(2, ["main_pretrain.py", str(data), *RUN, "--epochs", "1", "-j", "1", "--verify-images",
                     "--output-dir", str(tmp_path / "run")])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "3 unreadable file(s)" in out
    for name in ("truncated.png", "garbage.jpg", "empty.png"):
        assert name in out
    assert "skipped" in out and "unreadable image" in out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    r = inject("nan:3", [str(folder), *RUN, "-j", "0", "--save-every-steps", "1", "--output-dir", str(out)])
    assert r.returncode == 1
    assert "loss is not finite at epoch 0, step 2 (global step 2) on 1 of 1 process(es) (here: nan)" in r.stdout
    assert "Last good checkpoint" in r.stdout
    ckpt = load(out / "checkpoint.pth.tar")
    assert ckpt["global_step"] == 2  # written after the last good step, never with NaN weights
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_nan_loss_on_one_of_two_processes_stops_both_before_the_step(folder, tmp_path):
    out = tmp_path / "run"
    r = torchrun(2, ["tests/fault_inject.py", str(folder), *RUN, "-j", "0", "--save-every-steps", "1",
                     "--output-dir", str(out)], FAULT="nan:3", FAULT_RANK="1")
    assert r.returncode != 0
    log = r.stdout + r.stderr
    assert "on 1 of 2 process(es)" in log and "Last good checkpoint" in log, log[-3000:]
    ckpt = load(out / "checkpoint.pth.tar")
    assert ckpt["global_step"] == 2 and ckpt["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------- checkpoints


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("EXPLOIT_MARKER", "/tmp/selfsup-exploit"),))


def test_a_checkpoint_carrying_pickled_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="NOT loaded and none of its code ran"):
        load_checkpoint(path)
    assert not marker.exists()
    # The training script refuses it with the same message and exit status 2.
    r = run_script(["main_pretrain.py", "--resume", str(path), "--output-dir", str(tmp_path / "o")],
                   EXPLOIT_MARKER=str(marker))
    assert r.returncode == 2 and "none of its code ran" in r.stderr and not marker.exists()


def test_truncated_checkpoint_gives_a_clear_error(folder, tmp_path):
    out = tmp_path / "run"
    assert main_pretrain.cli([str(folder), *RUN, "--epochs", "1", "-j", "0", "--output-dir", str(out)]) == 0
    data = (out / "checkpoint.pth.tar").read_bytes()
    (out / "checkpoint.pth.tar").write_bytes(data[: len(data) // 3])
    r = run_script(["main_pretrain.py", str(folder), *RUN_1PROC, "-j", "0", "--output-dir", str(out)])
    assert r.returncode == 2 and "truncated, corrupt" in r.stderr


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def save_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # half the bytes are out when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(CheckpointError, match="the disk is full; the previous checkpoint there is intact"):
        save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]  # no temporary file left


def test_unwritable_output_folder_is_reported_before_training(folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main_pretrain.cli([str(folder), *RUN, "-j", "0", "--output-dir", str(blocker / "run")])
    assert code == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
