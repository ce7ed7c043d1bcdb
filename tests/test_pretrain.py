"""main_pretrain.py end to end on tiny generated images: one process, torchrun, bad input."""

import json
import shutil

import pytest
import torch
from helpers import make_image_folder, run_script, tiny_flags, torchrun
from selfsup.methods import METHODS
from selfsup.resume import without_stateless_extras

import main_pretrain

TINY = ["-a", "resnet18", "--image-size", "16", "-b", "8", "--epochs", "1", "-j", "0", "--moco-dim", "16",
        "-p", "1", "--seed", "1"]
METHOD_FLAGS = {method: tiny_flags(method) for method in METHODS}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=2, per_class=8, size=20)


def pretrain(*argv) -> int:
    return main_pretrain.cli([str(a) for a in argv])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_one_process_trains_and_writes_a_moco_style_checkpoint(method, folder, tmp_path):
    out = tmp_path / "run"
    assert pretrain(folder, "--method", method, *TINY, *METHOD_FLAGS[method], "--output-dir", out) == 0
    ckpt = load(out / "checkpoint.pth.tar")  # weights_only=True: plain types only
    assert {"epoch", "arch", "method", "state_dict", "optimizer", "scaler", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "resnet18" and ckpt["method"] == method
    keys = set(ckpt["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    assert "module.encoder_q.conv1.weight" in keys and "module.encoder_q.layer4.1.bn2.weight" in keys
    if method == "moco":
        assert {"module.queue", "module.queue_ptr", "module.encoder_k.conv1.weight",
                "module.encoder_q.fc.0.weight", "module.encoder_q.fc.2.weight"} <= keys
    if method == "byol":
        assert "module.encoder_k.conv1.weight" in keys and "module.predictor.0.weight" in keys
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["method"] == method
    assert (out / "checkpoint_0000.pth.tar").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["epoch"] == 0 and record["loss"] > 0 and record["images_per_s"] > 0
    if method == "simclr":  # TensorBoard: one point per printed step besides one per epoch
        accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")  # optional
        events = accumulator.EventAccumulator(str(out / "tb"))
        events.Reload()
        steps = [e.step for e in events.Scalars("pretrain_step/loss")]
        assert steps == [1, 2] and "pretrain/loss" in events.Tags()["scalars"]  # 2 steps, -p 1 below


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(METHODS))
def test_torchrun_two_processes(method, folder, tmp_path):
    out = tmp_path / "run"
    r = torchrun(2, ["main_pretrain.py", str(folder), "--method", method, *TINY, *METHOD_FLAGS[method],
                     "--output-dir", str(out), "-j", "1"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    ckpt = load(out / "checkpoint.pth.tar")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["moco", "simclr"])
def test_a_process_group_of_one_changes_nothing(method, folder, tmp_path):
    # --dist-backend makes a group (and a DDP wrapper) at world size 1 too, which is how one GPU runs
    # the NCCL code path; every collective over one process is then an identity.
    runs = {}
    for name, extra in (("plain", []), ("group", ["--dist-backend", "gloo"])):
        r = run_script(["main_pretrain.py", str(folder), "--method", method, *TINY, *METHOD_FLAGS[method],
                        "--output-dir", str(tmp_path / name), *extra])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[name] = (r.stdout, load(tmp_path / name / "checkpoint.pth.tar"))
    assert "1 process(es) on cpu (gloo)" in runs["group"][0] and "(gloo)" not in runs["plain"][0]
    assert_same_state(runs["plain"][1], runs["group"][1])


def assert_same_state(a, b):
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # every optimizer state tensor, whatever the optimizer names it (SGD momentum_buffer, LARS mu, AdamW's)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, v in a["optimizer"]["state"].items():
        assert v.keys() == b["optimizer"]["state"][k].keys() and v, k
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(b["optimizer"]["state"][k][name])), (k, name)


@pytest.mark.e2e
def test_resumed_run_continues_from_the_saved_epoch(folder, tmp_path):
    args = [folder, "--method", "moco", *TINY, *METHOD_FLAGS["moco"]]
    assert pretrain(*args, "--epochs", 2, "--output-dir", tmp_path / "straight") == 0
    out = tmp_path / "resumed"
    assert pretrain(*args, "--epochs", 1, "--output-dir", out) == 0
    assert pretrain(*args, "--epochs", 2, "--output-dir", out) == 0  # same command, more epochs
    log = (out / "log.txt").read_text()
    assert "resumed from" in log and "epoch 1, step 0" in log
    # Queue, pointer, both encoders and the optimizer state continue exactly.
    assert_same_state(load(tmp_path / "straight" / "checkpoint.pth.tar"), load(out / "checkpoint.pth.tar"))
    # Running the finished command again does nothing and says so.
    assert pretrain(*args, "--epochs", 2, "--output-dir", out) == 0
    assert "nothing to do" in (out / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------- bad input


def run_bad(args, capsys=None):
    r = run_script(["main_pretrain.py", *[str(a) for a in args]])
    return r.returncode, r.stdout + r.stderr


def test_missing_empty_and_imageless_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("hello")
    for folder, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no images found"),
                            (tmp_path / "noimg", "no images found")]:
        assert pretrain(folder, *TINY, "--output-dir", tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert message in err and str(folder) in err


@pytest.mark.e2e
def test_unknown_arch_and_method_list_the_valid_ones(folder, tmp_path):
    code, out = run_bad([folder, "-a", "vgg16"])
    assert code == 2 and "resnet50" in out
    code, out = run_bad([folder, "--method", "swav"])
    assert code == 2 and "simclr" in out


@pytest.mark.e2e
def test_batch_that_does_not_divide(folder, tmp_path):
    r = torchrun(2, ["main_pretrain.py", str(folder), *TINY, "-b", "7", "--output-dir", str(tmp_path / "o")])
    assert r.returncode != 0
    assert "--batch-size 7 is the global batch and must divide by the 2 processes" in r.stdout + r.stderr
    # MoCo's launcher checks before spawning anything.
    code, out = run_bad([folder, *TINY, "-b", "7", "--multiprocessing-distributed", "--nproc-per-node", "2",
                         "--world-size", "1", "--rank", "0"])
    assert code == 2 and "must divide by the 2 processes" in out


def test_checkpoint_of_another_method_is_refused_and_kept(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(folder, "--method", "byol", *TINY, *METHOD_FLAGS["byol"], "--output-dir", out) == 0
    before = (out / "checkpoint.pth.tar").read_bytes()
    capsys.readouterr()
    assert pretrain(folder, "--method", "moco", *TINY, *METHOD_FLAGS["moco"], "--output-dir", out) == 2
    msg = capsys.readouterr().err
    assert "belongs to another run" in msg and "'byol'" in msg and "--output-dir" in msg
    assert pretrain(folder, "--method", "byol", *TINY, "-a", "resnet34", "--output-dir", out) == 2
    assert "arch 'resnet18'" in capsys.readouterr().err
    assert (out / "checkpoint.pth.tar").read_bytes() == before  # nothing already written is lost


@pytest.mark.e2e
def test_the_run_definition_guards_the_output_folder(folder, tmp_path, capsys):
    args = [*TINY, *METHOD_FLAGS["moco"]]
    out = tmp_path / "run"
    assert pretrain(folder, *args, "--output-dir", out) == 0
    before = (out / "checkpoint.pth.tar").read_bytes()
    # Another learning rate in the same folder is refused, naming it and the ways out.
    assert pretrain(folder, *args, "--lr", "0.5", "--epochs", "2", "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert "lr 0.0" in err and "(this command: 0.5)" in err and "--accept-changes" in err and "--no-resume" in err
    assert (out / "checkpoint.pth.tar").read_bytes() == before
    # --no-resume starts afresh next to it, touching nothing.
    assert pretrain(folder, *args, "--lr", "0.5", "--no-resume", "--output-dir", out) == 0
    assert (tmp_path / "run-2" / "checkpoint.pth.tar").is_file() and (out / "checkpoint.pth.tar").read_bytes() == before
    # A copy of the data elsewhere is the same data: extending the run with more epochs resumes it.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert pretrain(copy, *args, "--epochs", "2", "--output-dir", out) == 0
    assert "resumed from" in (out / "log.txt").read_text()
    # Continuing on purpose with a change is allowed and recorded.
    assert pretrain(folder, *args, "--lr", "0.5", "--wd", "0.001", "--epochs", "3", "--accept-changes",
                    "--output-dir", out) == 0
    assert "continuing the run" in capsys.readouterr().out
    assert load(out / "checkpoint.pth.tar")["run"]["lr"] == 0.5
    # the new weight decay is the optimizer's, not the one its saved state held
    assert {g["weight_decay"] for g in load(out / "checkpoint.pth.tar")["optimizer"]["param_groups"]} == {0.001}
    args += ["--wd", "0.001"]
    assert json.loads((out / "run.json").read_text())["lr"] == 0.5
    # Checkpoints that recorded where the data lay (run records before fingerprints, or no run
    # record at all) compare the data folder's path.
    for epochs, older in ((4, "path"), (5, "no run")):
        ckpt = load(out / "checkpoint.pth.tar")
        del ckpt["args"]["data_id"]
        if older == "path":
            ckpt["run"]["data"] = str(folder.resolve())
        else:
            del ckpt["run"]
        torch.save(ckpt, out / "checkpoint.pth.tar")
        assert pretrain(copy, *args, "--lr", "0.5", "--epochs", epochs, "--output-dir", out) == 2
        err = capsys.readouterr().err
        assert f"data '{folder.resolve()}' (this command: '{copy.resolve()}')" in err, (older, err)
        assert pretrain(folder, *args, "--lr", "0.5", "--epochs", epochs, "--output-dir", out) == 0, older


def test_optimizer_state_of_an_older_version_with_gradless_extras_still_loads():
    # Older versions left the key network's BatchNorm parameters trainable under --bn-splits: the
    # optimizer listed them last, without any state.
    trained = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    extras = [torch.nn.Parameter(torch.randn(3))]
    old = torch.optim.SGD(trained + extras, lr=0.1, momentum=0.9)
    sum((p ** 2).sum() for p in trained).backward()
    old.step()
    saved = old.state_dict()
    assert saved["param_groups"][0]["params"] == [0, 1, 2] and set(saved["state"]) == {0, 1}
    new = torch.optim.SGD(trained, lr=0.1, momentum=0.9)
    new.load_state_dict(without_stateless_extras(saved, new))
    assert torch.equal(new.state[trained[1]]["momentum_buffer"], old.state[trained[1]]["momentum_buffer"])
    with pytest.raises(ValueError):  # without the fitting, torch refuses it
        torch.optim.SGD(trained, lr=0.1, momentum=0.9).load_state_dict(saved)
