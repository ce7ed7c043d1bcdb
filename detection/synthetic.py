"""A synthetic detection dataset: coloured shapes on textured backgrounds, in VOC or COCO format.

Each image is a function of (seed, split, index) alone, so the same command writes the same
files anywhere. The class of an object is its shape; its colour is random but far from the
background's, so a small detector learns the task in minutes on a CPU. Objects partly covered by
later ones get the box of their visible part, and are marked `difficult` when less than half of
them shows (VOC's convention for objects that evaluation should not count).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
SPLITS = ("trainval", "test")


@dataclass(frozen=True)
class SyntheticConfig:
    """What the generated images look like."""

    classes: tuple[str, ...] = ("circle", "square", "triangle")
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    min_frac: float = 0.25  # object side as a fraction of the image side
    max_frac: float = 0.6
    max_overlap: float = 0.3  # IoU above which a placement is redrawn

    def __post_init__(self) -> None:
        unknown = set(self.classes) - set(SHAPES)
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names among {SHAPES}; got {list(self.classes)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects; got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_frac <= self.max_frac <= 1:
            raise ValueError(f"need 0 < min_frac <= max_frac <= 1; got {self.min_frac}, {self.max_frac}")


@dataclass(frozen=True)
class SyntheticObject:
    name: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2: pixels x1..x2-1 (continuous coordinates)
    difficult: bool


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient, a faint stripe or checker texture and pixel noise. H x W x 3 float."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    period = rng.uniform(6, 20)
    if rng.random() < 0.5:
        texture = np.sin(2 * np.pi * (xx * np.cos(angle * 3) + yy * np.sin(angle * 3)) * size / period)
    else:
        texture = np.sign(np.sin(2 * np.pi * xx * size / period) * np.sin(2 * np.pi * yy * size / period))
    img = img + rng.uniform(8, 20) * texture[..., None] + rng.normal(0, 6, img.shape)
    return img


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A saturated colour at least 150 (L1 over RGB) away from the background's mean colour."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        colour[rng.integers(3)] = rng.choice([0.0, 255.0])
        if np.abs(colour - mean).sum() >= 150:
            return colour
    return 255.0 - mean


def _shape_mask(shape: str, size: int, box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=255)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=255)
    elif shape == "triangle":
        apex = x1 + rng.uniform(0.2, 0.8) * (x2 - x1)
        draw.polygon([(apex, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=255)
    elif shape == "cross":
        w, h = x2 - x1, y2 - y1
        draw.rectangle([x1 + w * 0.35, y1, x1 + w * 0.65, y2 - 1], fill=255)
        draw.rectangle([x1, y1 + h * 0.35, x2 - 1, y1 + h * 0.65], fill=255)
    else:
        raise ValueError(shape)
    return np.asarray(mask) > 127


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def render(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, list[SyntheticObject]]:
    """One image (H x W x 3 uint8) and its objects."""
    size = cfg.image_size
    img = _background(rng, size)
    placed: list[tuple[str, np.ndarray, tuple[int, int, int, int]]] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        for _attempt in range(20):
            w = int(rng.uniform(cfg.min_frac, cfg.max_frac) * size)
            h = int(np.clip(w * rng.uniform(0.75, 1.33), cfg.min_frac * size, cfg.max_frac * size))
            x1, y1 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x1, y1, x1 + w, y1 + h)
            if all(_iou(box, other) <= cfg.max_overlap for _, _, other in placed):
                break
        else:
            continue
        shape = cfg.classes[int(rng.integers(len(cfg.classes)))]
        mask = _shape_mask(shape, size, box, rng)
        img[mask] = _contrasting_colour(rng, img)
        placed.append((shape, mask, box))
    objects = []
    covered = np.zeros((size, size), dtype=bool)
    for shape, mask, _ in reversed(placed):  # later shapes cover earlier ones
        visible = mask & ~covered
        covered |= mask
        if visible.sum() < 0.1 * mask.sum():
            continue  # hidden: no box
        ys, xs = np.nonzero(visible)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SyntheticObject(shape, box, difficult=bool(visible.sum() < 0.5 * mask.sum())))
    objects.reverse()
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def generate(split: str, count: int, cfg: SyntheticConfig, seed: int):
    """Yield (file id, image, objects) for `count` images of `split`."""
    for i in range(count):
        image, objects = render(_rng(seed, split, i), cfg)
        yield f"{split}_{i:06d}", image, objects


def _voc_xml(file_id: str, size: int, objects: list[SyntheticObject]) -> str:
    parts = [f"<annotation><folder>synthetic</folder><filename>{file_id}.jpg</filename>",
             f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size><segmented>0</segmented>"]
    for o in objects:
        x1, y1, x2, y2 = o.box
        # VOC corners are 1-based and inclusive: pixels x1..x2-1 are xmin=x1+1 .. xmax=x2.
        parts.append(f"<object><name>{o.name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(o.difficult)}</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def write_voc(out: str | os.PathLike, cfg: SyntheticConfig, counts: dict[str, int], seed: int = 0,
              layout: str = "detectron2", year: int = 2007) -> Path:
    """Write OUT/VOC2007 (layout 'detectron2') or OUT/VOCdevkit/VOC2007 ('vocdevkit') with
    Annotations/, JPEGImages/, ImageSets/Main/{trainval,test}.txt and classes.txt. Returns the
    year folder."""
    if layout not in ("detectron2", "vocdevkit"):
        raise ValueError(f"layout must be 'detectron2' or 'vocdevkit'; got '{layout}'")
    year_dir = Path(out) / ("VOCdevkit" if layout == "vocdevkit" else "") / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year_dir / sub).mkdir(parents=True, exist_ok=True)
    (year_dir / "classes.txt").write_text("\n".join(cfg.classes) + "\n")
    for split, count in counts.items():
        ids = []
        for file_id, image, objects in generate(split, count, cfg, seed):
            Image.fromarray(image).save(year_dir / "JPEGImages" / f"{file_id}.jpg", quality=95)
            (year_dir / "Annotations" / f"{file_id}.xml").write_text(_voc_xml(file_id, cfg.image_size, objects))
            ids.append(file_id)
        (year_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return year_dir


def write_coco(out: str | os.PathLike, cfg: SyntheticConfig, counts: dict[str, int], seed: int = 0) -> Path:
    """Write OUT/{trainval,test}/*.jpg and OUT/annotations/instances_{trainval,test}.json.
    Category ids start at 1 in the order of `cfg.classes`. Returns OUT."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(cfg.classes)]
    cat_id = {c["name"]: c["id"] for c in categories}
    for split, count in counts.items():
        (out / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i, (file_id, image, objects) in enumerate(generate(split, count, cfg, seed)):
            Image.fromarray(image).save(out / split / f"{file_id}.jpg", quality=95)
            images.append({"id": i + 1, "file_name": f"{file_id}.jpg", "width": cfg.image_size,
                           "height": cfg.image_size})
            for o in objects:
                x1, y1, x2, y2 = o.box
                # COCO has no 'difficult': a mostly hidden object is a crowd region, which
                # evaluation likewise neither rewards nor penalises.
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_id[o.name],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)),
                                    "iscrowd": int(o.difficult)})
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories,
             "info": {"description": f"selfsup synthetic shapes, seed {seed}"}}))
    return out
