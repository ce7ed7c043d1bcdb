"""Datasets and the resumable sampler."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_folder, write_idx
from selfsup.data import (ImageDataset, find_samples, find_unreadable, load_fashion_mnist, read_idx, resolve_split_dir,
                          without_files)
from selfsup.data.sampler import ResumableDistributedSampler
from selfsup.rng import mix_seed, seeded


def test_find_samples_class_folders_flat_folder_and_moco_layout(tmp_path):
    make_image_folder(tmp_path / "labelled" / "train", classes=3, per_class=2)
    samples, classes = find_samples(resolve_split_dir(tmp_path / "labelled", "train"))
    assert classes == ["class0", "class1", "class2"] and [s[1] for s in samples] == [0, 0, 1, 1, 2, 2]
    make_image_folder(tmp_path / "flat", classes=1, per_class=3, flat=True)
    samples, classes = find_samples(resolve_split_dir(tmp_path / "flat", "train"))
    assert classes == [] and len(samples) == 3 and all(s[1] == -1 for s in samples)


def test_unreadable_images_are_replaced_and_each_counted_once(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=1, per_class=5)
    for name in ("c0_001.png", "c0_002.png"):  # two bad files side by side
        (root / "class0" / name).write_bytes(b"not a png")
    samples, classes = find_samples(root)
    train = ImageDataset(samples, classes=classes)
    img, label, skipped = train[1]
    assert img.size == (24, 24)  # the next readable image took its place
    assert [train[i][2] for i in range(5)] == [0, 1, 1, 0, 0]  # 2 unreadable files, 2 counted
    bad = find_unreadable(samples)
    assert sorted(Path(p).name for p, _ in bad) == ["c0_001.png", "c0_002.png"]
    assert len(without_files(train, [p for p, _ in bad])) == 3


def test_sampler_deals_the_same_global_batches_for_any_world_size():
    n, global_batch = 50, 8
    one = ResumableDistributedSampler(n, global_batch, num_replicas=1, rank=0, seed=3)
    two = [ResumableDistributedSampler(n, global_batch // 2, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(4)
    a = list(one)
    b0, b1 = list(two[0]), list(two[1])
    assert len(a) == 48 == len(b0) + len(b1)  # 6 whole global batches, the rest dropped
    for step in range(6):
        batch_one = set(a[step * 8:(step + 1) * 8])
        batch_two = set(b0[step * 4:(step + 1) * 4]) | set(b1[step * 4:(step + 1) * 4])
        assert batch_one == batch_two  # same images and the same per-sample seeds
    assert len({i for i, _ in a}) == 48  # no image twice in an epoch


def test_sampler_resumes_mid_epoch_and_changes_with_the_epoch():
    s = ResumableDistributedSampler(40, 4, num_replicas=2, rank=1, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[3 * 4:]
    s.set_epoch(3)
    assert list(s) != full
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableDistributedSampler(5, 4, num_replicas=2, rank=0)


def test_seeded_block_is_reproducible_and_leaves_the_caller_stream_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with seeded(mix_seed(1, 2, 3)):
        x = torch.rand(3)
    with seeded(mix_seed(1, 2, 3)):
        y = torch.rand(3)
    assert torch.equal(x, y) and torch.equal(torch.get_rng_state(), before)
    assert mix_seed(1, 2, 3) != mix_seed(1, 2, 4) != mix_seed(2, 1, 3)


def test_seeded_block_leaves_every_cuda_generator_alone(monkeypatch):
    # torch.manual_seed would reseed every CUDA generator (or queue that for when CUDA starts):
    # with loading in the main process the GPU's stream would restart at every sample.
    def forbidden(*args, **kwargs):
        raise AssertionError("seeded() reseeded a CUDA generator")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", forbidden)
    with seeded(7):
        a = torch.rand(2)
    with seeded(7):
        assert torch.equal(torch.rand(2), a)


def test_fashion_mnist_reader_both_layouts(tmp_path):
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    for folder in (tmp_path / "debian", tmp_path / "tv" / "FashionMNIST" / "raw"):
        folder.mkdir(parents=True)
        write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([3, 7]))
    for root in (tmp_path / "debian", tmp_path / "tv"):
        x, y = load_fashion_mnist(root, "test")
        assert x.shape == (2, 28, 28) and np.array_equal(x, images) and y.tolist() == [3, 7]
    assert read_idx(tmp_path / "debian" / "t10k-labels-idx1-ubyte.gz").tolist() == [3, 7]
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere", "train")


def test_the_embedded_demo_data_is_found_from_the_package():
    from selfsup.data import DEMO_ROOT

    # The scripts' default data: 3,000 training and 1,000 held-out images in the clone's data/.
    assert DEMO_ROOT == Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-demo"
    assert [len(find_samples(DEMO_ROOT / split)[0]) for split in ("train", "val")] == [3000, 1000]
