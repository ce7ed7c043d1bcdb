"""The GPU paths: `pytest -m cuda` on a machine with one GPU (tools/gpu_check.py runs them).

Everything else in the suite runs on a CPU with gloo, which accepts what NCCL refuses (CPU tensors
in collectives) and has no bf16/fp16 kernels of the kind a GPU runs. These tests run the same
code on the GPU: the batched augmentation against the CPU path, mixed precision, SyncBN,
torch.compile, channels_last, the collectives on an NCCL group, and every entry point for a few
steps (one process, torchrun with NCCL, two gloo processes sharing the GPU, --amp bf16, a kill
and a bitwise resume, linear evaluation, kNN, detection).

SELFSUP_TEST_DEVICE=cpu runs the same tests on the CPU with gloo and tiny sizes
(`tools/gpu_check.py --dry-run`, which CI runs, so these tests cannot rot between GPU runs).
Without a GPU and without that variable they are skipped.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TINY_OPTIONS, make_image_folder, run_script, torchrun
from selfsup import distributed as D
from selfsup.builder import build_model
from selfsup.data.augmentations import get_preset
from selfsup.data.batch_augment import ViewsAugment
from selfsup.methods import METHODS
from selfsup.networks import compile_networks
from selfsup.rng import augment_generator, seeded

DEVICE = torch.device(os.environ.get("SELFSUP_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
BACKEND = "nccl" if ON_GPU else "gloo"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                       reason="no CUDA device (SELFSUP_TEST_DEVICE=cpu runs these tests on the CPU)"),
]

# Subprocesses: deterministic cuBLAS (needed by --deterministic), results compared like with like.
ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
TINY = ["-a", "resnet18", "--image-size", "32", "-b", "16", "--epochs", "1", "-j", "0", "--moco-dim", "16",
        "--moco-k", "64", "--mlp-dim", "64", "-p", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """48 labelled 40-pixel images (3 steps of 16) with train/ and val/ for the evaluations."""
    root = tmp_path_factory.mktemp("gpu") / "data"
    make_image_folder(root / "train", classes=2, per_class=24, size=40, seed=1)
    make_image_folder(root / "val", classes=2, per_class=6, size=40, seed=2)
    return root


@pytest.fixture
def group_of_one():
    """A process group of this process alone (NCCL on a GPU, gloo on the CPU), as
    `--dist-backend nccl` makes at world size 1."""
    assert not dist.is_initialized()
    if ON_GPU:
        torch.cuda.set_device(DEVICE.index or 0)
    dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": torch.device("cuda", torch.cuda.current_device())} if ON_GPU else {}))
    yield
    dist.destroy_process_group()


def ok(r):
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- entry points
# First: what would stop a user. gpu_check's smoke part runs the file in order within its budget.


@pytest.mark.parametrize("method", list(METHODS))
def test_pretraining_one_process(method, folder, tmp_path):
    out = ok(run_script(["main_pretrain.py", str(folder), "--method", method, *TINY, "--device", str(DEVICE),
                         "--output-dir", str(tmp_path / "run")], **ENV))
    assert f"1 process(es) on {DEVICE.type}" in out and "held in memory" in out
    ckpt = load(tmp_path / "run" / "checkpoint.pth.tar")
    assert ckpt["device_type"] == DEVICE.type and ckpt["global_step"] == 3


def test_mocov3_with_a_vision_transformer(folder, tmp_path):
    out = ok(run_script(["main_pretrain.py", str(folder), "--method", "mocov3", *TINY, "-a", "vit_small_p4",
                         "--stop-grad-conv1", "--optimizer", "adamw", "--lr", "1e-4",
                         "--amp", "bf16" if ON_GPU else "none",  # bf16 on a CPU without bf16 kernels: minutes
                         "--device", str(DEVICE), "--output-dir", str(tmp_path / "run")], **ENV))
    assert "mocov3 vit_small_p4" in out
    ckpt = load(tmp_path / "run" / "checkpoint.pth.tar")
    assert ckpt["global_step"] == 3 and "module.encoder_q.conv_proj.weight" in ckpt["state_dict"]
    out = ok(run_script(["main_knn.py", str(folder), "--pretrained", str(tmp_path / "run" / "checkpoint.pth.tar"),
                         "--k", "5", "-b", "16", "-j", "0", "--device", str(DEVICE),
                         "--output-dir", str(tmp_path / "knn")], **ENV))
    assert "5-NN" in out


def test_dino_with_a_vision_transformer_and_multi_crop(folder, tmp_path):
    # DINO's ViT (DeiT-S, 6 heads, at 32 px) with 2 global crops of 32 px and 2 local of 16, the
    # backbone run once per size; main_knn.py then reads the teacher.
    out = ok(run_script(["main_pretrain.py", str(folder), "--method", "dino", *TINY, "-a", "deit_small_p4",
                         "--out-dim", "256", "--local-crops-number", "2", "--optimizer", "adamw", "--lr", "1e-4",
                         "--amp", "bf16" if ON_GPU else "none", "--device", str(DEVICE),
                         "--output-dir", str(tmp_path / "run")], **ENV))
    assert "dino deit_small_p4" in out and "aug dino at 2x32px + 2x16px" in out
    ckpt = load(tmp_path / "run" / "checkpoint.pth.tar")
    assert ckpt["global_step"] == 3 and ckpt["evaluated"] == "encoder_k"
    assert "module.encoder_k.conv_proj.weight" in ckpt["state_dict"]
    out = ok(run_script(["main_knn.py", str(folder), "--pretrained", str(tmp_path / "run" / "checkpoint.pth.tar"),
                         "--k", "5", "-b", "16", "-j", "0", "--device", str(DEVICE),
                         "--output-dir", str(tmp_path / "knn")], **ENV))
    assert "5-NN" in out


def test_pretraining_under_torchrun_with_the_device_backend(folder, tmp_path):
    extra = ["--sync-bn"] if ON_GPU else ["--bn-splits", "2"]
    out = ok(torchrun(1, ["main_pretrain.py", str(folder), "--method", "moco", *TINY, "--dist-backend", BACKEND,
                          *extra, "--knn-every", "1", "--output-dir", str(tmp_path / "run")], **ENV))
    assert re.search(rf"1 process\(es\) on {DEVICE.type}(:0)? \({BACKEND}\)", out), out[-3000:]
    assert "kNN top-1" in out


def test_kill_and_resume_on_the_device_is_bitwise(folder, tmp_path):
    run = ["main_pretrain.py", str(folder), "--method", "moco", *TINY, "--epochs", "2", "--device", str(DEVICE),
           "--deterministic", "--bn-splits", "2"]
    ok(run_script([*run, "--output-dir", str(tmp_path / "ref")], **ENV))
    args = [*run[1:], "--save-every-steps", "2", "--output-dir", str(tmp_path / "run")]
    killed = run_script(["tests/fault_inject.py", *args], FAULT="kill:4", **ENV)
    assert killed.returncode == 137, killed.stdout[-3000:] + killed.stderr[-3000:]
    out = ok(run_script(["main_pretrain.py", *args], **ENV))
    assert "(global step 4)" in out
    a, b = load(tmp_path / "ref" / "checkpoint.pth.tar"), load(tmp_path / "run" / "checkpoint.pth.tar")
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(a['state_dict'])} tensors differ, e.g. {differ[:3]}"


def test_bf16_pretraining_and_the_batched_backend(tmp_path):
    data = make_image_folder(tmp_path / "big", classes=2, per_class=16, size=80)  # > 64 px: decode + crops
    out = ok(run_script(["main_pretrain.py", str(data), "--method", "byol", *TINY, "--image-size", "64", "-j", "2",
                         "--amp", "bf16", "--channels-last", "--device", str(DEVICE),
                         "--output-dir", str(tmp_path / "run")], **ENV))
    assert "batched" in out or "colour" in out
    loss = [float(x) for x in re.findall(r"Epoch 0 done: loss ([0-9.]+)", out)]
    assert loss and all(0 < v < 10 for v in loss)


def test_evaluations_and_detection_run_on_the_device(folder, tmp_path):
    ok(run_script(["main_pretrain.py", str(folder), "--method", "simclr", *TINY, "--device", str(DEVICE),
                   "--output-dir", str(tmp_path / "run")], **ENV))
    ckpt = str(tmp_path / "run" / "checkpoint.pth.tar")
    out = ok(run_script(["main_lincls.py", str(folder), "--pretrained", ckpt, "--epochs", "2", "-b", "16", "-j", "0",
                         "--lr", "0.5", "--device", str(DEVICE), "--output-dir", str(tmp_path / "lin")], **ENV))
    assert "sanity check passed" in out
    ok(run_script(["main_lincls.py", str(folder), "--pretrained", ckpt, "--epochs", "1", "-b", "16", "-j", "0",
                   "--train-aug", "none", "--device", str(DEVICE), "--output-dir", str(tmp_path / "lin-cached")], **ENV))
    out = ok(run_script(["main_knn.py", str(folder), "--pretrained", ckpt, "--k", "5", "-b", "16", "-j", "0",
                         "--device", str(DEVICE), "--output-dir", str(tmp_path / "knn")], **ENV))
    assert "5-NN" in out
    shapes = tmp_path / "shapes"
    ok(run_script(["detection/make_synthetic.py", str(shapes), "--train", "16", "--test", "8"], **ENV))
    out = ok(run_script(["detection/train_torchvision.py", "--recipe", "demo", "--random-init", "--data-root",
                         str(shapes), "--max-iter", "6", "--steps", "4", "--warmup-iters", "2", "-b", "4",
                         "--device", str(DEVICE), "--output-dir", str(tmp_path / "det")], **ENV))
    assert "AP50" in out


def test_two_gloo_processes_share_the_device(folder, tmp_path):
    device = "cuda:0" if ON_GPU else "cpu"
    out = ok(torchrun(2, ["main_pretrain.py", str(folder), "--method", "simclr", *TINY, "--device", device,
                          "--dist-backend", "gloo", "--output-dir", str(tmp_path / "run")], **ENV))
    assert "2 process(es)" in out and "(gloo)" in out
    assert load(tmp_path / "run" / "checkpoint.pth.tar")["world_size"] == 2


def test_micro_batches_on_the_device_train_what_two_processes_train(folder, tmp_path):
    # --accum-iter on the device: each micro-batch's CUDA random stream (MoCo's shuffle-BN and
    # sub-batch permutations drawn on the GPU), the gathers, the 1/K scaling; bitwise against two
    # gloo processes sharing the GPU, both --deterministic.
    device = "cuda:0" if ON_GPU else "cpu"
    run = ["main_pretrain.py", str(folder), "--method", "moco", *TINY, "--device", device, "--deterministic",
           "--bn-splits", "2"]
    ok(torchrun(2, [*run, "--dist-backend", "gloo", "--output-dir", str(tmp_path / "two")], **ENV))
    out = ok(run_script([*run, "--accum-iter", "2", "--output-dir", str(tmp_path / "one")], **ENV))
    assert "1 process(es) x 2 micro-batches of 8" in out
    a, b = load(tmp_path / "two" / "checkpoint.pth.tar"), load(tmp_path / "one" / "checkpoint.pth.tar")
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(a['state_dict'])} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("method", ["simclr", "mocov3"])
def test_micro_batches_under_mixed_precision(method, folder, tmp_path):
    # fp16's GradScaler scales each micro-batch's objective / K; bf16 autocast covers prepare too.
    amp = ["--amp", "fp16" if method == "simclr" else "bf16"] if ON_GPU else []
    out = ok(run_script(["main_pretrain.py", str(folder), "--method", method, *TINY, *amp, "--accum-iter", "4",
                         "--device", str(DEVICE), "--output-dir", str(tmp_path / "run")], **ENV))
    assert "x 4 micro-batches of 4" in out
    ckpt = load(tmp_path / "run" / "checkpoint.pth.tar")
    assert ckpt["global_step"] == 3 and len(ckpt["rng"]) == 4
    assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("aug", ["moco_v2", "byol"])
def test_batched_augmentation_on_the_device_equals_the_cpu_path(aug):
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (8, 3, 96, 96), dtype=torch.uint8, generator=g) for _ in range(2)]
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, generator=g)
    for size in (96, 32):  # uint8 crops from the workers (blur on), and images held in memory (crops here too)
        cpu = ViewsAugment(get_preset(aug, size), size)
        dev = copy.deepcopy(cpu).to(DEVICE)

        def views(augment, device):
            if size == 96:
                return augment([c.to(device) for c in crops], augment_generator(0, 1, 2, 0))
            return augment.forward_from_images(images.to(device), augment_generator(0, 1, 3, 0))

        for a, b in zip(views(cpu, torch.device("cpu")), views(dev, DEVICE)):
            assert b.device.type == DEVICE.type and a.shape == b.shape
            torch.testing.assert_close(b.cpu(), a, atol=2e-3, rtol=0)  # under 1/2 of a uint8 level, normalised


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_stay_finite_and_close_to_fp32(method, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    torch.manual_seed(0)
    model = build_model(method, "resnet18", dim=32, **TINY_OPTIONS[method]).to(DEVICE)
    x1, x2 = torch.randn(2, 16, 3, 32, 32, device=DEVICE)
    losses, cosines = {}, {}
    for precision in ("fp32", amp):
        m = copy.deepcopy(model)
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=precision != "fp32"):
            out = m(x1, x2)
            if method == "moco":
                assert out[0].dtype == torch.float32  # the contrastive logits stay float32 under autocast
                cosines[precision] = out[0] * m.T  # N x (1 + K)
            loss = out if method != "moco" else F.cross_entropy(*out)
        scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16")
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert all(torch.isfinite(p).all() for p in m.parameters())
        losses[precision] = loss.item()
    if method == "moco":
        # MoCo's loss at T = 0.07 magnifies the features' rounding 14 times (with CPUs' native bf16
        # kernels, AMX, the loss moved 2-7%): its similarities are compared instead. Measured there:
        # 0.006-0.007 mean absolute difference over 5 seeds.
        assert (cosines[amp] - cosines["fp32"]).abs().mean() < 0.02, losses
    else:
        assert abs(losses[amp] - losses["fp32"]) < 0.03 * abs(losses["fp32"]) + 0.01, losses


def test_channels_last_gives_the_same_step():
    # In float64: on an AVX2 CPU, oneDNN's float32 channels_last kernels under split BN gave conv1
    # gradients 0.4-1% away from the contiguous ones, while in float64 the two agree to 1e-13 - the
    # kernels' rounding, not the layout logic this test is about; on a GPU, TF32 convolutions would
    # blur it the same way.
    dtype = torch.float64
    torch.manual_seed(0)
    model = build_model("moco", "resnet18", dim=32, K=256, mlp=True, T=0.2, bn_splits=4).to(DEVICE, dtype)
    x1, x2 = torch.randn(2, 16, 3, 32, 32, device=DEVICE, dtype=dtype)
    grads = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = copy.deepcopy(model).to(memory_format=fmt)
        torch.manual_seed(1)  # the same BN-split permutation of the keys
        loss = m(x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt), return_loss=True)
        loss.backward()
        grads[fmt] = (loss.item(), m.encoder_q.conv1.weight.grad.clone())
    a, b = grads.values()
    assert a[0] == pytest.approx(b[0], rel=1e-4)
    assert (b[1] - a[1]).norm() < 1e-3 * a[1].norm()  # summation orders differ: compare the whole gradient


@pytest.mark.skipif(not ON_GPU, reason="SyncBatchNorm has no CPU kernel")
def test_syncbn_model_trains_in_a_group_of_one(group_of_one):
    # The conversion, DDP and the CUDA module only: at world size 1 SyncBatchNorm normalises like
    # BatchNorm, and NCCL refuses two processes on one GPU, so its cross-process path needs 2 GPUs.
    torch.manual_seed(0)
    model = build_model("byol", "resnet18", sync_bn=True, dim=32, hidden_dim=64).to(DEVICE)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[DEVICE.index or 0])
    loss = ddp(*torch.randn(2, 8, 3, 32, 32, device=DEVICE))
    loss.backward()
    assert torch.isfinite(loss)


def test_seeded_blocks_leave_the_device_generator_alone():
    torch.manual_seed(0)
    if ON_GPU:
        torch.cuda.manual_seed_all(0)
        before = torch.cuda.get_rng_state()
        expected = torch.randperm(100, device=DEVICE)
        torch.cuda.set_rng_state(before)
    with seeded(123):
        torch.rand(3)
    if ON_GPU:
        assert torch.equal(torch.cuda.get_rng_state(), before)
        assert torch.equal(torch.randperm(100, device=DEVICE), expected)


def test_collectives_take_tensors_from_any_device(group_of_one):
    cpu = torch.arange(4.0)
    here = cpu.to(DEVICE)
    for x in (cpu, here):
        assert D.all_reduce_sum(x).device == x.device and torch.equal(D.all_reduce_sum(x).cpu(), cpu)
        assert torch.equal(D.all_reduce_mean(x).cpu(), cpu) and torch.equal(D.broadcast(x).cpu(), cpu)
        assert torch.equal(D.concat_all_gather(x).cpu(), cpu)
        g = x.clone().requires_grad_()
        D.all_gather_with_grad(g).sum().backward()
        assert g.grad.device == x.device and torch.equal(g.grad.cpu(), torch.ones(4))
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_objects("x") == ["x"]
    D.barrier()
    if ON_GPU:  # what the helpers prevent: NCCL refuses a CPU tensor
        with pytest.raises(Exception):
            dist.all_reduce(cpu.clone())
            torch.cuda.synchronize()


@pytest.mark.skipif(not ON_GPU, reason="counts CUDA synchronisations")
def test_a_training_step_waits_for_the_gpu_only_at_its_event():
    import warnings

    from selfsup.distributed import DistInfo
    from selfsup.engine import StepContext, train_one_epoch

    torch.manual_seed(0)
    model = build_model("moco", "resnet18", dim=32, K=256, mlp=True, T=0.2).to(DEVICE)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    views = [torch.randn(16, 3, 32, 32, device=DEVICE) for _ in range(2)]
    steps = 6
    batches = [(views, torch.zeros(16), torch.zeros(16, dtype=torch.long))] * steps
    ctx = StepContext(epochs=1, steps_per_epoch=steps, base_lr=0.01, cos=True, schedule=[],
                      warmup_epochs=0.0, amp="none", print_freq=1000, global_batch=16,
                      dist=DistInfo(device=DEVICE))
    model(*views)  # first forward: MoCo reads its queue pointer once
    counts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, batches, lambda v, e, s: [v], opt, torch.amp.GradScaler("cuda", enabled=False), 0,
                            0, ctx, lambda done, meters: counts.append(len(caught)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = [b - a for a, b in zip(counts, counts[1:])][:-1]  # steps 1..4: no printing
    # The step's one intended wait, the fused check's Event.synchronize(), is not reported by sync
    # debug mode: any warning is an unintended synchronisation (.item(), a copy to the host, ...).
    assert per_step and all(n == 0 for n in per_step), (per_step, [str(w.message)[:120] for w in caught][:6])


# ---------------------------------------------------------------------------------------------- compile
# Optional (gpu_check's last part, `-k compile`): a cold torch.compile takes a minute.


@pytest.mark.skipif(not ON_GPU, reason="compiling on the CPU takes minutes (tests/test_augment_step.py covers it)")
def test_compiled_networks_train_like_eager_ones():
    torch.manual_seed(0)
    model = build_model("simclr", "resnet18", dim=32, hidden_dim=64).to(DEVICE)
    compiled = copy.deepcopy(model)
    reason = compile_networks(compiled, DEVICE)
    assert reason is None, reason
    x1, x2 = torch.randn(2, 16, 3, 32, 32, device=DEVICE)
    eager, fast = model(x1, x2), compiled(x1, x2)
    fast.backward()
    assert fast.item() == pytest.approx(eager.item(), rel=1e-3)
    assert set(dict(compiled.named_parameters())) == set(dict(model.named_parameters()))


@pytest.mark.skipif(not ON_GPU, reason="compiling on the CPU takes minutes (tests/test_augment_step.py covers the fallback)")
def test_pretraining_with_compile_on_the_device(folder, tmp_path):
    out = ok(run_script(["main_pretrain.py", str(folder), "--method", "byol", *TINY, "--compile", "--amp", "bf16",
                         "--device", str(DEVICE), "--output-dir", str(tmp_path / "run")], **ENV))
    assert "--compile: networks compiled" in out and "--compile skipped" not in out
    assert load(tmp_path / "run" / "checkpoint.pth.tar")["global_step"] == 3
