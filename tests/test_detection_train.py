"""train_torchvision.py end to end on CPU: a detector learns the synthetic task, resume is exact,
DDP on two gloo processes runs and evaluates, bad flags are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, torchrun

sys.path.insert(0, str(REPO))

from detection.make_synthetic import main as make_synthetic  # noqa: E402
from detection.train_torchvision import cli  # noqa: E402

# 64-pixel images, one class of large squares, a narrow FPN and box head: learnable from random
# weights in 80 iterations (AP50 47-61 over seeds 0-2 when this test was written; ~25 s idle).
SMALL = ["--recipe", "demo", "--random-init", "--min-size", "64", "--test-size", "64", "--max-size", "64",
         "--fpn-channels", "32", "--box-head-dim", "128", "--roi-batch-size", "32", "--workers", "0",
         "--print-freq", "10", "--seed", "0"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    assert make_synthetic([str(root), "--train", "160", "--test", "40", "--image-size", "64", "--classes", "square",
                           "--objects", "1", "2", "--object-size", "0.3", "0.6", "--seed", "0"]) == 0
    return root


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_cpu_training_learns_the_synthetic_task(shapes, tmp_path):
    run = tmp_path / "run"
    command = SMALL + ["--data-root", str(shapes), "--output-dir", str(run), "--batch-size", "4", "--lr", "0.04",
                       "--max-iter", "80", "--steps", "64", "--warmup-iters", "20"]
    status = cli(command)
    assert status == 0
    train = [r for r in records(run) if r["type"] == "train"]
    (final,) = [r for r in records(run) if r["type"] == "eval"]
    assert [r["iter"] for r in train] == list(range(10, 81, 10))
    assert train[-1]["loss"] < 0.75 * train[0]["loss"], [r["loss"] for r in train]
    # An untrained detector scores about 0; the trained one finds most squares.
    assert final["iter"] == 80 and final["dataset"] == "voc_2007_test"
    assert final["AP50"] > 25, final
    assert 0 < final["AP"] < final["AP50"]
    ckpt = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["iter"] == 80 and ckpt["class_names"] == ["square"] and ckpt["detector"]["head"] == "fpn"
    assert (run / "model_final.pth.tar").is_file()
    # Running the finished command again evaluates the final model and trains nothing.
    assert cli(command) == 0
    again = [r for r in records(run) if r["type"] == "eval"][-1]
    assert again["AP50"] == pytest.approx(final["AP50"])


@pytest.mark.e2e
def test_resume_continues_exactly(shapes, tmp_path):
    common = SMALL + ["--data-root", str(shapes), "--test", "--batch-size", "2", "--steps", "4", "--warmup-iters", "2",
                      ]
    assert cli(common + ["--output-dir", str(tmp_path / "straight"), "--max-iter", "6"]) == 0
    assert cli(common + ["--output-dir", str(tmp_path / "resumed"), "--max-iter", "3"]) == 0
    assert cli(common + ["--output-dir", str(tmp_path / "resumed"), "--max-iter", "6"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth.tar", weights_only=True)
    assert a["iter"] == b["iter"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert [r["iter"] for r in records(tmp_path / "resumed")] == [3, 6]


@pytest.mark.e2e
def test_two_process_ddp_on_cpu(shapes, tmp_path):
    run = tmp_path / "ddp"
    out = torchrun(2, ["detection/train_torchvision.py", *SMALL, "--data-root", str(shapes), "--output-dir", str(run),
                       "--batch-size", "4", "--max-iter", "4", "--steps", "3", "--warmup-iters", "2",
                       "--checkpoint-period", "2"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 process(es) on cpu, global batch 4" in out.stdout
    (final,) = [r for r in records(run) if r["type"] == "eval"]
    assert {"AP", "AP50", "AP75"} <= set(final)  # every test image evaluated once (checked inside)
    assert torch.load(run / "checkpoint.pth.tar", weights_only=True)["iter"] == 4


def test_bad_flags_are_refused(shapes, tmp_path, capsys):
    base = ["--data-root", str(shapes), "--output-dir", str(tmp_path / "x")]
    assert cli(SMALL + base + ["--norm", "syncbn"]) == 2
    assert "--norm syncbn" in capsys.readouterr().err
    assert cli(["--recipe", "demo"] + base) == 2
    assert "--random-init" in capsys.readouterr().err
    assert cli(SMALL + ["--data-root", str(tmp_path), "--output-dir", str(tmp_path / "y")]) == 2
    assert "VOCdevkit" in capsys.readouterr().err


@pytest.mark.e2e
def test_rerun_with_another_backbone_is_refused_not_resumed(shapes, tmp_path, capsys, monkeypatch):
    from selfsup.builder import build_model

    # Default folders name the backbone: two backbones compared never share one.
    monkeypatch.chdir(tmp_path)
    args = [a for a in SMALL if a != "--random-init"] + ["--data-root", str(shapes), "--test", "--max-iter", "2",
                                                          "--steps", "1", "--warmup-iters", "1", "-b", "2", "-a",
                                                          "resnet18"]
    assert cli(args + ["--random-init"]) == 0
    ckpt = tmp_path / "pre" / "checkpoint.pth.tar"
    ckpt.parent.mkdir()
    torch.save({"arch": "resnet18", "method": "simclr", "args": {"arch": "resnet18", "small_stem": False},
                "state_dict": {f"module.{k}": v for k, v in build_model("simclr", "resnet18").state_dict().items()}},
               ckpt)
    assert cli(args + ["--pretrained", str(ckpt)]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["det-demo-fpn-pre", "det-demo-fpn-random"]
    # The same folder with other starting weights: refused, with the ways out, and nothing lost.
    run = tmp_path / "runs" / "det-demo-fpn-random"
    before = (run / "checkpoint.pth.tar").read_bytes()
    capsys.readouterr()
    assert cli(args + ["--pretrained", str(ckpt), "--output-dir", str(run), "--max-iter", "4"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "init 'random'" in err and "--accept-changes" in err
    assert (run / "checkpoint.pth.tar").read_bytes() == before
    # The same weights under the same name but another content: refused too.
    torch.save({**torch.load(ckpt, weights_only=True), "epoch": 2}, ckpt)
    assert cli(args + ["--pretrained", str(ckpt), "--max-iter", "4"]) == 2
    assert "init 'sha256:" in capsys.readouterr().err  # the file changed under the same name
