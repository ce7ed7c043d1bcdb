#!/usr/bin/env python
"""Draw query images and their nearest neighbours under a checkpoint's frozen backbone, as one PNG.

    python tools/show_neighbors.py --pretrained runs/simclr-resnet18-demo/checkpoint.pth.tar      # the demo data
    python tools/show_neighbors.py --pretrained CKPT /imagenet --queries 6 --k 10 --out nn.png
    python tools/show_neighbors.py --pretrained CKPT --fashion-mnist --image-size 32            # Debian's idx files
    python tools/show_neighbors.py --random-init -a resnet18 --image-size 32 --out random.png   # the baseline picture

--queries images are drawn at random (--seed) from the query split (--split, default val) and
each is compared with every image of the bank split (--bank-split, default train): features are
those of the frozen backbone in eval mode on the evaluation transform (selfsup.probe.eval_transform,
as main_knn.py and main_lincls.py see them), L2-normalised, and the k most cosine-similar bank
images are the neighbours (the query itself is left out when both splits are the same). Each row
is the query (blue outline) then its neighbours, titled with class and similarity, with a green
border when the neighbour has the query's class and red otherwise. The fraction of neighbours
with the query's class is printed: a number to compare checkpoints by (a few queries only, so
noisy; main_knn.py measures the whole split).

Data: DATA is an ImageFolder root (DATA/train and DATA/val class folders, MoCo's layout; a root
without the split folder is used as is); without DATA, the embedded Fashion-MNIST demo. Or
Fashion-MNIST's idx files, as DATA (`fashion-mnist` for Debian's copy, as the other scripts) or
--fashion-mnist [DIR] (default /usr/share/datasets/fashion-mnist), where the query split val
(or test) is the 10k test set. Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

from selfsup.backbones import ARCH_HELP, ARCHS, Features  # noqa: E402
from selfsup.checkpoint import CheckpointError  # noqa: E402
from selfsup.data import (  # noqa: E402
    DEMO_ROOT,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEBIAN,
    ArrayDataset,
    ImageDataset,
    fashion_mnist_root,
    find_samples,
    load_fashion_mnist,
    load_image,
    resolve_split_dir,
)
from selfsup.knn import extract_features, make_eval_loader  # noqa: E402
from selfsup.distributed import DistInfo  # noqa: E402
from selfsup.probe import build_probe, eval_transform, load_pretrained, readable  # noqa: E402

QUERY_COLOUR, SAME_COLOUR, OTHER_COLOUR = "#1f4fa8", "#1a9641", "#d7191c"
# Figure layout, in inches: an image cell, the gap after the query column (in cells), a cell's
# title, the margins, a line of the figure title; title characters per inch of width.
CELL, GAP, TITLE_H, BOTTOM, SIDE, TITLE_LINE = 1.25, 0.25, 0.4, 0.1, 0.15, 0.18
DPI, CHARS_PER_INCH = 110, 12


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """One side of the comparison: a labelled dataset in the evaluation transform, and the raw
    images to draw."""

    name: str  # for messages and the figure title
    dataset: Dataset  # items (normalised image 3 x S x S, label, ...)
    labels: list[int]
    classes: list[str]
    image: Callable[[int], np.ndarray]  # index -> H x W (grey) or H x W x 3 uint8, untransformed
    key: str  # equal keys: the same images (the query is then excluded from its own neighbours)


def folder_split(root: str | Path, split: str, transform: Callable) -> Split:
    """ROOT/split (or ROOT itself when it has no such folder) as a labelled Split."""
    folder = resolve_split_dir(root, split)
    samples, classes = find_samples(folder)
    if not classes:
        raise ValueError(f"'{folder}' holds images but no class folders; show_neighbors colours neighbours by class")
    # Unreadable files left out first (and reported): positions in the features are then positions here.
    dataset = readable(ImageDataset(samples, transform, classes), str(folder), DistInfo())
    return Split(str(folder), dataset, dataset.targets, list(classes),
                 lambda i: np.asarray(load_image(dataset.samples[i][0])), str(folder.resolve()))


def fashion_mnist_split(root: str | Path, split: str, transform: Callable) -> Split:
    """Fashion-MNIST's idx files: split 'train', or 'val'/'test' (the 10k test set)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"Fashion-MNIST has the splits train and val (= test), not '{split}'")
    part = "train" if split == "train" else "test"
    images, labels = load_fashion_mnist(root, part)
    dataset = ArrayDataset(images, labels, transform, FASHION_MNIST_CLASSES, f"{root}/{part}")
    return Split(f"Fashion-MNIST {part} ({root})", dataset, labels.tolist(),
                 list(FASHION_MNIST_CLASSES), lambda i: images[i], f"fashion-mnist:{part}")


# ---------------------------------------------------------------------------------------------- neighbours


