"""PASCAL VOC and COCO readers for detection fine-tuning, and Detectron2's dataset names.

Datasets are named as in Detectron2 (`voc_2007_trainval`, `coco_2017_val`, ...) and found under
a data root laid out like Detectron2's `datasets/` folder; any other folder is named explicitly
as `voc:YEAR_DIR:SPLIT` or `coco:IMAGE_DIR:ANNOTATIONS.json`.

Boxes are kept in continuous pixel coordinates (x1, y1, x2, y2), where a box covering pixels
0..W-1 spans 0..W. VOC's 1-based inclusive corners become (xmin - 1, ymin - 1, xmax, ymax), as
Detectron2 reads them; plain IoU in these coordinates equals the VOC devkit's "+1" IoU.
Label 0 is the background; object classes are 1..K in the order of `class_names`.
"""

from __future__ import annotations

import json
import os
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# Detectron2's order of the 20 PASCAL VOC classes.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# A VOC-format folder with other classes lists them here, one per line, in label order.
VOC_CLASSES_FILE = "classes.txt"


@dataclass(frozen=True)
class ImageRecord:
    """One image and its objects."""

    file_name: str
    image_id: str | int  # VOC file id or COCO image id, as in the annotation files
    height: int
    width: int
    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2, continuous pixel coordinates
    labels: np.ndarray  # N int64 in 1..K
    difficult: np.ndarray  # N bool (VOC's flag; always False for COCO)


@dataclass(frozen=True)
class DatasetInfo:
    """What evaluation needs to know about where a dataset came from."""

    name: str
    kind: str  # 'voc' or 'coco'
    class_names: tuple[str, ...]
    voc_year: int | None = None  # VOC2007 test uses the 11-point metric
    coco_json: str | None = None  # the ground truth pycocotools evaluates against
    category_ids: tuple[int, ...] = field(default=())  # COCO category id of label 1..K


class DetectionDataset(torch.utils.data.Dataset):
    """Images and targets in torchvision's detection format.

    An item is `(image, target)`: image 3 x H x W float in [0, 1] at its original size (the
    model resizes and normalises), target {'boxes': N x 4, 'labels': N, 'image_id': index}.
    Indexing with `(index, sample_seed)` - what selfsup's ResumableDistributedSampler yields -
    applies the training augmentation (a horizontal flip with probability 1/2) decided by the
    seed alone, so the data of a step does not depend on loader workers.
    """

    def __init__(self, records: Sequence[ImageRecord], info: DatasetInfo, train: bool = False) -> None:
        self.records = list(records)
        self.info = info
        self.train = train

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item) -> tuple[torch.Tensor, dict]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        rec = self.records[index]
        with Image.open(rec.file_name) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # 3 x H x W uint8
        image = image.float().div_(255.0)
        boxes = torch.from_numpy(rec.boxes).float().reshape(-1, 4)
        if self.train and seed is not None and random.Random(seed).random() < 0.5:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {"boxes": boxes, "labels": torch.from_numpy(rec.labels).long(), "image_id": index}
        return image, target

    def without_empty(self) -> "DetectionDataset":
        """The images with at least one object (training skips the others, as Detectron2)."""
        return DetectionDataset([r for r in self.records if len(r.labels)], self.info, self.train)


def collate(batch):
    """Detection batches are lists: images have different sizes."""
    return tuple(zip(*batch))


def concat(datasets: Sequence[DetectionDataset]) -> DetectionDataset:
    """One training set from several (VOC07+12); their class lists must agree."""
    first = datasets[0]
    for d in datasets[1:]:
        if d.class_names != first.class_names:
            raise ValueError(
                f"datasets '{first.info.name}' and '{d.info.name}' have different classes "
                f"({list(first.class_names)} vs {list(d.class_names)}); they cannot be trained together"
            )
    records = [r for d in datasets for r in d.records]
    name = "+".join(d.info.name for d in datasets)
    return DetectionDataset(records, replace(first.info, name=name), first.train)


