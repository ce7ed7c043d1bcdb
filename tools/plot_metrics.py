#!/usr/bin/env python
"""Plot training curves from metrics.jsonl files as one PNG; several runs are overlaid.

    python tools/plot_metrics.py runs/simclr-resnet18-demo                     # -> runs/simclr-resnet18-demo/metrics.png
    python tools/plot_metrics.py runs/a/metrics.jsonl runs/b --out compare.png --label moco byol

Panels: loss, learning rate, EMA momentum, online kNN accuracy and embedding std (with the
1/sqrt(dim) level of well-spread embeddings when the dimension is known) against epochs; a
panel is left out when no run logged that quantity. Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# (metrics key, panel title, log scale)
PANELS = (
    ("loss", "training loss", False),
    ("acc1", "pretext Acc@1 (%): the positive first; DINO: top prototypes agree", False),
    ("cos", "pretext task: cos(prediction, target)", False),
    ("knn_top1", "online kNN top-1 (%), 0: before training", False),
    ("lr", "learning rate", False),
    ("momentum", "EMA momentum (key / target encoder)", False),
    ("embed_std", "embedding std (collapse -> 0)", False),
)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (or of RUN_DIR/metrics.jsonl), skipping torn lines."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at '{path}' (expected RUN_DIR/metrics.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written when the run was killed
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs trained, values) of `key`: epoch e's record at e + 1, the record written before
    training (main_pretrain.py's online kNN of the random start) at 0; the last record of each
    epoch (a resumed run may repeat one)."""
    by_epoch: dict[float, float] = {}
    for r in records:
        v = r.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            continue
        if "epoch" in r:
            by_epoch[r["epoch"] + 1] = v
        elif r.get("before_training"):
            by_epoch[0] = v
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def informative(runs: dict[str, list[dict]], key: str) -> bool:
    """Whether `key` tells anything: some run has it, and not one constant value everywhere (a
    fixed EMA momentum, a learning rate without schedule)."""
    values = [v for records in runs.values() for v in series(records, key)[1]]
    return bool(values) and (len(values) == 1 or max(values) > min(values))


def plot(runs: dict[str, list[dict]], out: Path, dims: dict[str, int | None] | None = None) -> Path:
    """Draw the panels that carry information (`informative`) and save them to `out` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("plot_metrics needs matplotlib: pip install matplotlib") from e
    panels = [p for p in PANELS if informative(runs, p[0])]
    if not panels:
        raise SystemExit("none of the runs has per-epoch metrics to plot yet")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    # One colour per run in every panel: a panel's own colour cycle would shift when a run has no
    # data there (SimCLR has no momentum), giving a run another run's colour.
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    for ax, (key, title, log) in zip(axes.flat, panels):
        for name, records in runs.items():
            x, y = series(records, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=name, color=colours[name])
            if key == "embed_std" and dims and dims.get(name):
                ax.axhline(1 / math.sqrt(dims[name]), ls=":", lw=1, color="gray")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epochs trained")
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        if len(ax.get_legend_handles_labels()[0]) > len(handles):
            handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _dim_of(path: Path) -> int | None:
    """The embedding dimension from the run's args.json, for the reference line."""
    folder = path if path.is_dir() else path.parent
    try:
        return int(json.loads((folder / "args.json").read_text()).get("moco_dim"))
    except (OSError, ValueError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders or metrics.jsonl files")
    p.add_argument("--label", nargs="*", default=None, help="a name per run (default: the folder names)")
    p.add_argument("--out", default=None, help="PNG to write (default: FIRST_RUN/metrics.png)")
    args = p.parse_args(argv)
    if args.label and len(args.label) != len(args.runs):
        p.error(f"--label got {len(args.label)} names for {len(args.runs)} runs")
    paths = [Path(r) for r in args.runs]
    names = args.label or [(q if q.is_dir() else q.parent).name for q in paths]
    try:
        runs = {n: read_metrics(q) for n, q in zip(names, paths)}
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = paths[0] if paths[0].is_dir() else paths[0].parent
    out = Path(args.out) if args.out else first / "metrics.png"
    plot(runs, out, {n: _dim_of(q) for n, q in zip(names, paths)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
