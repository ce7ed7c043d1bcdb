#!/usr/bin/env python
"""Write the synthetic shapes detection dataset (see detection/synthetic.py).

    python detection/make_synthetic.py --format voc data/shapes            # data/shapes/VOC2007
    python detection/make_synthetic.py --format voc --layout vocdevkit data/shapes   # .../VOCdevkit/VOC2007
    python detection/make_synthetic.py --format coco data/shapes-coco      # images + annotations/*.json

Train on it with `--data-root data/shapes --train voc_2007_trainval --test voc_2007_test` (VOC)
or `--train coco:OUT/trainval:OUT/annotations/instances_trainval.json` (COCO).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.synthetic import SHAPES, SyntheticConfig, write_coco, write_voc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder")
    p.add_argument("--format", choices=["voc", "coco"], default="voc")
    p.add_argument("--layout", choices=["detectron2", "vocdevkit"], default="detectron2",
                   help="VOC only: OUT/VOC2007 (Detectron2's datasets/) or OUT/VOCdevkit/VOC2007")
    p.add_argument("--train", type=int, default=600, help="trainval images (default: 600)")
    p.add_argument("--test", type=int, default=200, help="test images (default: 200)")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default: 64)")
    p.add_argument("--classes", nargs="+", default=["circle", "square", "triangle"], choices=SHAPES,
                   help="shapes to draw, one class each (default: circle square triangle)")
    p.add_argument("--objects", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"),
                   help="objects per image (default: 1 3)")
    p.add_argument("--object-size", type=float, nargs=2, default=[0.25, 0.6], metavar=("MIN", "MAX"),
                   help="object side as a fraction of the image side (default: 0.25 0.6)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        cfg = SyntheticConfig(classes=tuple(args.classes), image_size=args.image_size, min_objects=args.objects[0],
                              max_objects=args.objects[1], min_frac=args.object_size[0], max_frac=args.object_size[1])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {"trainval": args.train, "test": args.test}
    if args.format == "voc":
        where = write_voc(args.out, cfg, counts, seed=args.seed, layout=args.layout)
    else:
        where = write_coco(args.out, cfg, counts, seed=args.seed)
    print(f"wrote {args.train} trainval + {args.test} test images of {list(cfg.classes)} to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