@torch.no_grad()
def nearest_neighbors(
    query_feats: torch.Tensor, bank_feats: torch.Tensor, k: int, exclude: Sequence[int] | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k bank rows most cosine-similar to each query row (features L2-normalised here).

    Args:
        query_feats: M x D; bank_feats: N x D.
        k: neighbours per query; at most the number of bank rows left (N, or N - 1 with `exclude`).
        exclude: per query, a bank row never returned (its own position when the queries come
            from the bank), or -1 for none; None excludes nothing.

    Returns:
        similarities M x k (descending) and bank indices M x k (int64).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = bank_feats.shape[0]
    similarity = F.normalize(query_feats.float(), dim=1) @ F.normalize(bank_feats.float(), dim=1).T  # M x N
    available = n
    if exclude is not None:
        exclude = torch.as_tensor(exclude, dtype=torch.long, device=similarity.device)
        rows = (exclude >= 0).nonzero().flatten()
        similarity[rows, exclude[rows]] = float("-inf")
        available = n - (1 if len(rows) else 0)
    if available < 1:
        raise ValueError("the bank has no image left to compare with")
    return similarity.topk(min(k, available), dim=1)


def same_class_fraction(query_labels: Sequence[int], query_classes: Sequence[str], neighbor_labels: torch.Tensor,
                        bank_classes: Sequence[str]) -> float:
    """Share of neighbours (M x k bank labels) whose class name is their query's."""
    hits = [query_classes[q] == bank_classes[int(b)] for q, row in zip(query_labels, neighbor_labels) for b in row]
    return sum(hits) / len(hits)


# ---------------------------------------------------------------------------------------------- figure


@dataclass
class Cell:
    """One image of the grid."""

    image: np.ndarray
    title: str
    colour: str


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("show_neighbors needs matplotlib: pip install matplotlib") from e
    return plt


def _top(title_lines: int) -> float:
    return 0.35 + TITLE_LINE * title_lines


def figure_size(n_rows: int, n_cols: int, title_lines: int = 2) -> tuple[float, float]:
    """(width, height) in inches of a grid of n_rows x n_cols images (query column included)
    under a figure title of `title_lines` lines."""
    return CELL * (n_cols + GAP) + 2 * SIDE, (CELL + TITLE_H) * n_rows + _top(title_lines) + BOTTOM


def render(rows: list[list[Cell]], out: Path, title: str) -> Path:
    """Draw rows of (query, neighbours...) cells with coloured borders and save them to `out` (PNG)."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    width = figure_size(n_rows, n_cols)[0]
    lines = [w for line in title.splitlines() for w in textwrap.wrap(line, int(width * CHARS_PER_INCH))]
    fig_w, fig_h = figure_size(n_rows, n_cols, len(lines))
    fig, axes = plt.subplots(n_rows, n_cols + 1, figsize=(fig_w, fig_h), squeeze=False,
                             gridspec_kw={"width_ratios": [1, GAP] + [1] * (n_cols - 1), "wspace": 0.12,
                                          "hspace": TITLE_H / CELL})
    for r, row in enumerate(rows):
        axes[r, 1].axis("off")
        for c, ax in enumerate([axes[r, 0], *axes[r, 2:]]):
            if c >= len(row):
                ax.axis("off")
                continue
            img = row[c].image
            grey = img.ndim == 2 or img.shape[-1] == 1
            ax.imshow(img.squeeze(), cmap="gray" if grey else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(row[c].colour)
                spine.set_linewidth(4 if c == 0 else 3)
            ax.set_title(row[c].title, fontsize=7, color=row[c].colour if c == 0 else "black", pad=3,
                         fontweight="bold" if c == 0 else "normal")
    fig.suptitle("\n".join(lines), fontsize=9, y=1 - 0.12 / fig_h, va="top")
    fig.subplots_adjust(left=SIDE / fig_w, right=1 - SIDE / fig_w, bottom=BOTTOM / fig_h,
                        top=1 - _top(len(lines)) / fig_h)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------- main


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None,
                   help="ImageFolder root with train/ and val/ class folders (default: the embedded demo data)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", default=None, help="pretraining checkpoint whose backbone is shown")
    src.add_argument("--random-init", action="store_true", help="no checkpoint: a randomly initialised --arch")
    p.add_argument("--fashion-mnist", nargs="?", const=FASHION_MNIST_DEBIAN, default=None, metavar="DIR",
                   help=f"read Fashion-MNIST's idx files instead of DATA (default DIR: {FASHION_MNIST_DEBIAN})")
    p.add_argument("-a", "--arch", default=None, choices=ARCHS, metavar="ARCH",
                   help=f"backbone (default: the checkpoint's; resnet18 with --random-init): {', '.join(ARCHS)}. {ARCH_HELP}")
    p.add_argument("--small-stem", action="store_true", help="with --random-init: the 3x3 stride-1 stem")
    p.add_argument("--queries", default=8, type=int, help="query images, one row each (default 8)")
    p.add_argument("--k", default=8, type=int, help="neighbours per query (default 8)")
    p.add_argument("--image-size", default=None, type=int,
                   help="input size (default: the pretraining crop size recorded in the checkpoint, else 224)")
    p.add_argument("--split", default="val", help="where the queries come from (default val)")
    p.add_argument("--bank-split", default="train", help="where the neighbours come from (default train)")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: neighbors.png next to the checkpoint, in its run folder; "
                        "neighbors-random-init.png in the current folder with --random-init)")
    p.add_argument("--seed", default=0, type=int, help="picks the queries (and the --random-init weights)")
    p.add_argument("-b", "--batch-size", default=256, type=int, help="batch of the feature extraction (default 256)")
    p.add_argument("-j", "--workers", default=0, type=int, help="data loading workers (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    return p


def default_out(args: argparse.Namespace) -> Path:
    """Where the picture goes without --out: next to the run it describes (as plot_metrics.py's
    metrics.png), `neighbors.png` beside checkpoint.pth.tar, `neighbors-<name>.png` beside another
    checkpoint file; the current folder for a random network."""
    if args.random_init:
        return Path("neighbors-random-init.png")
    ckpt = Path(args.pretrained)
    name = ckpt.name.removesuffix(".tar").removesuffix(".pth")
    return ckpt.parent / ("neighbors.png" if name == "checkpoint" else f"neighbors-{name}.png")


def main(argv: list[str] | None = None) -> int:
    p = get_args_parser()
    args = p.parse_args(argv)
    if args.data is not None and args.fashion_mnist is not None:
        p.error("give DATA or --fashion-mnist, not both")
    for name in ("queries", "k", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    _pyplot()  # fail before minutes of feature extraction, not after
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        if args.random_init:
            arch, small_stem, weights, image_size = args.arch or "resnet18", args.small_stem, None, None
            source = f"{arch}, random init (seed {args.seed})"
        else:
            pre = load_pretrained(args.pretrained, args.arch)
            arch, small_stem, weights, image_size = pre.arch, pre.small_stem, pre.weights, pre.image_size
            source = f"{arch} from {args.pretrained}"
        image_size = args.image_size or image_size or 224
        transform = eval_transform(image_size)
        fmnist = fashion_mnist_root(args.fashion_mnist or args.data)  # DATA may name the idx files too
        if args.fashion_mnist is not None and fmnist is None:
            raise FileNotFoundError(f"no Fashion-MNIST idx files in {args.fashion_mnist}")
        if fmnist is not None:
            query = fashion_mnist_split(fmnist, args.split, transform)
            bank = fashion_mnist_split(fmnist, args.bank_split, transform)
        else:
            root = args.data or DEMO_ROOT
            query = folder_split(root, args.split, transform)
            bank = folder_split(root, args.bank_split, transform)
        torch.manual_seed(args.seed)
        backbone = Features(build_probe(arch, small_stem, len(bank.classes), weights).backbone.to(device))
    except (CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    same = query.key == bank.key
    if same and len(bank.labels) < 2:
        print(f"error: '{bank.name}' has a single image: no neighbour besides the query itself", file=sys.stderr)
        return 2
    # A prefix of one seeded permutation: more --queries add rows below the same ones.
    picked = np.random.default_rng(args.seed).permutation(len(query.labels))[: args.queries].tolist()
    print(f"{source} at {image_size}px on {device}; {len(picked)} queries from {query.name}, "
          f"bank of {len(bank.labels)} images from {bank.name}", flush=True)
    pin = device.type == "cuda"
    bank_feats, _ = extract_features(backbone, make_eval_loader(bank.dataset, args.batch_size, args.workers, pin),
                                     device)
    if same:
        query_feats = bank_feats[torch.tensor(picked, device=device)]
    else:
        query_feats, _ = extract_features(
            backbone, make_eval_loader(Subset(query.dataset, picked), args.batch_size, args.workers, pin), device)
    sims, idx = nearest_neighbors(query_feats, bank_feats, args.k, picked if same else None)
    sims, idx = sims.cpu(), idx.cpu()
    bank_labels = torch.tensor(bank.labels)[idx]  # M x k
    query_labels = [query.labels[i] for i in picked]
    fraction = same_class_fraction(query_labels, query.classes, bank_labels, bank.classes)

    rows = []
    for q, qi in enumerate(picked):
        q_class = query.classes[query_labels[q]]
        row = [Cell(query.image(qi), f"query\n{_short(q_class)}", QUERY_COLOUR)]
        for s, b in zip(sims[q].tolist(), idx[q].tolist()):
            b_class = bank.classes[bank.labels[b]]
            row.append(Cell(bank.image(b), f"{_short(b_class)}\n{s:.3f}",
                            SAME_COLOUR if b_class == q_class else OTHER_COLOUR))
        rows.append(row)
    n_hits = round(fraction * idx.numel())
    title = (f"{source}\nqueries from {args.split}, their {idx.shape[1]} nearest {args.bank_split} images (cosine, "
             f"{image_size}px): {n_hits}/{idx.numel()} = {100 * fraction:.1f}% share the query's class")
    out = render(rows, Path(args.out) if args.out else default_out(args), title)
    print(f"same-class fraction: {fraction:.4f} ({n_hits}/{idx.numel()} neighbours, {len(picked)} queries x k={idx.shape[1]})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
