"""The data path. This module: datasets - image folders (class folders or a flat folder),
unreadable files, Fashion-MNIST - and the training loader. Its modules:

    augmentations   the papers' augmentations (one spec per view for every pipeline), reference transforms
    crops           crop geometry, decode-once worker crops
    batch_augment   the batched colour half, on the training device
    inmemory        small datasets held in memory
    pipeline        how pretraining batches reach the model (the backends)
    sampler         resumable distributed sampling, exact evaluation shards
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..distributed import DistInfo, all_gather_objects
from ..rng import seeded
from ..stopping import ignore_stop_signals
from .augmentations import to_rgb

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The small real dataset that ships with the repository (see data/fashion-mnist-demo/README.md).
REPO_ROOT = Path(__file__).resolve().parents[3]  # ssl/selfsup/data/__init__.py -> the clone
DEMO_ROOT = REPO_ROOT / "data" / "fashion-mnist-demo"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def resolve_split_dir(root: str | os.PathLike, split: str) -> Path:
    """MoCo's layout is `root/train` and `root/val`; a root without that sub-folder is used as is."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(
            f"data folder '{root}' does not exist. Pass an ImageFolder root: either "
            f"'ROOT/{split}/<class>/<image>' (ImageNet layout), a folder of class folders, or a folder of images."
        )
    if not root.is_dir():
        raise NotADirectoryError(f"data path '{root}' is a file; pass the folder that holds the images")
    sub = root / split
    return sub if sub.is_dir() else root


def find_samples(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """List the images under `root` with their labels.

    A root with class folders gives ImageFolder's labels (class folders sorted by name, images
    found recursively inside each). A root that holds only images gives label -1 for each
    (unlabelled data is fine for pretraining). Raises a ValueError naming the folder when it
    holds no image.
    """
    root = Path(root)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    samples: list[tuple[str, int]] = []
    classes: list[str] = []
    for cls in class_dirs:
        files = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        if files:
            samples += [(f, len(classes)) for f in files]
            classes.append(cls)
    if not samples:
        samples = [(e.path, -1) for e in entries if e.is_file() and _is_image(e.name)]
    if not samples:
        raise ValueError(
            f"no images found in '{root}' (looked for {', '.join(IMG_EXTENSIONS)} files in class "
            "sub-folders or directly in it). Point the data argument at an ImageFolder root."
        )
    return samples, classes


def load_image(path: str) -> Image.Image:
    """Decode an image file fully (so a truncated file fails here, not later) as RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


def _transformed(transform: Callable | None, img: Image.Image, seed: int | None):
    """`transform(img)`, under the random streams seeded by `seed` when one is given (a sample's
    position: the same augmentation whatever the worker or process)."""
    if transform is None:
        return img
    if seed is None:
        return transform(img)
    with seeded(seed):
        return transform(img)


class ImageDataset(torch.utils.data.Dataset):
    """Images with labels (or -1) from `find_samples`, robust to unreadable files.

    A truncated, corrupt or non-image file is skipped with a warning and replaced by the next
    readable sample, so batch shapes (and processes under DDP) stay in step. Each item is
    `(transform(image), label, skipped)` where `skipped` is 1 when the item's own file was
    unreadable (the image is a replacement), else 0: summed over an epoch it counts each
    unreadable file once. Training sums it into a per-epoch count; evaluation leaves such items
    out (selfsup.knn.extract_features, selfsup.lincls.image_batches), so every readable image
    counts exactly once.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        classes: Sequence[str] = (),
        loader: Callable[[str], Image.Image] = load_image,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.classes = list(classes)
        self.loader = loader
        self._warned: set[str] = set()

    @property
    def targets(self) -> list[int]:
        return [s[1] for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]):
        # `item` is an index, or (index, seed) from ResumableDistributedSampler: the augmentation
        # is then seeded per sample, independent of loader workers (exact resume).
        index, seed = item if isinstance(item, tuple) else (item, None)
        n = len(self.samples)
        for skipped in range(n):
            path, label = self.samples[(index + skipped) % n]
            try:
                img = self._read(path, seed)
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
                if path not in self._warned:
                    self._warned.add(path)
                    logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            return _transformed(self.transform, img, seed), label, int(skipped > 0)  # this item's own file only: each file counts once
        raise RuntimeError(f"none of the {n} files of this dataset could be read as an image")

    def _read(self, path: str, seed: int | None):
        """Decode one file; an error raised here marks the file unreadable. Subclasses that
        decode inside their augmentation (selfsup.data.crops) override this."""
        return self.loader(path)


