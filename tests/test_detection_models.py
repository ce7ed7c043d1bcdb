"""The torchvision detectors: weights land where they belong, norms, freezing, the C4 head."""

from __future__ import annotations

import sys
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import REPO
from torchvision.ops import FrozenBatchNorm2d

sys.path.insert(0, str(REPO))

from selfsup import build_model  # noqa: E402
from selfsup.checkpoint import CheckpointError  # noqa: E402

from detection.engine import warmup_multistep_lr  # noqa: E402
from detection.models import DetectorConfig, build_detector, build_resnet, check_norm  # noqa: E402

TINY = dict(train_sizes=(64,), test_size=64, max_size=64, roi_batch_size=16, fpn_channels=32, box_head_dim=64)


def save_project_checkpoint(path, arch="resnet18", small_stem=False, method="byol"):
    torch.manual_seed(0)
    options = dict(K=32) if method == "moco" else dict(hidden_dim=32)
    model = build_model(method, arch, small_stem=small_stem, dim=16, **options)
    for m in model.modules():  # non-default statistics, so a lost buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    torch.save({"arch": arch, "method": method, "args": {"arch": arch, "small_stem": small_stem},
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model.encoder_q


def targets(n=2):
    return [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 44.0]]), "labels": torch.tensor([1])} for _ in range(n)]


def test_pretrained_weights_reach_the_fpn_detector(tmp_path):
    q = save_project_checkpoint(tmp_path / "c.pth.tar")
    resnet, arch, small_stem = build_resnet(str(tmp_path / "c.pth.tar"))
    assert (arch, small_stem) == ("resnet18", False)
    model = build_detector(resnet, DetectorConfig(arch=arch, head="fpn", num_classes=2, norm="bn", **TINY))
    body = model.backbone.body
    torch.testing.assert_close(body.conv1.weight, q.conv1.weight)
    torch.testing.assert_close(body.layer3[1].conv2.weight, q.layer3[1].conv2.weight)
    torch.testing.assert_close(body.layer4[0].downsample[1].running_var, q.layer4[0].downsample[1].running_var)
    assert all(p.requires_grad for p in model.parameters()), "all stages are trained by default"


def test_c4_detector_layout_and_weights(tmp_path):
    q = save_project_checkpoint(tmp_path / "c.pth.tar")
    resnet, arch, _ = build_resnet(str(tmp_path / "c.pth.tar"))
    model = build_detector(resnet, DetectorConfig(arch=arch, head="c4", num_classes=3, norm="bn", **TINY))
    # res5 (layer4) is the RoI head, followed by the extra norm; the backbone stops at res4.
    assert [n for n, _ in model.backbone.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                                                "layer3"]
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, q.layer3[0].conv1.weight)
    assert model.backbone.out_channels == 256
    head = model.roi_heads.box_head
    torch.testing.assert_close(head.res5[1].conv1.weight, q.layer4[1].conv1.weight)
    assert isinstance(head.norm, nn.BatchNorm2d) and head.norm.num_features == 512
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    model.train()
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert head.norm.weight.grad is not None and q.layer4[1].conv1.weight.shape == head.res5[1].conv1.weight.grad.shape
    model.eval()
    model.rpn._post_nms_top_n["testing"] = 20  # keep the CPU test fast
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70)])
    assert out[0]["boxes"].shape[1] == 4


def test_frozen_bn_keeps_statistics_and_freeze_at(tmp_path):
    q = save_project_checkpoint(tmp_path / "c.pth.tar")
    resnet, arch, _ = build_resnet(str(tmp_path / "c.pth.tar"))
    model = build_detector(resnet, DetectorConfig(arch=arch, head="fpn", num_classes=2, norm="frozenbn", freeze_at=2,
                                                  **TINY))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    body = model.backbone.body
    assert isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(body.layer2[0].bn1.running_mean, q.layer2[0].bn1.running_mean)
    torch.testing.assert_close(body.layer2[0].bn1.weight, q.layer2[0].bn1.weight.detach())
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    # A frozen BN computes the same function as the BN it replaced, in evaluation mode.
    x = torch.randn(2, 128, 5, 5)
    torch.testing.assert_close(body.layer2[0].bn1(x), q.layer2[0].bn1.eval()(x))


def test_resnet50_bottleneck_checkpoint_and_small_stem(tmp_path):
    save_project_checkpoint(tmp_path / "r50.pth.tar", arch="resnet50", method="moco")
    resnet, arch, _ = build_resnet(str(tmp_path / "r50.pth.tar"))
    assert arch == "resnet50" and resnet.layer4[0].conv3.out_channels == 2048
    save_project_checkpoint(tmp_path / "small.pth.tar", small_stem=True)
    resnet, _, small_stem = build_resnet(str(tmp_path / "small.pth.tar"))
    assert small_stem and resnet.conv1.kernel_size == (3, 3) and isinstance(resnet.maxpool, nn.Identity)


def test_mismatches_are_errors(tmp_path):
    save_project_checkpoint(tmp_path / "c.pth.tar")
    with pytest.raises(ValueError, match="contradicts"):
        build_resnet(str(tmp_path / "c.pth.tar"), arch="resnet50")
    # A bare state dict says nothing about its arch: the shapes catch it.
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        build_resnet(str(tmp_path / "bare.pth"), arch="resnet50")
    state = torchvision.models.resnet18().state_dict()
    del state["layer2.1.bn2.running_var"]
    state["layer2.1.extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"Missing keys: \['layer2.1.bn2.running_var'\].*extra"):
        build_resnet(str(tmp_path / "broken.pth"), arch="resnet18")


def test_syncbn_needs_cuda_and_ddp():
    with pytest.raises(ValueError, match="--norm bn"):
        check_norm("syncbn", torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="1 process"):
        check_norm("syncbn", torch.device("cuda", 0), 1)
    check_norm("syncbn", torch.device("cuda", 0), 8)
    check_norm("bn", torch.device("cpu"), 1)


def test_supervised_weights_offline_is_a_clear_error(monkeypatch):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    with pytest.raises(CheckpointError, match=r"Offline, copy that file to .*resnet18-f37072fd\.pth"):
        build_resnet("supervised", "resnet18")


def test_random_init_builds_without_downloading(monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    resnet, arch, small_stem = build_resnet("random", "resnet18")
    assert (arch, small_stem) == ("resnet18", False)


def test_warmup_multistep_schedule_by_hand():
    lr = lambda it: warmup_multistep_lr(0.02, it, (18000, 22000), warmup_iters=100)  # noqa: E731
    assert lr(0) == pytest.approx(0.02 * 0.001)
    assert lr(50) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr(100) == lr(17999) == pytest.approx(0.02)
    assert lr(18000) == pytest.approx(0.002) and lr(22000) == pytest.approx(0.0002)
