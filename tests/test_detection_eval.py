"""VOC and COCO AP against hand-computed cases; distributed inference sees every image once."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import REPO, run_distributed
from PIL import Image

sys.path.insert(0, str(REPO))

from detection.datasets import DatasetInfo, DetectionDataset, ImageRecord, load_coco  # noqa: E402
from detection.evaluation import (  # noqa: E402
    box_iou,
    evaluate_coco,
    evaluate_voc,
    run_inference,
    voc_ap,
    voc_class_ap,
)


def record(boxes, labels, difficult=None, image_id="x") -> ImageRecord:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return ImageRecord(file_name="", image_id=image_id, height=100, width=100, boxes=boxes,
                       labels=np.asarray(labels, dtype=np.int64),
                       difficult=np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool))


def pred(boxes, scores, labels) -> dict:
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
            "labels": np.asarray(labels, np.int64)}


def test_voc_class_ap_by_hand():
    """Two images, one class. Ground truth: G1 and a difficult G2 in image 0, G3 in image 1.
    Detections by score: d1 hits G1 (TP), d2 hits G1 again (FP, duplicate), d3 hits the difficult
    G2 (ignored), d4 misses in image 1 (FP), d5 hits G3 (TP). Two positives count.
    Recall 1/2, 1/2, 1/2, 1 ; precision 1, 1/2, 1/3, 1/2 (after the ignored one).
    11-point AP: recall >= 0..0.5 (6 points) reach precision 1, recall >= 0.6..1 (5 points)
    only 1/2: (6 + 2.5) / 11. Area under the envelope: 0.5 * 1 + 0.5 * 0.5 = 0.75."""
    gt = {0: (np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([False, True])),
          1: (np.array([[20, 20, 40, 40]], float), np.array([False]))}
    dets = [(0, 0.9, np.array([0, 0, 10, 9])), (0, 0.8, np.array([1, 0, 10, 10])),
            (0, 0.7, np.array([50, 50, 60, 60])), (1, 0.6, np.array([20, 20, 26, 40])),
            (1, 0.5, np.array([20, 20, 40, 40]))]
    assert voc_class_ap(dets, gt, 0.5, use_07_metric=True) == pytest.approx(8.5 / 11)
    assert voc_class_ap(dets, gt, 0.5, use_07_metric=False) == pytest.approx(0.75)
    assert voc_class_ap(dets[::-1], gt, 0.5) == pytest.approx(8.5 / 11)  # input order does not matter
    assert voc_class_ap(dets, {0: (np.zeros((1, 4)), np.array([True]))}, 0.5) is None  # no positives


def test_iou_threshold_is_strict():
    gt = {0: (np.array([[0, 0, 10, 10]], float), np.array([False]))}
    half = (0, 1.0, np.array([0, 0, 10, 5]))  # IoU exactly 0.5
    assert voc_class_ap([half], gt, 0.5) == 0.0
    assert voc_class_ap([half], gt, 0.45) == 1.0


def test_voc_iou_equals_the_devkit_plus_one_formula():
    """VOC devkit IoU on 1-based inclusive pixel boxes (widths x2 - x1 + 1) equals plain IoU after
    the reader's (x1 - 1, y1 - 1, x2, y2) conversion."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = np.sort(rng.integers(1, 60, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]  # x1 y1 x2 y2, 1-based
        b = np.sort(rng.integers(1, 60, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]
        iw = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0)
        ih = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0)
        inter = iw * ih
        devkit = inter / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter)
        conv = lambda v: np.array([v[0] - 1, v[1] - 1, v[2], v[3]], float)  # noqa: E731
        assert box_iou(conv(a)[None], conv(b))[0] == pytest.approx(devkit)


def test_voc_ap_over_thresholds():
    """One object, one detection with IoU 0.72: a hit at 0.50 .. 0.70 (5 of the 10 thresholds),
    a miss from 0.75 on. MoCo's AP = 50, AP50 = 100, AP75 = 0."""
    info = DatasetInfo(name="t", kind="voc", class_names=("a", "b"), voc_year=2007)
    ds = DetectionDataset([record([[0, 0, 100, 100]], [1])], info)
    iou = 0.72
    preds = {0: pred([[0, 0, 100, 100 * iou]], [0.9], [1])}
    assert box_iou(np.array([[0, 0, 100, 100]], float), np.array([0, 0, 100, 72.0]))[0] == pytest.approx(iou)
    res = evaluate_voc(preds, ds)
    assert res["AP50"] == pytest.approx(100) and res["AP75"] == pytest.approx(0) and res["AP"] == pytest.approx(50)
    assert "AP50-b" not in res  # class b has no object: left out of the means
    # A second class with a missed object halves every mean.
    ds2 = DetectionDataset([record([[0, 0, 100, 100], [0, 0, 10, 10]], [1, 2])], info)
    assert evaluate_voc(preds, ds2)["AP50"] == pytest.approx(50)


