"""--accum-iter: W processes with K micro-batches train what W x K processes train with the same
global batch, for every method - checked against runs of that many real (gloo) processes - and
the pieces that make it so: the data each micro-batch stands for, SimCLR's embedding-gradient
cache against the full batch's gradient, the BatchNorm statistics, the once-per-step momentum
update and enqueue, the checkpoint between optimizer steps."""

import copy

import pytest
import torch
from helpers import TINY_OPTIONS, make_image_folder, run_distributed, run_script, tiny_flags, torchrun
from selfsup.accumulation import Accumulation, batch_line, frozen_bn_statistics, micro_batches
from selfsup.data.sampler import ResumableDistributedSampler
from selfsup.errors import UsageError
from selfsup.methods import METHODS, SimCLR
from test_builder import tiny_encoder

# 24 images, global batch 8: 3 steps an epoch, 2 epochs. The demo's kind of settings, small.
RUN = ["-a", "resnet18", "--image-size", "16", "-b", "8", "--epochs", "2", "--moco-dim", "16", "--aug", "moco_v2",
       "-p", "1", "--seed", "5", "-j", "0", "--device", "cpu"]
# MoCo with shuffle BN's cross-process permutation and the one-process sub-batch permutations
# (each micro-batch's random stream).
EXTRA = {"moco": ["--bn-splits", "2", "--moco-k", "16"],
         "dino": ["--aug", "dino", "--local-crops-number", "2", "--local-crops-size", "8"]}  # multi-crop: 2 x 16 + 2 x 8 px


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("accum") / "data", classes=2, per_class=12, size=20, seed=3)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):  # one global batch of 16
    return make_image_folder(tmp_path_factory.mktemp("accum") / "one", classes=2, per_class=8, size=20, seed=3)


def pretrain(method, folder, out, processes=1, accum=None, extra=()):
    args = ["main_pretrain.py", str(folder), "--method", method, *tiny_flags(method), *RUN, *EXTRA.get(method, []),
            *extra, "--output-dir", str(out)] + (["--accum-iter", str(accum)] if accum else [])
    r = torchrun(processes, args, timeout=600) if processes > 1 else run_script(args, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out / "checkpoint.pth.tar", weights_only=True), r.stdout + r.stderr


def assert_same_run(a, b, tol):
    """Parameters, momentum network, queue, BatchNorm statistics and optimizer state of two
    checkpoints within `tol` (relative to each tensor's scale; 0: equal bit for bit), and the same
    position."""
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    pairs = [(key, x, b["state_dict"][key]) for key, x in a["state_dict"].items()]
    pairs += [(f"optimizer {i}.{name}", x, b["optimizer"]["state"][i][name])
              for i, state in a["optimizer"]["state"].items() for name, x in state.items() if isinstance(x, torch.Tensor)]
    for key, x, y in pairs:
        if x.is_floating_point() and tol:
            torch.testing.assert_close(y, x, rtol=tol, atol=tol * max(1.0, x.abs().max().item()), msg=key)
        else:
            assert torch.equal(x, y), key


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(METHODS))
def test_one_process_with_two_micro_batches_trains_what_two_processes_train(method, folder, one_step, tmp_path):
    # Through the scripts: data, views, step, checkpoint. MoCo, BYOL and MoCo v3 run the same sums
    # in the same order as the two processes: equal bit for bit over 6 steps. SimCLR's cache sums
    # the gradient in another order: float32 rounding, which these tiny networks (BatchNorm over a
    # few 1 x 1 maps) amplify within a few steps, so one step here and several in float64 below.
    extra, tol = (["--epochs", "1", "-b", "16"], 1e-4) if method == "simclr" else ((), 0)
    data = one_step if method == "simclr" else folder
    two, _ = pretrain(method, data, tmp_path / "two", processes=2, extra=extra)
    one, log = pretrain(method, data, tmp_path / "one", accum=2, extra=extra)
    batch = 16 if method == "simclr" else 8
    assert f"global batch {batch} = 1 process(es) x 2 micro-batches of {batch // 2}" in log
    assert_same_run(two, one, tol)
    assert len(one["rng"]) == len(two["rng"]) == 2  # a random stream per (virtual) process


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["moco", "simclr"])
def test_two_processes_with_two_micro_batches_train_what_four_processes_train(method, one_step, tmp_path):
    # One step of 16 (4 a process): the all-reduce over 2 instead of 4 processes rounds otherwise.
    extra = ["--epochs", "1", "-b", "16"]
    four, _ = pretrain(method, one_step, tmp_path / "four", processes=4, extra=extra)
    two, _ = pretrain(method, one_step, tmp_path / "two", processes=2, accum=2, extra=extra)
    assert_same_run(four, two, 1e-4)