# ---------------------------------------------------------------------------------------------- VOC


def _text(node: ET.Element, tag: str, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        if default is not None:
            return default
        raise ValueError(f"missing <{tag}>")
    return child.text.strip()


def read_voc_classes(year_dir: str | os.PathLike) -> tuple[str, ...]:
    """`YEAR_DIR/classes.txt` when present (custom and synthetic VOC-format data), else VOC's 20."""
    path = Path(year_dir) / VOC_CLASSES_FILE
    if path.is_file():
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if not names:
            raise ValueError(f"{path} lists no class")
        return names
    return VOC_CLASSES


def load_voc(year_dir: str | os.PathLike, split: str, class_names: Sequence[str] | None = None,
             name: str | None = None, train: bool = False) -> DetectionDataset:
    """A PASCAL VOC year folder (Annotations/, ImageSets/Main/SPLIT.txt, JPEGImages/).

    Every object is kept, `difficult` ones included (Detectron2 trains on them; VOC evaluation
    ignores them). An object of a class outside `class_names` is an error, not a silent drop.
    """
    year_dir = Path(year_dir)
    split_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (year_dir / "ImageSets" / "Main").glob("*.txt"))
        raise FileNotFoundError(
            f"no image list {split_file}; a VOC year folder holds Annotations/, ImageSets/Main/<split>.txt "
            f"and JPEGImages/. Splits found there: {available[:10] or 'none'}"
        )
    class_names = tuple(class_names) if class_names is not None else read_voc_classes(year_dir)
    index = {c: i + 1 for i, c in enumerate(class_names)}
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    records, unknown = [], set()
    for file_id in ids:
        xml_path = year_dir / "Annotations" / f"{file_id}.xml"
        try:
            root = ET.parse(xml_path).getroot()
            size = root.find("size")
            width, height = int(float(_text(size, "width"))), int(float(_text(size, "height")))
            boxes, labels, difficult = [], [], []
            for obj in root.findall("object"):
                cls = _text(obj, "name")
                if cls not in index:
                    unknown.add(cls)
                    continue
                bb = obj.find("bndbox")
                x1, y1, x2, y2 = (float(_text(bb, t)) for t in ("xmin", "ymin", "xmax", "ymax"))
                boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
                labels.append(index[cls])
                difficult.append(bool(int(_text(obj, "difficult", "0"))))
        except (OSError, ET.ParseError, ValueError, AttributeError) as e:
            raise ValueError(f"cannot read VOC annotation {xml_path}: {e}") from e
        records.append(ImageRecord(
            file_name=str(year_dir / "JPEGImages" / f"{file_id}.jpg"), image_id=file_id, height=height, width=width,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=np.asarray(labels, dtype=np.int64),
            difficult=np.asarray(difficult, dtype=bool)))
    if unknown:
        raise ValueError(
            f"{year_dir}: objects of classes {sorted(unknown)} are not among the {len(class_names)} classes "
            f"{list(class_names)}; list the dataset's classes in {year_dir / VOC_CLASSES_FILE}"
        )
    year = _voc_year(year_dir)
    info = DatasetInfo(name=name or f"voc:{year_dir}:{split}", kind="voc", class_names=class_names, voc_year=year)
    return DetectionDataset(records, info, train)


def _voc_year(year_dir: Path) -> int | None:
    digits = "".join(ch for ch in year_dir.name if ch.isdigit())
    return int(digits) if len(digits) == 4 else None


