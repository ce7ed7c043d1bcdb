"""VOC and COCO readers on hand-written folders, dataset names, the synthetic generator."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

sys.path.insert(0, str(REPO))

from detection.datasets import VOC_CLASSES, build_dataset, concat, load_voc  # noqa: E402
from detection.make_synthetic import main as make_synthetic  # noqa: E402
from detection.synthetic import SyntheticConfig, render  # noqa: E402


def voc_object(name: str, box: tuple[int, int, int, int], difficult: int | None = 0) -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>{diff}"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def write_voc_year(year_dir: Path, images: dict[str, list[str]], splits: dict[str, list[str]], size=(40, 30),
                   classes: list[str] | None = None) -> Path:
    """A VOC year folder written by hand: `images` maps a file id to its <object> elements."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year_dir / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    for file_id, objects in images.items():
        Image.new("RGB", (w, h), (10, 20, 30)).save(year_dir / "JPEGImages" / f"{file_id}.jpg")
        (year_dir / "Annotations" / f"{file_id}.xml").write_text(
            f"<annotation><filename>{file_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{''.join(objects)}</annotation>")
    for split, ids in splits.items():
        (year_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    if classes:
        (year_dir / "classes.txt").write_text("\n".join(classes) + "\n")
    return year_dir


IMAGES = {
    "000005": [voc_object("chair", (263, 211, 324, 339)), voc_object("chair", (5, 244, 67, 374), difficult=1)],
    "000007": [voc_object("car", (141, 50, 500, 330), difficult=None)],  # no <difficult>: not difficult
    "000009": [],
}


@pytest.mark.parametrize("layout", ["VOC2007", "VOCdevkit/VOC2007"])
def test_voc_reader_both_layouts(tmp_path, layout):
    write_voc_year(tmp_path / layout, IMAGES, {"test": ["000005", "000007", "000009"], "trainval": ["000007"]})
    ds = build_dataset("voc_2007_test", data_root=tmp_path)
    assert len(ds) == 3 and ds.class_names == VOC_CLASSES and ds.info.voc_year == 2007
    first = ds.records[0]
    assert first.image_id == "000005" and (first.width, first.height) == (40, 30)
    # 1-based inclusive corners -> continuous coordinates: (xmin - 1, ymin - 1, xmax, ymax).
    np.testing.assert_array_equal(first.boxes, [[262, 210, 324, 339], [4, 243, 67, 374]])
    chair = VOC_CLASSES.index("chair") + 1
    np.testing.assert_array_equal(first.labels, [chair, chair])
    np.testing.assert_array_equal(first.difficult, [False, True])
    assert ds.records[1].difficult.tolist() == [False] and ds.records[1].labels.tolist() == [VOC_CLASSES.index("car") + 1]
    assert ds.records[2].boxes.shape == (0, 4)
    assert len(build_dataset("voc_2007_trainval", data_root=tmp_path)) == 1
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["image_id"] == 0 and target["boxes"].shape == (2, 4)


def test_voc07_plus_12_and_training_filters(tmp_path):
    write_voc_year(tmp_path / "VOC2007", IMAGES, {"trainval": ["000005", "000009"]})
    write_voc_year(tmp_path / "VOCdevkit" / "VOC2012", {"2008_000001": [voc_object("dog", (1, 1, 10, 10))]},
                   {"trainval": ["2008_000001"]})
    both = concat([build_dataset(n, tmp_path, train=True) for n in ("voc_2007_trainval", "voc_2012_trainval")])
    assert [r.image_id for r in both.records] == ["000005", "000009", "2008_000001"]
    assert [r.image_id for r in both.without_empty().records] == ["000005", "2008_000001"]
    assert both.info.name == "voc_2007_trainval+voc_2012_trainval"


def test_voc_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOCdevkit"):
        build_dataset("voc_2007_test", data_root=tmp_path)
    year = write_voc_year(tmp_path / "VOC2007", {"a": [voc_object("unicorn", (1, 1, 5, 5))]}, {"test": ["a"]})
    with pytest.raises(ValueError, match=r"unicorn.*classes.txt"):
        load_voc(year, "test")
    with pytest.raises(FileNotFoundError, match="Splits found there: \\['test'\\]"):
        load_voc(year, "val")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("pascal_2007_test", tmp_path)


def test_voc_custom_classes(tmp_path):
    year = write_voc_year(tmp_path / "shapes", {"a": [voc_object("square", (1, 2, 5, 6)), voc_object("circle", (3, 3, 9, 9))]},
                          {"test": ["a"]}, classes=["circle", "square"])
    ds = build_dataset(f"voc:{year}:test")
    assert ds.class_names == ("circle", "square") and ds.records[0].labels.tolist() == [2, 1]
    assert ds.info.voc_year is None  # no year in the folder name


def test_coco_reader(tmp_path):
    (tmp_path / "img").mkdir()
    for name, size in (("a.jpg", (50, 40)), ("b.jpg", (20, 20))):
        Image.new("RGB", size).save(tmp_path / "img" / name)
    ann = {
        "images": [{"id": 11, "file_name": "a.jpg", "width": 50, "height": 40},
                   {"id": 12, "file_name": "b.jpg", "width": 20, "height": 20}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "bus"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [10, 5, 20, 15], "iscrowd": 0, "area": 300},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [0, 0, 4.5, 2], "iscrowd": 0, "area": 9},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [1, 1, 30, 30], "iscrowd": 1, "area": 900},
            {"id": 4, "image_id": 12, "category_id": 7, "bbox": [3, 3, 0, 4], "iscrowd": 0, "area": 0},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = build_dataset(f"coco:{tmp_path / 'img'}:{tmp_path / 'ann.json'}")
    assert ds.class_names == ("bus", "cat") and ds.info.category_ids == (3, 7)  # labels follow the ids
    a, b = ds.records
    assert a.image_id == 11 and (a.width, a.height) == (50, 40)
    np.testing.assert_allclose(a.boxes, [[10, 5, 30, 20], [0, 0, 4.5, 2]])  # crowd region left out
    assert a.labels.tolist() == [2, 1]
    assert b.boxes.shape == (0, 4)  # the zero-width box is dropped
    image, target = ds[0]
    assert image.shape == (3, 40, 50)


