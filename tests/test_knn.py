"""Weighted k-NN and exact feature extraction, against hand computations and single-process runs."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import make_image_folder, run_distributed
from selfsup import knn
from selfsup.backbones import Features, backbone_constructor
from selfsup.data.sampler import ShardSampler
from test_lincls import load_script
from torch.utils.data import DataLoader, TensorDataset

WORLD = 2


# ------------------------------------------------------------------------------------------ sharding


def test_shard_sampler_partitions_any_size_in_order():
    for n in range(0, 12):
        for world in range(1, 5):
            blocks = [list(ShardSampler(n, world, r)) for r in range(world)]
            assert sum(blocks, []) == list(range(n)), (n, world)
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
            assert [len(ShardSampler(n, world, r)) for r in range(world)] == list(map(len, blocks))


# ------------------------------------------------------------------------------------------ k-NN


def test_weighted_vote_by_hand():
    # Training points on a circle at these angles, with different norms (the classifier
    # normalises; scale must not matter).
    angles = torch.tensor([0.0, 0.3, 0.35, 1.5, 3.0])
    train = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [2.0], [3.0], [0.5], [7.0]])
    labels = torch.tensor([0, 1, 1, 2, 0])
    query = torch.tensor([[math.cos(0.02), math.sin(0.02)]]) * 5  # at angle 0.02
    # By hand: the 3 most similar are the points at 0.0, 0.3, 0.35, with cosines cos(0.02),
    # cos(0.28), cos(0.33); each votes exp(cosine / T) for its class.
    t = 0.5
    w0, w1, w2 = (math.exp(math.cos(a) / t) for a in (0.02, 0.28, 0.33))
    pred, scores = knn.knn_classify(train, labels, query, num_classes=3, k=3, T=t)
    assert torch.allclose(scores, torch.tensor([[w0, w1 + w2, 0.0]]), rtol=1e-5)
    assert pred.tolist() == [1]  # two neighbours of class 1 outvote the closest one, of class 0

    # A sharper temperature lets the single closest neighbour win instead:
    # exp(cos(0.02)/0.05) = e^19.996 > e^19.22 + e^18.92.
    t = 0.05
    pred, scores = knn.knn_classify(train, labels, query, num_classes=3, k=3, T=t)
    assert pred.tolist() == [0]
    assert math.isclose(scores[0, 0].item(), math.exp(math.cos(0.02) / t), rel_tol=1e-4)
    assert math.isclose(scores[0, 1].item(), math.exp(math.cos(0.28) / t) + math.exp(math.cos(0.33) / t), rel_tol=1e-4)


def _naive_knn_scores(train, labels, test, num_classes, k, t):
    """Per test sample, plain Python over every training sample."""
    out = []
    for q in test:
        sims = [(torch.dot(F.normalize(q, dim=0), F.normalize(x, dim=0)).item(), int(y)) for x, y in zip(train, labels)]
        sims.sort(key=lambda s: -s[0])
        row = [0.0] * num_classes
        for s, y in sims[:k]:
            row[y] += math.exp(s / t)
        out.append(row)
    return torch.tensor(out)


def test_chunked_knn_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 6, generator=g), torch.randn(9, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    expected = _naive_knn_scores(train, labels, test, 4, k=7, t=0.2)
    for chunk in (None, 1, 4, 100):
        pred, scores = knn.knn_classify(train, labels, test, 4, k=7, T=0.2, chunk_size=chunk)
        assert torch.allclose(scores, expected, rtol=1e-4), chunk
        assert torch.equal(pred, expected.argmax(1))
    # k larger than the training set uses every training sample.
    _, scores = knn.knn_classify(train[:5], labels[:5], test, 4, k=200, T=0.2)
    assert torch.allclose(scores, _naive_knn_scores(train[:5], labels[:5], test, 4, 5, 0.2), rtol=1e-4)


def test_toy_clusters_known_accuracy():
    # Four classes in four orthogonal directions; test points near their class direction are all
    # right, and a point placed in the middle of class 2's cluster but labelled 3 is the one miss.
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4) * 10
    train = torch.cat([centres[c] + 0.5 * torch.randn(25, 4, generator=g) for c in range(4)])
    train_labels = torch.arange(4).repeat_interleave(25)
    test = torch.cat([centres[c] + 0.5 * torch.randn(5, 4, generator=g) for c in range(4)] + [centres[2:3]])
    test_labels = torch.cat([torch.arange(4).repeat_interleave(5), torch.tensor([3])])
    result = knn.knn_evaluate(train, train_labels, test, test_labels, num_classes=4, ks=(20, 200), T=0.07)
    for k in (20, 200):
        assert result[k]["correct1"] == 20 and result[k]["n"] == 21
        assert result[k]["top1"] == pytest.approx(100 * 20 / 21)
    assert result[200]["correct5"] == 21  # 4 classes: top-5 is always right


def test_knn_rejects_unlabelled_training_data():
    with pytest.raises(ValueError, match="labels must lie in"):
        knn.knn_classify(torch.randn(3, 2), torch.tensor([0, -1, 1]), torch.randn(1, 2), num_classes=2)


# ------------------------------------------------------------------------------------------ features


class _Doubler(nn.Module):
    """A 'backbone' with BatchNorm, so eval mode matters: flatten, BN (running stats), x2."""

    def __init__(self, dim):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return 2 * self.bn(x.flatten(1))


def _expected_features(backbone, x):
    bn = backbone.bn
    return 2 * (x.flatten(1) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + 2 * bn.bias


def test_extract_features_single_process_order_eval_mode():
    torch.manual_seed(0)
    x, y = torch.randn(7, 2, 3), torch.arange(7) % 3
    backbone = _Doubler(6).train()
    loader = knn.make_eval_loader(TensorDataset(x, y), batch_size=3)
    feats, labels = knn.extract_features(backbone, loader, "cpu")
    assert torch.allclose(feats, _expected_features(backbone, x), atol=1e-6)
    assert torch.equal(labels, y)
    assert backbone.training  # its mode is restored
    # An unshuffled plain loader is fine on one process; a shuffled one is refused.
    feats2, _ = knn.extract_features(backbone, DataLoader(TensorDataset(x, y), batch_size=2), "cpu")
    assert torch.equal(feats2, feats)
    with pytest.raises(ValueError, match="dataset order"):
        knn.extract_features(backbone, DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True), "cpu")


def test_features_share_weights_and_skip_the_head():
    torch.manual_seed(0)
    net = backbone_constructor("resnet18")(num_classes=5).eval()
    trunk = Features(net)
    x = torch.randn(2, 3, 32, 32)
    head = net.fc
    net.fc = nn.Identity()
    with torch.no_grad():
        assert torch.equal(trunk(x), net(x))
    net.fc = head
    assert trunk.net.conv1 is net.conv1  # shared, not copied


def _extract_worker(rank, world, x, y, backbone_state, n_small):
    backbone = _Doubler(x[0].numel())
    backbone.load_state_dict(backbone_state)
    out = {}
    for name, (xs, ys) in {"odd": (x, y), "tiny": (x[:n_small], y[:n_small])}.items():
        loader = knn.make_eval_loader(TensorDataset(xs, ys), batch_size=2)
        out[name] = knn.extract_features(backbone, loader, "cpu")
        out[name + "_local"] = len(loader.sampler)
    g = torch.Generator().manual_seed(3)
    train, train_labels = torch.randn(23, 5, generator=g), torch.randint(0, 3, (23,), generator=g)
    test, test_labels = torch.randn(11, 5, generator=g), torch.randint(0, 3, (11,), generator=g)
    out["knn"] = knn.knn_evaluate(train, train_labels, test, test_labels, 3, ks=(1, 5), T=0.1)
    return out


@pytest.mark.e2e
def test_distributed_extraction_and_knn_equal_single_process(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(9, 2, 3), torch.arange(9)  # 9 samples: blocks of 4 and 5
    backbone = _Doubler(6)
    results = run_distributed(_extract_worker, WORLD, tmp_path, x, y, backbone.state_dict(), 1)
    expected = _expected_features(backbone, x)
    for r in results:
        feats, labels = r["odd"]
        assert torch.allclose(feats, expected, atol=1e-6) and torch.equal(labels, y)
        feats, labels = r["tiny"]  # one sample: rank 1's block is empty
        assert torch.allclose(feats, expected[:1], atol=1e-6) and torch.equal(labels, y[:1])
    assert [r["odd_local"] for r in results] == [4, 5] and [r["tiny_local"] for r in results] == [0, 1]
    # k-NN counts summed over the two halves of the test set equal one process's.
    single = _single_process_knn()
    assert results[0]["knn"] == results[1]["knn"] == single


def _single_process_knn():
    g = torch.Generator().manual_seed(3)
    train, train_labels = torch.randn(23, 5, generator=g), torch.randint(0, 3, (23,), generator=g)
    test, test_labels = torch.randn(11, 5, generator=g), torch.randint(0, 3, (11,), generator=g)
    _, scores = knn.knn_classify(train, train_labels, test, 3, k=5, T=0.1)
    correct5 = _naive_knn_scores(train, train_labels, test, 3, 5, 0.1).argmax(1).eq(test_labels).sum().item()
    result = knn.knn_evaluate(train, train_labels, test, test_labels, 3, ks=(1, 5), T=0.1)
    assert result[5]["correct1"] == correct5  # independent: the naive loop's predictions
    return result


# ------------------------------------------------------------------------------------------ script


def _tiny_pretrained(tmp_path, arch="resnet18"):
    from selfsup import build_model

    torch.manual_seed(0)
    model = build_model("moco", arch, dim=8, K=16, mlp=True)
    ckpt = {"epoch": 1, "arch": arch, "method": "moco",
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "args": {"arch": arch, "small_stem": False, "image_size": 16}}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(ckpt, path)
    return path


def test_main_knn_runs_and_reports(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(data / "train", classes=3, per_class=4, size=16)
    make_image_folder(data / "val", classes=3, per_class=3, size=16, seed=1)
    ckpt = _tiny_pretrained(tmp_path)
    main_knn = load_script("main_knn")
    assert main_knn.cli([str(data), "--pretrained", str(ckpt), "-j", "0", "-b", "4", "--k", "1", "200",
                         "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (tmp_path / "knn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["k"] for r in records] == [1, 200] and all(r["n"] == 9 and r["train_n"] == 12 for r in records)
    assert records[1]["correct5"] == 9  # 3 classes

    bad = tmp_path / "not-a-checkpoint.pth.tar"
    bad.write_text("hello")
    assert main_knn.cli([str(data), "--pretrained", str(bad), "-j", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not a PyTorch checkpoint" in err and err.count("error") == 1
    for flag, value in (("--k", "0"), ("-t", "0"), ("-b", "-2")):
        assert main_knn.cli([str(data), "--pretrained", str(ckpt), flag, value]) == 2
        assert "must be > 0" in capsys.readouterr().err
