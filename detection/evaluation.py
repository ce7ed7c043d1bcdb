"""Inference over a dataset split across processes, and VOC / COCO box AP.

VOC: the devkit's rules as Detectron2's PascalVOCDetectionEvaluator applies them - detections
sorted by score, each matched to the unmatched ground-truth box of highest IoU above the
threshold, `difficult` objects neither rewarded nor penalised, AP with the VOC2007 11-point
interpolation (VOC2007 test) or the area under the precision envelope (later years). "AP" is
MoCo's VOC AP: the mean over IoU thresholds 0.50:0.05:0.95; AP50 and AP75 are single thresholds.
COCO: pycocotools' COCOeval against the annotation file.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from selfsup.data.sampler import shard_range
from selfsup.distributed import all_gather_objects

from .datasets import DetectionDataset, collate

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = tuple(range(50, 100, 5))  # percent


# ---------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def run_inference(model: nn.Module, dataset: DetectionDataset, device: torch.device, rank: int = 0,
                  world_size: int = 1, batch_size: int = 1, workers: int = 0) -> dict[int, dict] | None:
    """Detections for every image of `dataset`, gathered on rank 0.

    `model` is the bare model (not DDP-wrapped): processes may see different numbers of images,
    and evaluation needs no gradient synchronisation. Returns, on rank 0, {index: {'boxes': R x 4,
    'scores': R, 'labels': R}} (numpy, original image coordinates); None on other ranks.
    Raises if an image is missing or appears twice after gathering.
    """
    was_training = model.training
    model.eval()
    subset = torch.utils.data.Subset(dataset, range(*shard_range(len(dataset), world_size, rank)))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate)
    local: list[tuple[int, dict]] = []
    for i, (images, targets) in enumerate(loader):
        outputs = model([im.to(device, non_blocking=True) for im in images])
        for t, out in zip(targets, outputs):
            local.append((int(t["image_id"]), {k: v.cpu().numpy() for k, v in out.items()}))
        if rank == 0 and (i + 1) % 500 == 0:
            logger.info("inference: %d/%d images on rank 0", len(local), len(subset))
    model.train(was_training)
    if world_size > 1:
        gathered = all_gather_objects(local)
        if rank != 0:
            return None
        local = [item for part in gathered for item in part]
    predictions = dict(local)
    if len(predictions) != len(local) or sorted(predictions) != list(range(len(dataset))):
        raise RuntimeError(
            f"distributed inference returned {len(local)} results for {len(predictions)} distinct images out of "
            f"{len(dataset)}; every image must be evaluated exactly once"
        )
    return predictions


# ---------------------------------------------------------------------------------------------- VOC


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of `box` (4,) with each of `boxes` (N x 4), continuous x1 y1 x2 y2 coordinates."""
    iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a precision/recall curve: the mean of the best precision at recall >= 0, 0.1, ...,
    1 (VOC2007, 11 points), or the area under the monotone precision envelope."""
    if use_07_metric:
        # np.arange as the devkit: its 0.30000000000000004 decides ties at recall 0.3 the same way.
        return float(sum(precision[recall >= t].max() if (recall >= t).any() else 0.0
                         for t in np.arange(0.0, 1.1, 0.1)) / 11.0)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_class_ap(detections: Sequence[tuple[int, float, np.ndarray]],
                 ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray]], iou_threshold: float,
                 use_07_metric: bool = True) -> float | None:
    """AP of one class.

    detections: (image, score, box) triples. ground_truth: image -> (boxes M x 4, difficult M).
    Returns None when the class has no non-difficult object (its AP is undefined).
    """
    npos = int(sum((~difficult).sum() for _, difficult in ground_truth.values()))
    if npos == 0:
        return None
    order = np.argsort([-d[1] for d in detections], kind="stable")
    matched = {img: np.zeros(len(gt[0]), dtype=bool) for img, gt in ground_truth.items()}
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank_, i in enumerate(order):
        img, _, box = detections[i]
        gt_boxes, difficult = ground_truth.get(img, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(gt_boxes) == 0:
            fp[rank_] = 1
            continue
        ious = box_iou(gt_boxes.astype(np.float64), np.asarray(box, dtype=np.float64))
        j = int(np.argmax(ious))
        if ious[j] > iou_threshold:
            if difficult[j]:
                continue  # neither a hit nor a miss
            if not matched[img][j]:
                tp[rank_], matched[img][j] = 1, True
            else:
                fp[rank_] = 1  # a duplicate
        else:
            fp[rank_] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric)


def evaluate_voc(predictions: Mapping[int, dict], dataset: DetectionDataset,
                 use_07_metric: bool | None = None) -> dict[str, float]:
    """VOC box AP in percent: 'AP' (mean over IoU 0.50:0.95, MoCo's VOC AP), 'AP50', 'AP75' and
    'AP50-<class>' for each class. Classes without a (non-difficult) object are left out of the means.

    `use_07_metric` None: the 11-point metric for VOC2007 (and sets of unknown year), area otherwise.
    """
    if use_07_metric is None:
        use_07_metric = dataset.info.voc_year in (None, 2007)
    num_classes = len(dataset.class_names)
    dets: dict[int, list] = defaultdict(list)
    gts: dict[int, dict] = defaultdict(dict)
    for index, rec in enumerate(dataset.records):
        for c in range(1, num_classes + 1):
            keep = rec.labels == c
            if keep.any():
                gts[c][index] = (rec.boxes[keep], rec.difficult[keep])
        pred = predictions.get(index)
        if pred is not None:
            for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"]):
                dets[int(label)].append((index, float(score), box))
    aps: dict[int, dict[int, float]] = defaultdict(dict)  # threshold -> class -> AP
    for c in range(1, num_classes + 1):
        for t in IOU_THRESHOLDS:
            ap = voc_class_ap(dets[c], gts[c], t / 100.0, use_07_metric)
            if ap is not None:
                aps[t][c] = ap * 100.0
    if not aps:
        raise ValueError(f"{dataset.info.name} has no object to evaluate against")
    mean_ap = {t: float(np.mean(list(v.values()))) for t, v in aps.items()}
    result = {"AP": float(np.mean(list(mean_ap.values()))), "AP50": mean_ap[50], "AP75": mean_ap[75]}
    for c, ap in aps[50].items():
        result[f"AP50-{dataset.class_names[c - 1]}"] = ap
    return result


# ---------------------------------------------------------------------------------------------- COCO


def evaluate_coco(predictions: Mapping[int, dict], dataset: DetectionDataset) -> dict[str, float | None]:
    """COCO box AP in percent ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl') with pycocotools."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("COCO evaluation needs pycocotools: pip install pycocotools") from e
    info = dataset.info
    results = []
    for index, pred in predictions.items():
        image_id = dataset.records[index].image_id
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": image_id, "category_id": info.category_ids[int(label) - 1],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not results:
        return {k: 0.0 for k in names}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        gt = COCO(info.coco_json)
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.params.imgIds = [r.image_id for r in dataset.records]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("pycocotools:\n%s", "\n".join(line for line in out.getvalue().splitlines() if "Average" in line))
    # pycocotools reports -1 for an area range without objects: null in metrics.jsonl, not NaN.
    return {k: float(v) * 100.0 if v >= 0 else None for k, v in zip(names, coco_eval.stats[:6])}


def evaluate(predictions: Mapping[int, dict], dataset: DetectionDataset) -> dict[str, float]:
    """The metric of the dataset's kind: VOC's for VOC-format sets, COCO's for COCO-format ones."""
    if dataset.info.kind == "voc":
        return evaluate_voc(predictions, dataset)
    return evaluate_coco(predictions, dataset)


def summary(name: str, metrics: Mapping[str, float], keys: Iterable[str] = ("AP", "AP50", "AP75")) -> str:
    return f"{name}: " + "  ".join(f"{k} {metrics[k]:.2f}" for k in keys if k in metrics)