def _steps(rank, world, k, method, steps):
    """`steps` SGD steps of `method` (ResNet-18 at 32 px, float64) through the engine's epoch loop
    on a global batch of 16, this process's share in k micro-batches; the state after them."""
    import torch.nn as nn
    from selfsup.builder import build_model
    from selfsup.data.pipeline import split_micro
    from selfsup.distributed import DistInfo
    from selfsup.engine import StepContext, train_one_epoch
    from selfsup.rng import MicroStreams

    torch.manual_seed(0)
    options = {**TINY_OPTIONS[method], **({"K": 64, "bn_splits": 2} if method == "moco" else {})}
    model = build_model(method, "resnet18", dim=16, **options).double()
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9)
    data = torch.randn(steps, 2, 16, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mine = slice(rank * 16 // world, (rank + 1) * 16 // world)  # rank r's share: virtual ranks r*k .. r*k + k - 1
    batches = [([x1[mine], x2[mine]], torch.zeros(16 // world), torch.zeros(16 // world, dtype=torch.long))
               for x1, x2 in data]
    dist = DistInfo(rank=rank, world_size=world, backend="gloo" if world > 1 else None)
    ctx = StepContext(epochs=1, steps_per_epoch=steps, base_lr=0.03, cos=False, schedule=[], warmup_epochs=0.0,
                      amp="none", print_freq=10**9, global_batch=16, dist=dist,
                      acc=Accumulation(k, MicroStreams(k) if k > 1 else None))
    train_one_epoch(ddp, batches, lambda views, epoch, step: split_micro(views, k), opt,
                    torch.amp.GradScaler("cpu", enabled=False), 0, 0, ctx)
    return {key: v.clone() for key, v in model.state_dict().items()}


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(METHODS))
def test_every_split_of_the_processes_trains_the_same_weights_in_float64(method, tmp_path):
    # Real gloo processes and DDP, 3 steps: 1 x 2 == 2 x 1 and 2 x 2 == 4 x 1, to float64 rounding
    # (which MoCo's chaotic first steps amplify to 1e-8).
    two, four = (run_distributed(_steps, w, tmp_path, 1, method, 3)[0] for w in (2, 4))
    for world, k, reference in ((1, 2, two), (2, 2, four)):
        mine = run_distributed(_steps, world, tmp_path, k, method, 3)[0]
        for key, x in reference.items():
            if x.is_floating_point():
                torch.testing.assert_close(mine[key], x, rtol=1e-6, atol=1e-6 * max(1.0, x.abs().max().item()),
                                           msg=f"{world} x {k}: {key}")
            else:
                assert torch.equal(mine[key], x), key


@pytest.mark.e2e
def test_a_run_killed_between_optimizer_steps_resumes_bit_for_bit(folder, tmp_path):
    # MoCo: its queue, momentum encoder and the micro-batches' random streams all cross the checkpoint.
    args = ["tests/fault_inject.py", str(folder), "--method", "moco", *tiny_flags("moco"), *RUN, *EXTRA["moco"],
            "--accum-iter", "2", "--save-every-steps", "1"]
    whole = run_script(args + ["--output-dir", str(tmp_path / "whole")], FAULT="kill:999")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    killed = run_script(args + ["--output-dir", str(tmp_path / "killed")], FAULT="kill:4")
    assert killed.returncode == 137
    resumed = run_script(args + ["--output-dir", str(tmp_path / "killed")], FAULT="kill:999")
    assert resumed.returncode == 0 and "epoch 1, step 1" in resumed.stdout + resumed.stderr
    a, b = (torch.load(tmp_path / d / "checkpoint.pth.tar", weights_only=True) for d in ("whole", "killed"))
    for key, x in a["state_dict"].items():
        assert torch.equal(x, b["state_dict"][key]), key
    for x, y in zip(a["rng"], b["rng"]):
        assert torch.equal(x["torch"], y["torch"])


# ---------------------------------------------------------------------------------------------- the pieces


def test_each_micro_batch_takes_the_samples_of_the_process_it_stands_for():
    # 2 processes x 3 micro-batches of 4: micro-batch j of rank r = rank 3r + j of 6 processes.
    for r in range(2):
        sampler = ResumableDistributedSampler(100, 12, num_replicas=2, rank=r, accum=3)
        sampler.set_epoch(1, 1)
        mine = sampler.positions().view(-1, 3, 4)
        for j in range(3):
            alone = ResumableDistributedSampler(100, 4, num_replicas=6, rank=3 * r + j)
            alone.set_epoch(1, 1)
            assert torch.equal(mine[:, j], alone.positions().view(-1, 4))
    # K = 1 deals as torch's DistributedSampler does: rank r takes r, r + W, ...
    sampler = ResumableDistributedSampler(100, 8, num_replicas=3, rank=2)
    assert sampler.positions().tolist() == list(range(2, 96, 3))


def test_accum_iter_and_micro_batch_say_the_same_and_refuse_what_does_not_divide():
    assert micro_batches(4096, 2, 8, None) == (8, 2048) == micro_batches(4096, 2, None, 256)
    assert micro_batches(256, 1, None, None) == (1, 256)
    with pytest.raises(UsageError, match="--micro-batch 300 does not divide the 2048 images.*--micro-batch 256"):
        micro_batches(4096, 2, None, 300)
    with pytest.raises(UsageError, match="do not split into 3 micro-batches"):
        micro_batches(4096, 2, 3, None)
    with pytest.raises(UsageError, match="give one of them"):
        micro_batches(4096, 2, 8, 256)
    assert batch_line(4096, 2, 8) == "global batch 4096 = 2 process(es) x 8 micro-batches of 256"


def test_simclr_cache_gradients_equal_the_full_batch_gradients():
    # float64, BatchNorm on its running statistics (eval): the full batch's NT-Xent gradient is then
    # what two micro-batches of half the size must give through the cache.
    torch.manual_seed(0)
    model = SimCLR(tiny_encoder, dim=8, hidden_dim=16, T=0.5).double().eval()
    x1, x2 = torch.randn(2, 8, 3, 8, 8, dtype=torch.float64)
    full, cached = copy.deepcopy(model), copy.deepcopy(model)
    full(x1, x2).backward()
    acc = Accumulation(2)
    micro = [[x1[:4], x2[:4]], [x1[4:], x2[4:]]]
    with torch.no_grad():
        plan = cached.prepare(micro, acc)
    assert len(plan.grads) == 2 and plan.grads[0].shape == (8, 8)
    for j, views in enumerate(micro):
        objective, _ = cached(*views, plan=plan, micro=j)
        (objective / 2).backward()
    for (name, p), q in zip(full.named_parameters(), cached.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_momentum_network_moves_once_per_step_and_the_statistics_with_micro_batch_0(method):
    from selfsup.builder import build_model

    torch.manual_seed(0)
    model = build_model(method, "resnet18", dim=8, **TINY_OPTIONS[method])
    x = torch.randn(4, 2, 3, 16, 16)
    micro = [[x[0], x[1]], [x[2], x[3]]]
    acc = Accumulation(2)
    before_q = {k: v.clone() for k, v in model.encoder_q.state_dict().items()}
    before_k = {k: v.clone() for k, v in getattr(model, "encoder_k", model.encoder_q).state_dict().items()}
    if hasattr(model, "encoder_k"):
        with torch.no_grad():  # move the online network so that an EMA step shows
            for p in model.encoder_q.parameters():
                p.add_(0.1)
        model.momentum_at(0.0)
    online = {k: v.clone() for k, v in model.encoder_q.state_dict().items()}
    with torch.no_grad():
        plan = model.prepare(micro, acc)
    first = copy.deepcopy(model)  # statistics after micro-batch 0 alone, computed separately below
    for j, views in enumerate(micro):
        with acc.micro(j, model):
            objective, _ = model(*views, plan=plan, micro=j)
            (objective / 2).backward()
    model.finish(plan)
    model.after_optimizer_step()  # as the engine calls it (DINO's EMA comes after the step)
    if hasattr(model, "encoder_k"):  # exactly one EMA step: m * target + (1 - m) * online
        m = model.m
        for name, p in model.encoder_k.named_parameters():
            torch.testing.assert_close(p, m * before_k[name] + (1 - m) * online[name], msg=name)
    # The running statistics are those of micro-batch 0's forward pass alone.
    with torch.no_grad():
        first(*micro[0], plan=plan, micro=0)
    for name, buf in model.encoder_q.named_buffers():
        if "running" in name:
            torch.testing.assert_close(buf, first.encoder_q.get_buffer(name), msg=name)
            assert not torch.equal(buf, before_q[name]), name


def test_moco_enqueues_every_micro_batchs_keys_once_in_rank_order():
    from selfsup.methods import MoCo

    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=8, K=16, m=0.9, mlp=True, shuffle_bn=False).eval()
    x = torch.randn(4, 3, 3, 8, 8)
    acc = Accumulation(2)
    with torch.no_grad():
        plan = model.prepare([[x[0], x[1]], [x[2], x[3]]], acc)
        keys = [torch.nn.functional.normalize(model.encoder_k(x[i]), dim=1) for i in (1, 3)]  # after the EMA
    for j in range(2):
        model(x[2 * j], x[2 * j + 1], plan=plan, micro=j)
    model.finish(plan)
    torch.testing.assert_close(model.queue[:, :6].T, torch.cat(keys))
    assert int(model.queue_ptr) == 6


def test_batchnorm_statistics_can_be_kept_through_a_block():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_bn_statistics([net]):
        net(torch.randn(2, 3, 4, 4))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net(torch.randn(2, 3, 4, 4))
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])


def test_sync_bn_with_micro_batches_is_refused_naming_the_fix(tmp_path):
    import main_pretrain
    from selfsup.distributed import DistInfo

    for dist in (DistInfo(world_size=2, backend="nccl"), DistInfo()):  # one process too: no silent BatchNorm
        args = main_pretrain.resolve_config(main_pretrain.get_args_parser().parse_args(
            [str(tmp_path), "--accum-iter", "2", "--sync-bn"]))
        with pytest.raises(UsageError, match="add --no-sync-bn"):
            main_pretrain.build(args, dist)


def test_accum_is_not_part_of_what_defines_a_run():
    from selfsup.resume import RUN_DEFINING

    # The layout of processes and micro-batches changes only speed and memory, not the weights.
    assert "accum_iter" not in RUN_DEFINING and "micro_batch" not in RUN_DEFINING


@pytest.mark.parametrize("aug, sizes", [("byol", [16, 16]), ("dino", [16, 16, 8, 8])])  # DINO: 2 global, 2 local crops
@pytest.mark.parametrize("backend, workers", [("memory", 0), ("memory", 1), ("batched", 0), ("batched", 1),
                                              ("reference", 0)])
def test_each_micro_batch_gets_the_views_of_the_process_it_stands_for(backend, workers, aug, sizes, tmp_path):
    from selfsup.data.pipeline import build_pretrain_pipeline
    from selfsup.distributed import DistInfo

    make_image_folder(tmp_path, classes=2, per_class=6, size=28 if backend == "memory" else 40, ext="png")
    options = {"local_crops_number": 2, "local_size": 8} if aug == "dino" else None

    def steps(rank, world, batch, accum):
        p = build_pretrain_pipeline(str(tmp_path), aug=aug, image_size=16, batch_size=batch, workers=workers,
                                    dist=DistInfo(rank=rank, world_size=world), seed=3, backend=backend, accum=accum,
                                    aug_options=options)
        p.sampler.set_epoch(1)
        return [p.views(views, 1, i) for i, (views, _, _) in enumerate(p.loader)]

    micro = steps(0, 1, 4, 2)  # one process, two micro-batches of 2
    alone = [steps(r, 2, 2, 1) for r in range(2)]  # two processes of 2
    assert len(micro) == len(alone[0]) == 3
    for step, views in enumerate(micro):
        assert len(views) == 2
        for j in range(2):
            assert [v.shape[-1] for v in views[j]] == [v.shape[-1] for v in alone[j][step][0]] == sizes
            for a, b in zip(views[j], alone[j][step][0]):
                assert torch.equal(a, b), (step, j)
