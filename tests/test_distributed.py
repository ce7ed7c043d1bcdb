"""Two real gloo processes: gathers, SimCLR's global loss, MoCo's queue and shuffle BN, DDP."""

import copy
import os

import pytest
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


# ------------------------------------------------------------------------------------------ by construction

# torch.distributed's collectives. NCCL runs them on CUDA tensors only and gloo (the tests' backend)
# accepts CPU tensors, so a CPU tensor handed to one directly passes every CPU test and crashes
# the first multi-GPU run. selfsup.distributed's helpers move tensors to the group's device.
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather",
    "gather_object", "scatter", "scatter_object_list", "barrier", "monitored_barrier", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "all_reduce_coalesced", "all_gather_coalesced", "_all_gather_base",
    "_reduce_scatter_base", "all_gather_into_tensor_coalesced", "reduce_scatter_tensor_coalesced",
}
# Modules whose attributes are collectives: torch.distributed, its c10d core, its autograd versions.
COLLECTIVE_MODULES = {"torch.distributed", "torch.distributed.distributed_c10d", "torch.distributed.nn",
                      "torch.distributed.nn.functional"}


def _direct_collective_calls(path):
    """(line, call) of every torch.distributed collective called in `path` (a Python file)."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    modules, names = set(), {}  # local names bound to torch.distributed / to one of its collectives
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in COLLECTIVE_MODULES and a.asname:
                    modules.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in COLLECTIVE_MODULES:
                    modules.add(a.asname or a.name)
                elif node.module in COLLECTIVE_MODULES and a.name in COLLECTIVES:
                    names[a.asname or a.name] = a.name

    def dotted(expr):
        parts = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if isinstance(expr, ast.Name):
            parts.append(expr.id)
        return ".".join(reversed(parts))

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        module, _, attr = name.rpartition(".")
        if (attr in COLLECTIVES and (module in modules or module in COLLECTIVE_MODULES)) or name in names:
            found.append((node.lineno, name))
    return found


def test_every_collective_goes_through_selfsup_distributed(repo):
    files = [*repo.glob("main_*.py"), *(repo / "ssl").rglob("*.py"), *(repo / "detection").rglob("*.py"),
             *(repo / "tools").rglob("*.py")]
    assert len(files) > 20
    helpers = repo / "ssl" / "selfsup" / "distributed.py"
    offenders = [f"{f.relative_to(repo)}:{line}: {call}(...)" for f in files if f != helpers
                 for line, call in _direct_collective_calls(f)]
    assert not offenders, "call the helpers of selfsup.distributed instead:\n" + "\n".join(offenders)
    # The scan itself sees every form of a direct call.
    assert {c for _, c in _direct_collective_calls(helpers)} >= {"dist.all_reduce", "dist.all_gather",
                                                                 "dist.broadcast", "dist.all_gather_object"}


def test_the_scan_finds_direct_calls_in_any_import_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import torch\nimport torch.distributed as d\nfrom torch import distributed\n"
                   "from torch.distributed import all_gather_object as ago\n"
                   "torch.distributed.all_reduce(t)\nd.broadcast(t, 0)\ndistributed.barrier()\nago(out, x)\n"
                   "d.get_rank()\nhelpers.all_reduce_sum(t)\n"
                   "import torch.distributed.distributed_c10d as c10d\nfrom torch.distributed.nn import functional\n"
                   "c10d._all_gather_base(o, t)\nfunctional.all_reduce(t)\ntorch.distributed.nn.functional.all_gather(t)\n")
    assert [c for _, c in _direct_collective_calls(src)] == [
        "torch.distributed.all_reduce", "d.broadcast", "distributed.barrier", "ago", "c10d._all_gather_base",
        "functional.all_reduce", "torch.distributed.nn.functional.all_gather"]


class _ReachedTheCollective(Exception):
    pass


def test_helpers_hand_collectives_tensors_on_the_group_device(monkeypatch):
    # On a CPU, gloo takes any tensor; pretend the group lives on another device (as NCCL's on a
    # GPU) and check what each helper hands torch.distributed.
    seen = []

    def collective(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)] + [t for a in args if isinstance(a, list)
                                                                        for t in a if isinstance(t, torch.Tensor)]
        seen.append({t.device.type for t in tensors})
        raise _ReachedTheCollective

    monkeypatch.setattr(D, "is_dist_initialized", lambda: True)
    monkeypatch.setattr(D, "group_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    for name in ("all_reduce", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, name, collective)
    x = torch.ones(3)
    calls = [lambda: D.all_reduce_sum(x), lambda: D.all_reduce_mean(x), lambda: D.broadcast(x),
             lambda: D.concat_all_gather(x), lambda: D.all_gather_with_grad(x.requires_grad_())]
    for call in calls:
        with pytest.raises(_ReachedTheCollective):
            call()
    assert seen == [{"meta"}] * len(calls)


def test_device_choice_follows_the_local_rank_under_several_processes(caplog):
    # MoCo's --gpu N selects one process's GPU; with several processes each takes its local rank.
    assert D.choose_device(None, 3, local_rank=0, world_size=1, cuda_count=4) == torch.device("cuda", 3)
    with caplog.at_level("WARNING"):
        assert D.choose_device(None, 3, local_rank=1, world_size=2, cuda_count=4) == torch.device("cuda", 1)
    assert "each takes GPU LOCAL_RANK" in caplog.text
    assert D.choose_device("cuda", None, local_rank=2, world_size=4, cuda_count=4) == torch.device("cuda", 2)
    assert D.choose_device(None, None, local_rank=1, world_size=2, cuda_count=0) == torch.device("cpu")
    for requested, rank, count, message in (("cuda", 4, 4, "start at most one process per GPU"),
                                            ("cuda:5", 0, 2, "N < 2"), ("cuda", 0, 0, "CUDA is not available"),
                                            ("meta", 0, 0, "only cpu and cuda"), ("gpu!", 0, 0, "not a device")):
        with pytest.raises(ValueError, match=message):
            D.choose_device(requested, None, rank, 8, count)


def test_backend_choice_refuses_what_cannot_work():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert D.choose_backend("auto", cuda, 2, 2, explicit_index=False) == "nccl"
    assert D.choose_backend("auto", cpu, 2, 2, explicit_index=False) == "gloo"
    assert D.choose_backend("gloo", cuda, 2, 2, explicit_index=True) == "gloo"  # processes sharing one GPU
    assert D.choose_backend("nccl", cuda, 2, 1, explicit_index=True) == "nccl"  # one process per node
    with pytest.raises(ValueError, match="NCCL refuses"):
        D.choose_backend("nccl", cuda, 2, 2, explicit_index=True)
    with pytest.raises(ValueError, match="needs CUDA devices"):
        D.choose_backend("nccl", cpu, 1, 1, explicit_index=False)


def test_several_processes_without_a_rendezvous_address_are_refused(monkeypatch):
    # Not a group of one each: every process would believe it is rank 0 of 1.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.init_distributed("cpu", "gloo")
    assert not dist.is_initialized()


def test_an_impossible_device_or_backend_is_one_line_and_status_2(capsys):
    import main_pretrain

    assert main_pretrain.cli(["--dist-backend", "nccl", "--device", "cpu", "--epochs", "1"]) == 2
    assert "--dist-backend nccl needs CUDA devices" in capsys.readouterr().out


def test_helpers_are_identities_without_a_process_group():
    x = torch.randn(4, 3)
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    assert D.concat_all_gather(x) is x and D.all_gather_with_grad(x) is x


# ------------------------------------------------------------------------------------------ gathers

def _gather_worker(rank, world):
    x = torch.full((2, 3), float(rank))
    gathered = D.concat_all_gather(x)
    y = torch.arange(6, dtype=torch.float64).view(2, 3).add(10 * rank).requires_grad_()
    out = D.all_gather_with_grad(y)
    (out * (rank + 1)).sum().backward()  # each rank's loss weights all rows by (rank + 1)
    return {"gathered": gathered, "grad": y.grad}


@pytest.mark.e2e
def test_gathers(tmp_path):
    r0, r1 = run_distributed(_gather_worker, WORLD, tmp_path)
    expected = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    # d(sum over ranks of (r+1) * sum(out))/dy = 1 + 2 = 3 for every element on every rank.
    assert torch.equal(r0["grad"], torch.full((2, 3), 3.0, dtype=torch.float64))
    assert torch.equal(r1["grad"], torch.full((2, 3), 3.0, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ SimCLR

def _simclr_worker(rank, world, z1_all, z2_all, t):
    n = z1_all.shape[0] // world
    z1 = z1_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    z2 = z2_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = nt_xent(z1, z2, t, distributed=True)
    loss.backward()
    return {"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}


@pytest.mark.e2e
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


@pytest.mark.e2e
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

@pytest.mark.e2e
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


@pytest.mark.e2e
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
    drifted = copy.deepcopy(model.state_dict())
    D.broadcast_buffers_(model)  # what main_pretrain.py does before saving and evaluating
    return {"drifted": drifted, "synced": model.state_dict()}


@pytest.mark.e2e
def test_ddp_wrapped_models_stay_identical(tmp_path):
    torch.manual_seed(0)
    state = copy.deepcopy(MoCo(tiny_encoder, dim=8, K=16, m=0.9).state_dict())
    r0, r1 = run_distributed(_ddp_worker, WORLD, tmp_path, state)
    # Everything but the BatchNorm running statistics is equal after the steps themselves ...
    stats = [k for k in r0["drifted"] if "running" in k]
    for k in r0["drifted"]:
        if k not in stats:
            assert torch.equal(r0["drifted"][k], r1["drifted"][k]), k
    assert not torch.equal(r0["drifted"]["encoder_q.conv1.weight"], state["encoder_q.conv1.weight"])
    # ... the running statistics follow each process's own batches (DDP broadcasts no buffers) ...
    assert any(not torch.equal(r0["drifted"][k], r1["drifted"][k]) for k in stats)
    # ... until broadcast_buffers_ gives every process rank 0's: then the whole model is one.
    for k in r0["synced"]:
        assert torch.equal(r0["synced"][k], r1["synced"][k]), k
    for k in stats:
        assert torch.equal(r1["synced"][k], r0["drifted"][k]), k


def test_cudnn_autotunes_unless_deterministic(monkeypatch):
    from selfsup.distributed import configure_kernels

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        configure_kernels(deterministic=False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() == before
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        configure_kernels(deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's reproducible workspace
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        configure_kernels(deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's own value is kept
    finally:
        torch.use_deterministic_algorithms(before)
