"""main_lincls.py and selfsup.lincls: checkpoints of every method, bad input, frozen backbone,
cached features and exact distributed validation - against independent computations."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import REPO, TINY_OPTIONS, make_image_folder, torchrun
from PIL import Image

from selfsup import build_model
from selfsup.lincls import train_linear_epoch
from selfsup.methods import METHODS
from selfsup.probe import LinearProbe, SanityCheckError, build_probe, load_pretrained, sanity_check

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE, CLASSES = 16, 6


def load_script(name):
    """Import an entry script of the repository root (main_lincls, main_knn) as a module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


main_lincls = load_script("main_lincls")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 classes; 24 training images; 11 validation images (odd: blocks of 5 and 6 on 2 processes)."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "train", classes=CLASSES, per_class=4, size=SIZE)
    make_image_folder(root / "val", classes=CLASSES, per_class=2, size=SIZE, seed=1)
    os.remove(root / "val" / "class5" / "c5_001.png")
    return root


def pretrain_checkpoint(path, method="moco", arch="resnet18", moco_format=False):
    """A checkpoint as main_pretrain.py writes it (or, with moco_format, as facebookresearch/moco's
    main_moco.py does). The key/target encoder is perturbed so that loading it instead of
    encoder_q would be caught. Returns (path, the expected backbone under torchvision names)."""
    torch.manual_seed(1 + list(METHODS).index(method))
    model = build_model(method, arch, dim=8, **TINY_OPTIONS[method])
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)  # BN statistics and weights away from their init
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9)
    if moco_format:
        ckpt = {"epoch": 200, "arch": arch, "state_dict": state, "optimizer": optimizer.state_dict()}
    else:
        ckpt = {"epoch": 1, "step": 0, "arch": arch, "method": method, "state_dict": state,
                "optimizer": optimizer.state_dict(), "scaler": {},
                "args": {"arch": arch, "method": method, "small_stem": False, "image_size": SIZE}}
    torch.save(ckpt, path)
    backbone = {k[len("encoder_q."):]: v.clone() for k, v in model.state_dict().items()
                if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")}
    return path, backbone


@pytest.fixture(scope="module")
def moco_ckpt(tmp_path_factory):
    return pretrain_checkpoint(tmp_path_factory.mktemp("pre") / "checkpoint.pth.tar", "moco")


def lincls(*argv):
    return main_lincls.cli([*map(str, argv), "-j", "0", "--device", "cpu", "-p", "0", "-b", "4", "--lr", "0.1"])


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def naive_val_counts(ckpt_path, val_root):
    """Top-1/top-5 counts of a classifier checkpoint, image by image: a fresh torchvision ResNet,
    the images normalised by hand (they are already SIZE x SIZE), sorted class folders."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    net = getattr(torchvision.models, ckpt["arch"])(num_classes=len(ckpt["classes"]))
    net.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})
    net.eval()
    c1 = c5 = n = 0
    for label, cls in enumerate(sorted(os.listdir(val_root))):
        for f in sorted(os.listdir(val_root / cls)):
            img = np.asarray(Image.open(val_root / cls / f).convert("RGB"), dtype=np.float32) / 255
            assert img.shape == (SIZE, SIZE, 3)
            x = (torch.from_numpy(img) - torch.tensor(MEAN)) / torch.tensor(STD)
            with torch.no_grad():
                logits = net(x.permute(2, 0, 1)[None])[0]
            ranked = logits.argsort(descending=True).tolist()
            c1 += ranked[0] == label
            c5 += label in ranked[:5]
            n += 1
    return c1, c5, n


def backbone_of(ckpt_path):
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("module.fc.")}


# ---------------------------------------------------------------------------------------------- every method


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(METHODS))
def test_linear_eval_from_each_method_checkpoint(method, data, tmp_path):
    ckpt, backbone = pretrain_checkpoint(tmp_path / "checkpoint.pth.tar", method)
    out = tmp_path / "out"
    assert lincls(data, "--pretrained", ckpt, "--epochs", 2, "--output-dir", out) == 0
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        saved = torch.load(out / name, map_location="cpu", weights_only=True)  # plain types only
        assert saved["arch"] == "resnet18" and saved["classes"] == [f"class{c}" for c in range(CLASSES)]
    # The backbone is encoder_q's, untouched (weights and BatchNorm statistics).
    trained = backbone_of(out / "checkpoint.pth.tar")
    assert trained.keys() == backbone.keys()
    assert all(torch.equal(trained[k], backbone[k]) for k in backbone)
    # The recorded validation figures are those of an independent, image-by-image evaluation.
    records = [r for r in read_metrics(out) if "epoch" in r]
    assert [r["epoch"] for r in records] == [0, 1]
    last = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    c1, c5, n = naive_val_counts(out / "checkpoint.pth.tar", data / "val")
    assert (last["val"]["val_correct1"], last["val"]["val_correct5"], last["val"]["val_n"]) == (c1, c5, n) == (
        records[-1]["val_correct1"], records[-1]["val_correct5"], 11)
    assert records[-1]["val_acc1"] == pytest.approx(100 * c1 / 11)


def test_facebookresearch_moco_checkpoint(data, tmp_path):
    ckpt, backbone = pretrain_checkpoint(tmp_path / "moco_v2_200ep_pretrain.pth.tar", "moco", moco_format=True)
    raw = torch.load(ckpt, weights_only=True)
    assert {"module.queue", "module.encoder_k.conv1.weight", "module.encoder_q.fc.0.weight"} <= raw["state_dict"].keys()
    pre = load_pretrained(ckpt)
    assert (pre.arch, pre.small_stem, pre.image_size) == ("resnet18", False, None)
    probe = build_probe(pre.arch, pre.small_stem, 10, pre.weights)
    own = probe.backbone.state_dict()
    assert own.keys() == backbone.keys() and all(torch.equal(own[k], backbone[k]) for k in backbone)
    assert not torch.equal(own["conv1.weight"], raw["state_dict"]["module.encoder_k.conv1.weight"])
    # End to end; the checkpoint records no image size, so give the data's.
    out = tmp_path / "out"
    assert lincls(data, "--pretrained", ckpt, "--epochs", 1, "--image-size", SIZE, "--output-dir", out) == 0
    assert (out / "model_best.pth.tar").is_file()
    # Without --output-dir the results go next to the checkpoint.
    args = main_lincls.resolve_config(main_lincls.get_args_parser().parse_args([str(data), "--pretrained", str(ckpt)]))
    assert args.output_dir == str(tmp_path / "lincls-moco_v2_200ep_pretrain")


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_and_unexpected_keys_are_listed(data, moco_ckpt, tmp_path, capsys):
    ckpt = torch.load(moco_ckpt[0], weights_only=True)
    del ckpt["state_dict"]["module.encoder_q.layer4.1.bn2.weight"]
    ckpt["state_dict"]["module.encoder_q.layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "broken.pth.tar")
    assert lincls(data, "--pretrained", tmp_path / "broken.pth.tar", "--output-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Missing keys: ['layer4.1.bn2.weight']" in err
    assert "Unexpected keys: ['layer5.0.conv1.weight']" in err
    assert not (tmp_path / "out" / "checkpoint.pth.tar").exists()


def _other_arch(tmp_path, data, ckpt):
    return [data, "--pretrained", ckpt, "-a", "resnet34"], "holds a resnet18 backbone but -a resnet34"


def _unrecorded_arch(tmp_path, data, ckpt):
    raw = torch.load(ckpt, weights_only=True)
    del raw["arch"], raw["args"]["arch"]
    torch.save(raw, tmp_path / "noarch.pth.tar")
    return [data, "--pretrained", tmp_path / "noarch.pth.tar", "-a", "resnet50"], "does not fit this architecture"


def _not_a_checkpoint(tmp_path, data, ckpt):
    (tmp_path / "notes.pth.tar").write_text("not a checkpoint")
    return [data, "--pretrained", tmp_path / "notes.pth.tar"], "is not a PyTorch checkpoint"


def _no_backbone(tmp_path, data, ckpt):
    torch.save({"epoch": 3, "state_dict": {"weight": torch.zeros(2)}}, tmp_path / "other.pth.tar")
    return [data, "--pretrained", tmp_path / "other.pth.tar"], "no ResNet or Vision Transformer backbone found"


def _classes_differ(tmp_path, data, ckpt):
    root = tmp_path / "mismatch"
    make_image_folder(root / "train", classes=3, per_class=2, size=SIZE)
    make_image_folder(root / "val", classes=3, per_class=1, size=SIZE)
    os.rename(root / "val" / "class1", root / "val" / "kitten")
    return [root, "--pretrained", ckpt], "only in train/: ['class1']; only in val/: ['kitten']"


def _no_val_split(tmp_path, data, ckpt):
    make_image_folder(tmp_path / "flat" / "train", classes=2, per_class=2, size=SIZE)
    return [tmp_path / "flat", "--pretrained", ckpt], "has no val/"


def _pretraining_checkpoint_as_resume(tmp_path, data, ckpt):
    return [data, "--pretrained", ckpt, "--resume", ckpt], "is not a linear-classifier checkpoint"


@pytest.mark.parametrize("case", [_other_arch, _unrecorded_arch, _not_a_checkpoint, _no_backbone, _classes_differ,
                                  _no_val_split, _pretraining_checkpoint_as_resume], ids=lambda f: f.__name__[1:])
def test_bad_input_is_one_clear_message_before_training(case, data, moco_ckpt, tmp_path, capsys):
    argv, expected = case(tmp_path, data, moco_ckpt[0])
    assert lincls(*argv, "--output-dir", tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert expected in captured.err, captured.err
    assert captured.err.count("error") == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "out" / "checkpoint.pth.tar").exists()


# ---------------------------------------------------------------------------------------------- frozen backbone


def test_fc_init_and_frozen_backbone_in_eval_mode():
    torch.manual_seed(0)
    probe = build_probe("resnet18", False, 1000)
    assert probe.fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(probe.fc.weight.mean().item()) < 1e-4 and not probe.fc.bias.any()
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]

    probe.train()
    bns = [m for m in probe.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and probe.fc.training
    before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    fc_before = probe.fc.weight.clone()
    optimizer = torch.optim.SGD(probe.fc.parameters(), lr=1.0)
    x, y = torch.randn(4, 3, SIZE, SIZE) * 3 + 1, torch.tensor([0, 1, 2, 3])
    batches = [(probe.features(x), y)]
    train_linear_epoch(probe.fc, batches, optimizer, lambda e: 1.0, 0, 1, torch.device("cpu"))
    after = probe.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats and num_batches_tracked
    assert not torch.equal(fc_before, probe.fc.weight)


def test_sanity_check_catches_a_changed_backbone(moco_ckpt):
    pre = load_pretrained(moco_ckpt[0])
    probe = build_probe(pre.arch, pre.small_stem, CLASSES, pre.weights)
    sanity_check(probe, moco_ckpt[0])
    with torch.no_grad():
        probe.backbone.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(SanityCheckError, match=r"layer2\.0\.conv1\.weight"):
        sanity_check(probe, moco_ckpt[0])
    probe = build_probe(pre.arch, pre.small_stem, CLASSES, pre.weights)
    probe.backbone.bn1.running_mean.add_(0.5)
    with pytest.raises(SanityCheckError, match=r"bn1\.running_mean"):
        sanity_check(probe, moco_ckpt[0])


def test_sanity_check_fails_the_run_when_bn_statistics_move(data, moco_ckpt, tmp_path, capsys, monkeypatch):
    # A regression that let the backbone follow train(): BatchNorm would update its statistics.
    monkeypatch.setattr(LinearProbe, "train", nn.Module.train)
    assert lincls(data, "--pretrained", moco_ckpt[0], "--epochs", 2, "--output-dir", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "sanity check failed" in err and "running_mean" in err


# ---------------------------------------------------------------------------------------------- cached features


@pytest.mark.e2e
def test_cached_features_equal_the_image_path_and_resume(data, moco_ckpt, tmp_path, capsys):
    ckpt = moco_ckpt[0]
    cached, images, resumed = tmp_path / "cached", tmp_path / "images", tmp_path / "resumed"
    assert lincls(data, "--pretrained", ckpt, "--train-aug", "none", "--epochs", 3, "--save-features",
                  "--output-dir", cached) == 0
    assert lincls(data, "--pretrained", ckpt, "--train-aug", "none", "--no-feature-cache", "--epochs", 3,
                  "--output-dir", images) == 0
    a, b = (torch.load(d / "checkpoint.pth.tar", weights_only=True) for d in (cached, images))
    assert torch.allclose(a["state_dict"]["module.fc.weight"], b["state_dict"]["module.fc.weight"], atol=1e-5)
    assert a["val"]["val_correct1"] == b["val"]["val_correct1"] and a["val"]["val_n"] == 11
    assert (cached / "features_train.pth").is_file() and (cached / "features_val.pth").is_file()

    # Interrupted after 2 epochs, then the same command with --epochs 3: the same classifier.
    assert lincls(data, "--pretrained", ckpt, "--train-aug", "none", "--epochs", 2, "--output-dir", resumed) == 0
    assert lincls(data, "--pretrained", ckpt, "--train-aug", "none", "--epochs", 3, "--output-dir", resumed) == 0
    c = torch.load(resumed / "checkpoint.pth.tar", weights_only=True)
    assert c["epoch"] == 3 and torch.allclose(c["state_dict"]["module.fc.weight"], a["state_dict"]["module.fc.weight"],
                                               atol=1e-6)
    # A longer rerun of the first command reads its saved features instead of recomputing them.
    capsys.readouterr()
    assert lincls(data, "--pretrained", ckpt, "--train-aug", "none", "--epochs", 4, "--save-features",
                  "--output-dir", cached) == 0
    assert "features read from" in (cached / "log.txt").read_text()

    # -e evaluates model_best on the images and reproduces its recorded figures.
    best = torch.load(cached / "model_best.pth.tar", weights_only=True)
    assert lincls(data, "--pretrained", ckpt, "-e", "--output-dir", cached) == 0
    evaluated = read_metrics(cached)[-1]
    assert evaluated["evaluate"].endswith("model_best.pth.tar")
    assert evaluated["val_correct1"] == best["val"]["val_correct1"]
    assert evaluated["val_acc1"] == pytest.approx(best["best_acc1"])
    # ... and so does -e with only the classifier checkpoint (arch and backbone come from it).
    assert lincls(data, "-e", "--resume", cached / "model_best.pth.tar", "--output-dir", tmp_path / "eval") == 0
    assert read_metrics(tmp_path / "eval")[-1]["val_correct1"] == best["val"]["val_correct1"]

    # The pretrained checkpoint changed since: resuming or evaluating that classifier is refused.
    other, _ = pretrain_checkpoint(tmp_path / "other.pth.tar", "byol")
    assert lincls(data, "--pretrained", other, "--epochs", 5, "--output-dir", cached) == 2
    assert "trained on another backbone" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- distributed


@pytest.mark.e2e
def test_torchrun_two_processes_equal_one_process(data, moco_ckpt, tmp_path):
    ckpt = moco_ckpt[0]
    args = [str(data), "--pretrained", str(ckpt), "--epochs", "2", "--train-aug", "standard", "-j", "0", "--device",
            "cpu", "-b", "4", "--lr", "0.1"]
    two = torchrun(2, ["main_lincls.py", *args, "--output-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert main_lincls.cli([*args, "--output-dir", str(tmp_path / "one"), "-p", "0"]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pth.tar", weights_only=True) for d in ("two", "one"))
    # Same global batches and per-sample augmentations: DDP over the fc trains the same classifier.
    assert torch.allclose(a["state_dict"]["module.fc.weight"], b["state_dict"]["module.fc.weight"], atol=1e-5)
    # Validation split 5 + 6 over the processes equals the image-by-image count of that classifier.
    assert (a["val"]["val_correct1"], a["val"]["val_correct5"], a["val"]["val_n"]) == naive_val_counts(
        tmp_path / "two" / "checkpoint.pth.tar", data / "val")
    assert a["val"]["val_n"] == b["val"]["val_n"] == 11
    assert pytest.approx(a["val"]["val_loss"], rel=1e-4) == b["val"]["val_loss"]


@pytest.mark.parametrize("train_aug", ["none", "standard"])  # cached features, and the image path
def test_unreadable_evaluation_images_are_left_out_counted_and_reported(data, tmp_path, capsys, train_aug):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "val" / "class0" / "c0_000.png").write_bytes(b"not an image")
    png = (root / "train" / "class1" / "c1_000.png").read_bytes()
    (root / "train" / "class1" / "c1_000.png").write_bytes(png[: len(png) // 2])  # truncated
    ckpt, _ = pretrain_checkpoint(tmp_path / "ckpt.pth.tar")
    out = tmp_path / "lin"
    assert lincls(root, "--pretrained", ckpt, "--train-aug", train_aug, "--epochs", 1, "-b", 8, "--lr", 0.1,
                  "--output-dir", out) == 0
    logs = capsys.readouterr()
    text = logs.out + logs.err
    assert "unreadable image in the validation set" in text and "c0_000.png" in text
    assert "1 unreadable image(s) left out of the validation set; 10 remain" in text
    assert "Traceback" not in text
    assert read_metrics(out)[-1]["val_n"] == 10  # 11 images, 1 unreadable: each readable one once
    knn = load_script("main_knn")
    assert knn.cli([str(root), "--pretrained", str(ckpt), "--k", "3", "-b", "8", "-j", "0",
                    "--output-dir", str(tmp_path / "knn")]) == 0
    text = "".join(capsys.readouterr())
    assert "left out 1 unreadable image(s) of 24" in text  # the bank: the truncated training image
    assert json.loads((tmp_path / "knn" / "metrics.jsonl").read_text().splitlines()[-1])["n"] == 10


def test_each_method_gets_its_published_protocol_unless_flags_say_otherwise(data, tmp_path, capsys):
    ckpt, _ = pretrain_checkpoint(tmp_path / "simclr.pth.tar", method="simclr")
    out = tmp_path / "lin"
    assert main_lincls.cli([str(data), "--pretrained", str(ckpt), "--epochs", "1", "-b", "8", "-j", "0",
                            "--output-dir", str(out)]) == 0
    args = torch.load(out / "checkpoint.pth.tar", weights_only=True)["args"]
    # SimCLR's linear protocol: SGD with Nesterov momentum, lr 0.1 x B/256, cosine, no weight decay.
    assert (args["optimizer"], args["nesterov"], args["cos"], args["wd"]) == ("sgd", True, True, 0.0)
    assert args["lr"] == pytest.approx(0.1 * 8 / 256) and args["epochs"] == 1  # an explicit flag still wins
    assert "simclr's protocol, from google-research/simclr" in capsys.readouterr().out
    # A flag given replaces only itself: --lr 5 keeps SimCLR's Nesterov cosine schedule.
    assert main_lincls.cli([str(data), "--pretrained", str(ckpt), "--epochs", "1", "-b", "8", "-j", "0", "--lr", "5",
                            "--output-dir", str(tmp_path / "lin2")]) == 0
    args = torch.load(tmp_path / "lin2" / "checkpoint.pth.tar", weights_only=True)["args"]
    assert (args["lr"], args["nesterov"], args["cos"], args["schedule"]) == (5.0, True, True, [])
    assert "(--lr, --epochs given)" in capsys.readouterr().out
    # Resumed with more epochs and without --lr, the probe keeps the lr it started with.
    assert main_lincls.cli([str(data), "--pretrained", str(ckpt), "--epochs", "2", "-b", "8", "-j", "0",
                            "--output-dir", str(tmp_path / "lin2")]) == 0
    args = torch.load(tmp_path / "lin2" / "checkpoint.pth.tar", weights_only=True)["args"]
    assert (args["lr"], args["epochs"], args["nesterov"]) == (5.0, 2, True)
    assert main_lincls.cli([str(data), "--pretrained", str(ckpt), "--lr", "-1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--lr must be > 0 (got -1.0)" in capsys.readouterr().err


def test_feature_bn_standardises_the_features_and_comes_back_with_the_classifier(data, moco_ckpt, tmp_path):
    out = tmp_path / "lin"
    assert lincls(data, "--pretrained", moco_ckpt[0], "--train-aug", "none", "--feature-bn", "--epochs", 2,
                  "--output-dir", out) == 0
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["feature_bn"] is True
    mean = ckpt["state_dict"]["module.norm.running_mean"]
    assert mean.shape == (512,) and mean.abs().sum() > 0  # statistics of the training features
    # -e rebuilds the standardisation from the checkpoint and gets the training run's figures
    evaluated = tmp_path / "eval"
    assert lincls(data, "-e", "--resume", out / "checkpoint.pth.tar", "--output-dir", evaluated) == 0
    assert read_metrics(evaluated)[-1]["val_correct1"] == ckpt["val"]["val_correct1"]
    # The classifier's file still serves as a backbone (main_knn.py, another probe, detection).
    backbone = load_pretrained(out / "checkpoint.pth.tar").weights
    assert "conv1.weight" in backbone and not [k for k in backbone if k.startswith(("norm.", "fc."))]