def test_voc_ap_11_point_against_devkit_loop():
    """The vectorised 11-point AP against the devkit's loop, on random curves."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        rec = np.sort(rng.uniform(0, 1, 20))
        prec = rng.uniform(0, 1, 20)
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            ap += (np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) / 11.0
        assert voc_ap(rec, prec, True) == pytest.approx(ap)
    # Recalls on the sampling points themselves (k/10, as with 10 positives) decide like the devkit.
    rec = np.arange(1, 11) / 10
    prec = np.linspace(1, 0.1, 10)
    devkit = sum((np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) for t in np.arange(0.0, 1.1, 0.1)) / 11.0
    assert voc_ap(rec, prec, True) == pytest.approx(devkit, abs=1e-12)


def coco_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i in range(3):
        Image.new("RGB", (64, 48)).save(tmp_path / "img" / f"{i}.jpg")
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 64, "height": 48})
        anns.append({"id": i + 1, "image_id": 100 + i, "category_id": 5 if i else 9, "bbox": [4 + i, 6, 30, 20],
                     "area": 600.0, "iscrowd": 0})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": 9, "name": "b"}, {"id": 5, "name": "a"}]}))
    return load_coco(tmp_path / "img", tmp_path / "ann.json")


def test_coco_ap_perfect_shifted_and_empty(tmp_path):
    pytest.importorskip("pycocotools")  # optional: absent on a machine without pip
    ds = coco_dataset(tmp_path)
    perfect = {i: pred(r.boxes, [0.9], r.labels) for i, r in enumerate(ds.records)}
    res = evaluate_coco(perfect, ds)
    assert res["AP"] == pytest.approx(100) and res["AP50"] == pytest.approx(100)
    assert res["APs"] == pytest.approx(100) and res["APm"] is None  # 30 x 20 boxes are all "small" (< 32^2)
    # Boxes shifted by 10 of their 30 px width: IoU 20*20/(2*600-400) = 0.5 -> counted at 0.50 only.
    shifted = {i: pred(r.boxes + np.array([10, 0, 10, 0]), [0.9], r.labels) for i, r in enumerate(ds.records)}
    res = evaluate_coco(shifted, ds)
    assert res["AP50"] == pytest.approx(100) and res["AP75"] == pytest.approx(0)
    assert res["AP"] == pytest.approx(10, abs=0.01)  # 1 of the 10 thresholds
    wrong_class = {i: pred(r.boxes, [0.9], 3 - r.labels) for i, r in enumerate(ds.records)}
    assert evaluate_coco(wrong_class, ds)["AP"] == pytest.approx(0)
    assert evaluate_coco({}, ds)["AP"] == 0.0


class MeanBoxModel(nn.Module):
    """A fake detector whose one box encodes the image's mean value (to check the pairing)."""

    def forward(self, images):
        return [{"boxes": torch.tensor([[0.0, 0.0, 1.0 + im.mean().item() * 100, 5.0]]),
                 "scores": torch.tensor([1.0]), "labels": torch.tensor([1])} for im in images]


class ConstantImages(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 4, 4), i / 100.0), {"image_id": i}


def _distributed_inference(rank, world_size, n):
    return run_inference(MeanBoxModel(), ConstantImages(n), torch.device("cpu"), rank, world_size, batch_size=2)


@pytest.mark.e2e
def test_distributed_inference_neither_duplicates_nor_drops(tmp_path):
    n = 7  # not a multiple of the world size: DistributedSampler would pad with duplicates
    results = run_distributed(_distributed_inference, 2, tmp_path, n)
    assert results[1] is None
    gathered = results[0]
    assert sorted(gathered) == list(range(n))
    for i, p in gathered.items():
        assert p["boxes"][0, 2] == pytest.approx(1 + i)  # image i's own output
    single = run_inference(MeanBoxModel(), ConstantImages(n), torch.device("cpu"))
    assert all(np.array_equal(single[i]["boxes"], gathered[i]["boxes"]) for i in range(n))
