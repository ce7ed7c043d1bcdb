#!/usr/bin/env python
"""Write the embedded demo dataset: a class-balanced sample of Fashion-MNIST as PNG ImageFolders.

    python tools/make_demo_data.py [--source /usr/share/datasets/fashion-mnist] [--out data/fashion-mnist-demo]

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017; Zalando Research) is MIT-licensed; see
data/fashion-mnist-demo/README.md. The selection is deterministic (seed 0), so rerunning this
reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

from selfsup.data import DEMO_ROOT, FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402


def write_split(images: np.ndarray, labels: np.ndarray, per_class: int, out: Path, rng: np.random.Generator) -> int:
    count = 0
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        idx = np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png", optimize=True)
            count += 1
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="Fashion-MNIST idx files (default: Debian's location)")
    p.add_argument("--out", default=str(DEMO_ROOT))
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=100)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    out = Path(args.out)
    x, y = load_fashion_mnist(args.source, "train")
    n_train = write_split(x, y, args.train_per_class, out / "train", rng)
    x, y = load_fashion_mnist(args.source, "test")
    n_val = write_split(x, y, args.val_per_class, out / "val", rng)
    print(f"wrote {n_train} training and {n_val} validation images to {out}")


if __name__ == "__main__":
    main()