def training_loader(
    dataset: torch.utils.data.Dataset,
    sampler,
    *,
    batch_size: int | None,
    workers: int,
    seed: int,
    pin_memory: bool,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
) -> torch.utils.data.DataLoader:
    """The DataLoader of a training run that resumes exactly (pretraining, the linear probe on
    images, detection).

    Its own generator, seeded: starting an epoch draws the workers' base seed from it, not from
    the global stream, which would otherwise shift on resume (the augmentation itself is seeded
    per sample by the sampler). Persistent workers that leave stop signals to the main process.
    `batch_size=None` for samplers that yield whole batches (StepBatchSampler).
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=drop_last, collate_fn=collate_fn, persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(seed))


class _Decode(torch.utils.data.Dataset):
    """Why each file cannot be decoded, or None (for find_unreadable's loader)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str | None:
        try:
            load_image(self.paths[i])
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            return f"{type(e).__name__}: {e}"
        return None


def report_unreadable(data_dir: str | os.PathLike, dist: DistInfo, workers: int = 0) -> list[tuple[str, str]]:
    """--verify-images: decode every image of `data_dir` (the processes share the files) and log
    each unreadable one on rank 0; they are skipped in training. Returns them."""
    bad = find_unreadable(find_samples(data_dir)[0], dist, workers)
    for path, reason in bad:
        logger.warning("unreadable image: %s (%s)", path, reason)
    logger.info("--verify-images: %d unreadable file(s) in %s; they will be skipped", len(bad), data_dir)
    return bad


def find_unreadable(samples: Sequence[tuple[str, int]], dist: DistInfo | None = None,
                    workers: int = 0) -> list[tuple[str, str]]:
    """(path, reason) for every file of `samples` that cannot be decoded, on every process.

    Each process decodes its block of the files (selfsup.data.sampler.shard_range), in `workers`
    loader workers, and the findings are gathered (a collective when distributed): --verify-images
    before pretraining, and the validation split before an evaluation starts."""
    from .sampler import shard_range

    dist = dist or DistInfo()
    start, end = shard_range(len(samples), dist.world_size, dist.rank)
    paths = [p for p, _ in samples[start:end]]
    loader = torch.utils.data.DataLoader(_Decode(paths), batch_size=None, num_workers=workers,
                                         worker_init_fn=ignore_stop_signals)
    local = [(p, why) for p, why in zip(paths, loader) if why is not None]
    return [bad for part in all_gather_objects(local) for bad in part]


def without_files(dataset: "ImageDataset", paths: Sequence[str]) -> "ImageDataset":
    """`dataset` without the samples whose file is in `paths` (same transform and classes)."""
    drop = set(paths)
    return ImageDataset([s for s in dataset.samples if s[0] not in drop], dataset.transform, dataset.classes,
                        dataset.loader)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files), for the demo data and the quality benchmark
# ----------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzipped when `path` ends in .gz): `read_idx`'s inverse."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N x 28 x 28 uint8) and labels (N int64) of `split` ('train'/'test').

    Looks in `root` (default: Debian's /usr/share/datasets/fashion-mnist), accepting the plain
    idx files, their .gz versions and torchvision's `FashionMNIST/raw` layout.
    """
    root = Path(root or FASHION_MNIST_DEBIAN)
    prefix = "train" if split == "train" else "t10k"
    images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found under '{root}' (looked for {prefix}-images-idx3-ubyte[.gz] "
            "there and in FashionMNIST/raw). On Debian: `apt-get install dataset-fashion-mnist`; or pass "
            "the folder torchvision.datasets.FashionMNIST(root, download=True) created."
        )
    x, y = read_idx(images), read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return x, y


FASHION_MNIST_NAME = "fashion-mnist"


def fashion_mnist_root(data: str | os.PathLike | None) -> Path | None:
    """The folder holding Fashion-MNIST's idx files when `data` names Fashion-MNIST, else None.

    The scripts take Fashion-MNIST as their data argument in three forms: the word
    `fashion-mnist` (Debian's location, `apt-get install dataset-fashion-mnist`), a folder holding
    the idx files (plain or .gz), or torchvision's `FashionMNIST(root)` folder (FashionMNIST/raw)."""
    if data is None:
        return None
    root = Path(FASHION_MNIST_DEBIAN) if str(data) == FASHION_MNIST_NAME else Path(data)
    if _find_idx(root, "train-images-idx3-ubyte") is not None:
        return root
    if str(data) == FASHION_MNIST_NAME:
        raise FileNotFoundError(f"'{FASHION_MNIST_NAME}' means {FASHION_MNIST_DEBIAN}, which holds no Fashion-MNIST "
                                "files: `apt-get install dataset-fashion-mnist`, or pass the folder of the idx files")
    return None


class ArrayDataset(torch.utils.data.Dataset):
    """Labelled images held as a uint8 array (N x H x W grayscale, or N x H x W x 3), served as
    ImageDataset serves files: `(transform(PIL image), label, 0)`. `samples` names each image
    `SOURCE#i` (for fingerprints and reports); nothing in an array is unreadable."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable | None = None,
                 classes: Sequence[str] = (), source: str = "array") -> None:
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.transform, self.classes = transform, list(classes)
        self.samples = [(f"{source}#{i}", int(label)) for i, label in enumerate(self.labels)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        img = to_rgb(Image.fromarray(self.images[index]))
        return _transformed(self.transform, img, seed), int(self.labels[index]), 0


def fashion_mnist_splits(root: Path, train_tf: Callable | None, val_tf: Callable | None):
    """Fashion-MNIST's 60k training and 10k test images as (train, val, classes), the layout of
    the evaluations' ROOT/train and ROOT/val."""
    (x, y), (xt, yt) = load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")
    train = ArrayDataset(x, y, train_tf, FASHION_MNIST_CLASSES, f"{root}/train")
    val = ArrayDataset(xt, yt, val_tf, FASHION_MNIST_CLASSES, f"{root}/test")
    return train, val, list(FASHION_MNIST_CLASSES)