def find_voc_year_dir(data_root: str | os.PathLike, year: int) -> Path:
    """`ROOT/VOC2007` (Detectron2's datasets/ layout) or `ROOT/VOCdevkit/VOC2007` (the devkit's)."""
    root = Path(data_root)
    candidates = [root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"]
    for c in candidates:
        if (c / "Annotations").is_dir():
            return c
    raise FileNotFoundError(
        f"PASCAL VOC {year} not found: looked for {candidates[0]} and {candidates[1]} (each with Annotations/, "
        "ImageSets/Main/ and JPEGImages/). Set --data-root (or $DETECTRON2_DATASETS) to the folder that holds them."
    )


# ---------------------------------------------------------------------------------------------- COCO


def load_coco(image_dir: str | os.PathLike, json_path: str | os.PathLike, name: str | None = None,
              train: bool = False) -> DetectionDataset:
    """A COCO-format detection set: boxes of `json_path`, images under `image_dir`.

    Category ids map to labels 1..K in increasing id order. Crowd regions are left out of the
    training targets (pycocotools still uses them from the json when evaluating).
    """
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read COCO annotations {json_path}: {e}") from e
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_path} is not a COCO detection file: it has no '{key}' list")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
    per_image: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0) or ann["image_id"] not in per_image:
            continue
        x, y, w, h = ann["bbox"]
        if w > 0 and h > 0:
            per_image[ann["image_id"]].append(ann)
    records = []
    for img in data["images"]:
        anns = per_image[img["id"]]
        records.append(ImageRecord(
            file_name=str(Path(image_dir) / img["file_name"]), image_id=img["id"], height=int(img["height"]),
            width=int(img["width"]),
            boxes=np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray([label_of[a["category_id"]] for a in anns], dtype=np.int64),
            difficult=np.zeros(len(anns), dtype=bool)))
    info = DatasetInfo(name=name or f"coco:{image_dir}:{json_path}", kind="coco",
                       class_names=tuple(c["name"] for c in cats), coco_json=str(json_path),
                       category_ids=tuple(c["id"] for c in cats))
    return DetectionDataset(records, info, train)


# ---------------------------------------------------------------------------------------------- names


def default_data_root() -> str:
    """Detectron2's convention: $DETECTRON2_DATASETS, else ./datasets."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def build_dataset(spec: str, data_root: str | os.PathLike | None = None, train: bool = False) -> DetectionDataset:
    """A dataset from its name.

    Detectron2 names, under `data_root`: voc_{2007,2012}_{train,val,trainval,test} (VOC2007/ or
    VOCdevkit/VOC2007/), coco_{2014,2017}_{train,val} (coco/{train,val}YEAR/ and
    coco/annotations/instances_{train,val}YEAR.json). Explicit folders: voc:YEAR_DIR:SPLIT and
    coco:IMAGE_DIR:ANNOTATIONS.json.
    """
    root = Path(data_root if data_root is not None else default_data_root())
    if spec.startswith("voc:"):
        path, sep, split = spec[4:].rpartition(":")
        if not sep or not path:
            raise ValueError(f"'{spec}': write an explicit VOC set as voc:YEAR_DIR:SPLIT, e.g. voc:data/VOC2007:test")
        return load_voc(path, split, name=spec, train=train)
    if spec.startswith("coco:"):
        images, sep, ann = spec[5:].partition(":")
        if not sep or not images or not ann:
            raise ValueError(f"'{spec}': write an explicit COCO set as coco:IMAGE_DIR:ANNOTATIONS.json")
        return load_coco(images, ann, name=spec, train=train)
    parts = spec.split("_")
    if len(parts) == 3 and parts[0] == "voc" and parts[1].isdigit():
        return load_voc(find_voc_year_dir(root, int(parts[1])), parts[2], name=spec, train=train)
    if len(parts) == 3 and parts[0] == "coco" and parts[1].isdigit() and parts[2] in ("train", "val"):
        year, split = parts[1], parts[2]
        return load_coco(root / "coco" / f"{split}{year}", root / "coco" / "annotations" / f"instances_{split}{year}.json",
                         name=spec, train=train)
    raise ValueError(
        f"unknown dataset '{spec}': use a Detectron2 name (voc_2007_trainval, voc_2012_trainval, voc_2007_test, "
        "coco_2017_train, coco_2017_val) or voc:YEAR_DIR:SPLIT / coco:IMAGE_DIR:ANNOTATIONS.json"
    )
