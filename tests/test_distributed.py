"""Two real gloo processes: gathers, SimCLR's global loss, MoCo's queue and shuffle BN, DDP."""

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import run_distributed
from selfsup import distributed as D
from selfsup.builder import MoCo, SimCLR
from selfsup.losses import nt_xent
from test_builder import tiny_encoder

WORLD = 2


def global_batch(n_per_rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(WORLD * n_per_rank, 3, 8, 8, generator=g), torch.randn(WORLD * n_per_rank, 3, 8, 8, generator=g)


def test_helpers_are_identities_without_a_process_group():
    x = torch.randn(4, 3)
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    assert D.concat_all_gather(x) is x and D.all_gather_with_grad(x) is x
    shuffled, idx = D.batch_shuffle(x)
    assert torch.equal(D.batch_unshuffle(shuffled, idx), x)


# ------------------------------------------------------------------------------------------ gathers

def _gather_worker(rank, world):
    x = torch.full((2, 3), float(rank))
    gathered = D.concat_all_gather(x)
    y = torch.arange(6, dtype=torch.float64).view(2, 3).add(10 * rank).requires_grad_()
    out = D.all_gather_with_grad(y)
    (out * (rank + 1)).sum().backward()  # each rank's loss weights all rows by (rank + 1)
    shuffled, idx = D.batch_shuffle(torch.arange(4).add(4 * rank).view(4, 1))
    restored = D.batch_unshuffle(shuffled, idx)
    return {"gathered": gathered, "grad": y.grad, "shuffled": shuffled, "restored": restored}


def test_gathers_and_shuffle(tmp_path):
    r0, r1 = run_distributed(_gather_worker, WORLD, tmp_path)
    expected = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    # d(sum over ranks of (r+1) * sum(out))/dy = 1 + 2 = 3 for every element on every rank.
    assert torch.equal(r0["grad"], torch.full((2, 3), 3.0, dtype=torch.float64))
    assert torch.equal(r1["grad"], torch.full((2, 3), 3.0, dtype=torch.float64))
    # Shuffle: both ranks together hold a permutation of 0..7; unshuffle restores each batch.
    allv = torch.cat([r0["shuffled"], r1["shuffled"]]).flatten().sort().values
    assert torch.equal(allv, torch.arange(8))
    assert torch.equal(r0["restored"].flatten(), torch.arange(4))
    assert torch.equal(r1["restored"].flatten(), torch.arange(4, 8))


# ------------------------------------------------------------------------------------------ SimCLR

def _simclr_worker(rank, world, z1_all, z2_all, t):
    n = z1_all.shape[0] // world
    z1 = z1_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    z2 = z2_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = nt_xent(z1, z2, t, distributed=True)
    loss.backward()
    return {"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}


def test_simclr_global_loss_and_gradients_equal_one_process(tmp_path):
    torch.manual_seed(0)
    n, t = 3, 0.2
    z1_all = torch.randn(WORLD * n, 5, dtype=torch.float64)
    z2_all = torch.randn(WORLD * n, 5, dtype=torch.float64)
    results = run_distributed(_simclr_worker, WORLD, tmp_path, z1_all, z2_all, t)

    a1, a2 = z1_all.clone().requires_grad_(), z2_all.clone().requires_grad_()
    ref = nt_xent(a1, a2, t)  # one process, the concatenated global batch
    ref.backward()
    # DDP averages over processes: mean of the per-process losses and gradients.
    loss = sum(r["loss"] for r in results) / WORLD
    g1 = torch.cat([r["g1"] for r in results]) / WORLD
    g2 = torch.cat([r["g2"] for r in results]) / WORLD
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(g1, a1.grad)
    torch.testing.assert_close(g2, a2.grad)


def test_simclr_in_ddp_gives_the_gradient_of_the_global_batch_without_bn_effects(tmp_path):
    # With BN in eval mode (fixed statistics) the model is per-sample, so two processes of n
    # samples must reproduce one process over 2n samples exactly: loss and parameter gradients.
    torch.manual_seed(0)
    ref = SimCLR(tiny_encoder, dim=8, hidden_dim=16, T=0.5)
    state = copy.deepcopy(ref.state_dict())
    _freeze_bn(ref)
    x1, x2 = global_batch()
    loss_ref = ref(x1, x2)  # one process over the global batch
    loss_ref.backward()
    results = run_distributed(_simclr_ddp_worker_eval, WORLD, tmp_path, state, x1, x2)
    torch.testing.assert_close(results[0]["loss"], loss_ref.detach())
    for r in results:
        for k, p in ref.named_parameters():
            torch.testing.assert_close(r["grads"][k], p.grad, msg=k)


def _freeze_bn(model):
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.eval()


def _simclr_ddp_worker_eval(rank, world, state, x1_all, x2_all):
    model = SimCLR(tiny_encoder, dim=8, hidden_dim=16, T=0.5)
    model.load_state_dict(state)
    _freeze_bn(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = x1_all.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    loss = ddp(x1_all[sl], x2_all[sl])
    loss.backward()
    return {"loss": D.all_reduce_mean(loss.detach()), "grads": {k: p.grad for k, p in model.named_parameters()}}


# ------------------------------------------------------------------------------------------ MoCo

def test_moco_queues_agree_and_keys_enter_in_rank_order(tmp_path):
    torch.manual_seed(0)
    ref = MoCo(tiny_encoder, dim=8, K=10, m=0.9, shuffle_bn=False)
    ref.eval()  # BN on running stats: keys do not depend on how the batch is split or shuffled
    state = copy.deepcopy(ref.state_dict())
    results = run_distributed(_moco_eval_worker, WORLD, tmp_path, state, 4)
    r0, r1 = results
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == int(r1["ptr"]) == (4 * 6) % 10
    # One process over the global batch fills the queue identically: keys in rank order.
    for step in range(4):
        x1, x2 = global_batch(seed=step)
        ref(x1, x2)
    torch.testing.assert_close(r0["queue"], ref.queue)


def _moco_eval_worker(rank, world, state, steps):
    model = MoCo(tiny_encoder, dim=8, K=10, m=0.9, shuffle_bn=True)
    model.load_state_dict(state)
    model.eval()
    for step in range(steps):
        x1, x2 = global_batch(seed=step)
        n = x1.shape[0] // world
        model(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n])
    return {"queue": model.queue, "ptr": model.queue_ptr}


def _moco_shuffle_worker(rank, world, state, shuffle_bn):
    torch.manual_seed(7)
    model = MoCo(tiny_encoder, dim=8, K=12, m=0.9, shuffle_bn=shuffle_bn)
    model.load_state_dict(state)
    x1, x2 = global_batch(n_per_rank=3, seed=3)
    model(x1[rank * 3:(rank + 1) * 3], x2[rank * 3:(rank + 1) * 3])
    return {"queue": model.queue}


def test_moco_shuffle_bn_really_shuffles(tmp_path):
    torch.manual_seed(0)
    state = copy.deepcopy(MoCo(tiny_encoder, dim=8, K=12, m=0.9).state_dict())
    shuffled = run_distributed(_moco_shuffle_worker, WORLD, tmp_path, state, True)
    plain = run_distributed(_moco_shuffle_worker, WORLD, tmp_path, state, False)
    assert torch.equal(shuffled[0]["queue"], shuffled[1]["queue"])
    assert torch.equal(plain[0]["queue"], plain[1]["queue"])
    # Train-mode BN over other sub-batches gives other keys.
    assert not torch.allclose(shuffled[0]["queue"][:, :6], plain[0]["queue"][:, :6])
    # Without shuffling, keys equal each rank's own BN over its own 3 samples.
    model = MoCo(tiny_encoder, dim=8, K=12, m=0.9)
    model.load_state_dict(state)
    model._momentum_update_key_encoder()
    x1, x2 = global_batch(n_per_rank=3, seed=3)
    with torch.no_grad():
        k = torch.cat([F.normalize(model.encoder_k(x2[i * 3:(i + 1) * 3]), dim=1) for i in range(WORLD)])
    torch.testing.assert_close(plain[0]["queue"][:, :6].T, k)


# ------------------------------------------------------------------------------------------ DDP

def _ddp_worker(rank, world, state):
    torch.manual_seed(rank)  # different data and shuffles per rank
    model = MoCo(tiny_encoder, dim=8, K=16, m=0.9)
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for step in range(3):
        x1, x2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
        logits, labels = ddp(x1, x2)
        F.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()
    return {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}


def test_ddp_wrapped_models_stay_identical(tmp_path):
    torch.manual_seed(0)
    state = copy.deepcopy(MoCo(tiny_encoder, dim=8, K=16, m=0.9).state_dict())
    r0, r1 = run_distributed(_ddp_worker, WORLD, tmp_path, state)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert not torch.equal(r0["encoder_q.conv1.weight"], state["encoder_q.conv1.weight"])
