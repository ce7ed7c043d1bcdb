"""The training step of selfsup.engine: what it reads back from the device."""

import numpy as np
import pytest
import torch
from helpers import TINY_OPTIONS
from selfsup.distributed import DistInfo
from selfsup.engine import StepContext, progress_line, train_one_epoch
from selfsup.methods import METHODS
from test_builder import tiny_encoder

# Every way a tensor's value reaches the host; on a GPU each one makes the host wait for it.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
MODELS = {name: (lambda cls=cls: cls(tiny_encoder, dim=8, **TINY_OPTIONS[cls.name])) for name, cls in METHODS.items()}


def fake_loader(steps, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        views = [torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)]
        # skipped as numpy: the loader's count is a host value already, not a device read
        yield views, torch.zeros(n, dtype=torch.long), np.zeros(n, dtype=np.int64)


def context(method, steps, print_freq=1000, n=4):
    return StepContext(epochs=1, steps_per_epoch=steps, base_lr=0.05, cos=True, schedule=[],
                       warmup_epochs=0.0, amp="none",
                       print_freq=print_freq, global_batch=n, dist=DistInfo())


@pytest.mark.parametrize("method", list(MODELS))
def test_a_step_reads_one_value_from_the_device(method, monkeypatch):
    torch.manual_seed(0)
    model = MODELS[method]()
    model(*next(fake_loader(1))[0])  # the first forward pass may read once (MoCo's queue pointer)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    per_step = []
    after = lambda steps_done, meters: per_step.append(len(reads))  # noqa: E731
    steps = 6
    train_one_epoch(model, fake_loader(steps), lambda v, e, s: [v], optimizer,
                    torch.amp.GradScaler("cpu", enabled=False), 0, 0, context(method, steps), after)
    monkeypatch.undo()
    counts = np.diff([0, *per_step]).tolist()
    # Steps 1..4 neither print nor end the epoch: the fused check (non-finite loss, stop request,
    # skipped files, summed over processes) is their one read. Step 0 also prints its meters.
    assert counts[1:-1] == [1] * (steps - 2), (counts, reads)


def test_the_progress_line_reports_totals_and_the_time_left():
    ctx = context("moco", steps=100)
    ctx.epochs, ctx.global_batch = 3, 32
    # 10 steps of 32 images in 4 s (1 s of it waiting for data), now at step 19 of epoch 1
    line = progress_line(ctx, 1, 19, 6.5, 6.75, 0.03, steps_done=10, elapsed=4.0, data_time=1.0)
    assert line.startswith("Epoch: [1][ 19/100]  loss 6.5000 (avg 6.7500)  lr 0.03")
    assert "80.0 img/s" in line  # 320 images / 4 s, not a mean of per-step rates
    assert "data 25%" in line
    # 0.4 s a step: 80 steps left in the epoch (32 s), 80 + 100 in the run (72 s)
    assert "eta 0:00:32 (run 0:01:12)" in line