def test_coco_names_resolve_under_data_root(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    ds = build_dataset("coco_2017_val", tmp_path)
    assert ds.info.coco_json == str(tmp_path / "coco" / "annotations" / "instances_val2017.json")


def test_flip_follows_the_sample_seed(tmp_path):
    year = write_voc_year(tmp_path / "VOC2007", {"a": [voc_object("dog", (3, 5, 12, 20))]}, {"trainval": ["a"]},
                          size=(40, 30))
    rng = np.random.default_rng(0)
    # Lossless pixels under VOC's .jpg name (PIL reads the content, not the extension).
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(year / "JPEGImages" / "a.jpg", format="PNG")
    ds = load_voc(year, "trainval", train=True)
    flip_seed = next(s for s in range(100) if random.Random(s).random() < 0.5)
    keep_seed = next(s for s in range(100) if random.Random(s).random() >= 0.5)
    original, t0 = ds[(0, keep_seed)]
    flipped, t1 = ds[(0, flip_seed)]
    torch.testing.assert_close(flipped, original.flip(-1))
    assert t0["boxes"].tolist() == [[2, 4, 12, 20]]
    assert t1["boxes"].tolist() == [[40 - 12, 4, 40 - 2, 20]]
    test_view, _ = load_voc(year, "trainval", train=False)[(0, flip_seed)]
    torch.testing.assert_close(test_view, original)  # evaluation never flips


def test_synthetic_boxes_are_tight():
    cfg = SyntheticConfig(classes=("square",), image_size=64, min_objects=1, max_objects=1)
    for seed in range(5):
        image, objects = render(np.random.default_rng(seed), cfg)
        (obj,) = objects
        x1, y1, x2, y2 = obj.box
        inside = image[y1:y2, x1:x2].reshape(-1, 3)
        colour = inside[0]
        assert (inside == colour).all(), "a square fills its box with one colour"
        outside = []  # the pixel lines just outside each side of the box, where the image has them
        if y1 > 0:
            outside.append(image[y1 - 1, x1:x2])
        if y2 < 64:
            outside.append(image[y2, x1:x2])
        if x1 > 0:
            outside.append(image[y1:y2, x1 - 1])
        if x2 < 64:
            outside.append(image[y1:y2, x2])
        assert outside and all((line != colour).any(axis=1).all() for line in outside)


def test_synthetic_is_deterministic_and_formats_agree(tmp_path):
    args = ["--train", "6", "--test", "3", "--image-size", "48", "--seed", "3"]
    assert make_synthetic([str(tmp_path / "a"), "--format", "voc", *args]) == 0
    assert make_synthetic([str(tmp_path / "b"), "--format", "voc", "--layout", "vocdevkit", *args]) == 0
    assert make_synthetic([str(tmp_path / "c"), "--format", "coco", *args]) == 0
    a = build_dataset("voc_2007_trainval", tmp_path / "a")
    b = build_dataset("voc_2007_trainval", tmp_path / "b")  # found under VOCdevkit/
    c = build_dataset(f"coco:{tmp_path / 'c' / 'trainval'}:{tmp_path / 'c' / 'annotations' / 'instances_trainval.json'}")
    assert len(a) == len(b) == len(c) == 6 and a.class_names == c.class_names == ("circle", "square", "triangle")
    for ra, rb, rc in zip(a.records, b.records, c.records):
        assert (Path(ra.file_name).read_bytes() == Path(rb.file_name).read_bytes())
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
        # COCO has no difficult flag: those objects are crowd regions, which the reader leaves out.
        np.testing.assert_array_equal(ra.boxes[~ra.difficult], rc.boxes)
        np.testing.assert_array_equal(ra.labels[~ra.difficult], rc.labels)
        assert ((ra.boxes >= 0) & (ra.boxes <= 48)).all() and (ra.boxes[:, 2:] > ra.boxes[:, :2]).all()
    assert len(build_dataset("voc_2007_test", tmp_path / "a")) == 3
    assert make_synthetic([str(tmp_path / "d"), "--classes", "circle", "circle"]) == 2
