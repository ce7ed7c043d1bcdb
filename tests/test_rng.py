"""Random generator states: each process saves and restores its own device's CUDA generator,
whatever GPU layout the checkpoint was written under (tested on the CPU with a stand-in layout)."""

import logging
import random

import numpy as np
import pytest
import torch
from selfsup.rng import CudaGenerators, capture_rng_state, restore_rng_state


class FakeCuda(CudaGenerators):
    """`visible` GPUs, this process on `index`; each generator's state is a distinct small tensor."""

    def __init__(self, index: int, visible: int) -> None:
        self.index, self.count = index, visible
        self.states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(visible)}

    def available(self) -> bool:
        return True

    def in_use(self):
        return self.index

    def current(self) -> int:
        return self.index

    def visible(self) -> int:
        return self.count

    def get_state(self, index):
        return self.states[index].clone()

    def set_state(self, state, index):
        if index >= self.count:
            raise IndexError(f"no CUDA device {index}")
        self.states[index] = state.clone()


def test_only_this_process_device_is_saved_with_its_layout():
    state = capture_rng_state(FakeCuda(index=3, visible=8))
    assert torch.equal(state["cuda"], torch.full((4,), 3, dtype=torch.uint8))
    assert state["cuda_device"] == {"index": 3, "visible": 8}


def test_the_same_layout_restores_the_stream_silently(caplog):
    state = capture_rng_state(FakeCuda(index=2, visible=4))
    later = FakeCuda(index=2, visible=4)
    later.states[2] = torch.zeros(4, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING):
        restore_rng_state(state, later)
    assert torch.equal(later.states[2], torch.full((4,), 2, dtype=torch.uint8)) and not caplog.records


@pytest.mark.parametrize("saved, now", [((5, 8), (0, 1)), ((0, 1), (5, 8))])
def test_another_gpu_visibility_continues_the_stream_on_this_device_and_says_so(saved, now, caplog):
    # 8 GPUs visible to every process (rank 5 on device 5), then one per process under SLURM - and back.
    state = capture_rng_state(FakeCuda(*saved))
    later = FakeCuda(*now)
    with caplog.at_level(logging.WARNING):
        restore_rng_state(state, later)
    assert torch.equal(later.states[now[0]], torch.full((4,), saved[0], dtype=torch.uint8))
    assert f"device {saved[0]} of {saved[1]} visible" in caplog.text and f"device {now[0]} of {now[1]}" in caplog.text


def test_a_checkpoint_holding_every_visible_gpu_generator_resumes_without_index_error(caplog):
    base = capture_rng_state(FakeCuda(0, 1))
    every = {**{k: v for k, v in base.items() if not k.startswith("cuda")},
             "cuda": [torch.full((4,), 10 + i, dtype=torch.uint8) for i in range(8)]}
    one = FakeCuda(index=0, visible=1)
    with caplog.at_level(logging.WARNING):
        restore_rng_state(every, one)  # set_rng_state_all of 8 states on 1 GPU raised IndexError
    assert torch.equal(one.states[0], torch.full((4,), 10, dtype=torch.uint8))
    assert "8 visible GPU(s)" in caplog.text
    few = {**every, "cuda": every["cuda"][:1]}
    many = FakeCuda(index=5, visible=8)
    restore_rng_state(few, many)
    assert "restarts" in caplog.text and torch.equal(many.states[5], torch.full((4,), 5, dtype=torch.uint8))


def test_cpu_python_and_numpy_streams_round_trip():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = capture_rng_state(FakeCuda(0, 1))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    restore_rng_state(state, FakeCuda(0, 1))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
