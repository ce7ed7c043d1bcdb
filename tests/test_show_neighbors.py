"""tools/show_neighbors.py: the neighbour search against hand-computed cases, and the whole tool
(checkpoint, random init, Fashion-MNIST idx files) writing a readable PNG."""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, make_image_folder, write_idx
from selfsup import build_model

SIZE = 16


def load_tool():
    if "show_neighbors" not in sys.modules:
        spec = importlib.util.spec_from_file_location("show_neighbors", REPO / "tools" / "show_neighbors.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["show_neighbors"] = module
        spec.loader.exec_module(module)
    return sys.modules["show_neighbors"]


sn = load_tool()


# ---------------------------------------------------------------------------------------------- the search


def test_nearest_neighbors_hand_computed():
    # Bank rows at angles 0, 30, 90, 180 and 45 degrees (lengths vary: only the direction counts).
    bank = torch.tensor([[1.0, 0.0], [3 ** 0.5, 1.0], [0.0, 5.0], [-2.0, 0.0], [1.0, 1.0]])
    queries = torch.tensor([[10.0, 0.0], [0.0, 1.0]])  # 0 and 90 degrees
    sims, idx = sn.nearest_neighbors(queries, bank, k=3)
    assert idx.tolist() == [[0, 1, 4], [2, 4, 1]]
    c30, c45, c60 = 3 ** 0.5 / 2, 0.5 ** 0.5, 0.5
    torch.testing.assert_close(sims, torch.tensor([[1.0, c30, c45], [1.0, c45, c60]]))


def test_nearest_neighbors_excludes_the_query_itself():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    queries = bank[[0, 2]]  # queries drawn from the bank, at rows 0 and 2
    _, idx = sn.nearest_neighbors(queries, bank, k=2)
    assert idx[:, 0].tolist() == [0, 2]  # without exclusion each query is its own best match
    sims, idx = sn.nearest_neighbors(queries, bank, k=2, exclude=[0, 2])
    assert idx.tolist() == [[1, 3], [3, 1]]
    assert (sims < 1).all()
    # -1 excludes nothing for that query; k is capped at the bank rows left (4 - 1 excluded).
    _, idx = sn.nearest_neighbors(queries, bank, k=10, exclude=[-1, 2])
    assert idx.shape == (2, 3)
    assert idx[0, 0] == 0 and 2 not in idx[1].tolist()
    with pytest.raises(ValueError):
        sn.nearest_neighbors(queries, bank, k=0)


def test_same_class_fraction_compares_class_names():
    # The splits list their classes differently: names, not label numbers, decide.
    frac = sn.same_class_fraction([0, 1], ["cat", "dog"], torch.tensor([[1, 0], [0, 0]]), ["bird", "cat"])
    assert frac == 0.25  # only the first query's second neighbour ("cat") matches


# ---------------------------------------------------------------------------------------------- the tool


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes of distinctive colours; 4 training and 2 validation images each."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "train", classes=3, per_class=4, size=SIZE)
    make_image_folder(root / "val", classes=3, per_class=2, size=SIZE, seed=1)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A MoCo checkpoint as main_pretrain.py writes it (weights perturbed away from their init)."""
    torch.manual_seed(0)
    model = build_model("moco", "resnet18", dim=8, K=16, mlp=True)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    path = tmp_path_factory.mktemp("pre") / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "method": "moco",
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "resnet18", "method": "moco", "small_stem": False, "image_size": SIZE}}, path)
    return path


def printed_fraction(out: str) -> float:
    match = re.search(r"same-class fraction: ([0-9.]+) \((\d+)/(\d+) neighbours", out)
    assert match, out
    frac, hits, total = float(match[1]), int(match[2]), int(match[3])
    assert 0.0 <= frac <= 1.0 and hits == round(frac * total)
    return frac


def check_png(path, n_rows: int, n_cols: int) -> np.ndarray:
    """A real PNG of the size the layout gives, with visible borders of the three colours."""
    import matplotlib.colors
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    w = sn.figure_size(n_rows, n_cols)[0]
    assert abs(img.shape[1] - w * sn.DPI) <= 1
    # The height depends on how many lines the figure title wraps to (it names the checkpoint).
    heights = [sn.figure_size(n_rows, n_cols, lines)[1] * sn.DPI for lines in range(1, 8)]
    assert min(abs(img.shape[0] - h) for h in heights) <= 1, (img.shape, heights)
    assert img[..., :3].std() > 0.05
    rgb = img[..., :3].reshape(-1, 3)
    found = {c: bool((np.abs(rgb - matplotlib.colors.to_rgb(c)).max(1) < 0.02).any())
             for c in (sn.QUERY_COLOUR, sn.SAME_COLOUR, sn.OTHER_COLOUR)}
    assert found[sn.QUERY_COLOUR] and (found[sn.SAME_COLOUR] or found[sn.OTHER_COLOUR]), found
    return img


def test_checkpoint_writes_png_and_fraction(data, checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "nn.png"
    rc = sn.main(["--pretrained", str(checkpoint), str(data), "--queries", "4", "--k", "3", "--out", str(out),
                  "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    printed_fraction(printed)
    assert f"wrote {out}" in printed and f"at {SIZE}px" in printed  # the checkpoint's image size
    check_png(out, 4, 4)


def test_random_init_same_split(data, tmp_path, capsys):
    """--random-init, and queries and bank from the same split (the query is not its own neighbour:
    with 6 val images, k=5 is every other image)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "random.png"
    rc = sn.main(["--random-init", "-a", "resnet18", "--image-size", str(SIZE), str(data), "--bank-split", "val",
                  "--queries", "2", "--k", "9", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "random init" in printed
    assert "2 queries x k=5" in printed  # 6 val images minus the query itself
    printed_fraction(printed)
    check_png(out, 2, 6)


def test_fashion_mnist_idx_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        labels = np.arange(n) % 3
        images = (rng.integers(0, 60, (n, 28, 28)) + 60 * labels[:, None, None]).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    out = tmp_path / "fmnist.png"
    rc = sn.main(["--random-init", "--image-size", str(SIZE), "--fashion-mnist", str(tmp_path), "--queries", "3",
                  "--k", "4", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Fashion-MNIST test" in printed
    printed_fraction(printed)
    check_png(out, 3, 5)


def test_unreadable_files_are_left_out_before_positions_are_taken(tmp_path):
    # The features leave unreadable files out; the split's labels and pictures must too, or a
    # neighbour's position would name another image (or run past the end).
    root = make_image_folder(tmp_path / "data" / "train", classes=2, per_class=3, size=SIZE)
    (root / "class0" / "c0_001.png").write_bytes(b"not a png")
    split = sn.folder_split(tmp_path / "data", "train", sn.eval_transform(SIZE))
    assert [Path(f).name for f, _ in split.dataset.samples] == ["c0_000.png", "c0_002.png", "c1_000.png",
                                                                "c1_001.png", "c1_002.png"]
    assert split.labels == [0, 0, 1, 1, 1]
    assert all(split.image(i).shape == (SIZE, SIZE, 3) for i in range(len(split.labels)))


def test_bad_input_is_one_message(data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert sn.main(["--pretrained", str(tmp_path / "missing.pth.tar"), str(data), "--device", "cpu"]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: DATA and --fashion-mnist together
        sn.main(["--random-init", str(data), "--fashion-mnist", str(tmp_path)])


def test_missing_matplotlib_names_the_install(monkeypatch, data):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        sn.main(["--random-init", str(data)])
