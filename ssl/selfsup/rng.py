"""Random streams: seeds derived from positions, seeded blocks, and the generators' states.

Exact resume needs every random draw of a step to be a function of (seed, epoch, step, sample)
alone - not of how many loader workers ran or how far their generators had advanced. So seeds
are hashed from those numbers (`mix_seed`): the sampler gives each sample its seed, the per-image
augmentation runs in a `seeded` block, and the batched augmentation of a step draws from
`augment_generator`. What is left in the processes' global generators is saved with every
checkpoint (`gather_rng_states`) and restored on resume.
"""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

from .distributed import all_gather_objects

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 finaliser over the sequence); deterministic
    across processes and Python versions, unlike hash() of strings."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's CPU generator and Python's for a block, then restore them.

    torchvision's v1 transforms draw from these two, so a sample's augmentation becomes a function
    of its seed. Restoring keeps the caller's random streams untouched (this runs in the main
    process when num_workers=0). Nothing else is touched: `torch.manual_seed` would also reseed
    every CUDA generator (or, before CUDA starts, queue that reseed for when it does), and with
    loading in the main process the GPU's stream - MoCo's batch shuffle and BN-split permutations
    draw from it - would restart at every sample.
    """
    cpu = torch.default_generator
    torch_state, py_state = cpu.get_state(), random.getstate()
    cpu.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        cpu.set_state(torch_state)
        random.setstate(py_state)


def augment_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one step's device-side augmentation: a function of (seed, epoch,
    step, rank) only, so a resumed run draws exactly the same parameters."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, step, rank, 2))


@contextlib.contextmanager
def preserved():
    """A block that leaves this process's random generators (torch CPU and CUDA, numpy, Python)
    as it found them: an evaluation during training must not move the training's streams, or
    a resumed run - whose checkpoint was written before the evaluation - would drift."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


class CudaGenerators:
    """The CUDA generator this process draws from: the one of its current device.

    Each process saves and restores only its own device's generator (with the layout it saw), not
    every visible GPU's: where each process sees all 8 GPUs, rank r draws on device r, while under
    SLURM each process often sees one GPU as device 0. An object, so tests can stand in a layout."""

    def available(self) -> bool:
        return torch.cuda.is_available()

    def in_use(self) -> int | None:
        """This process's CUDA device index, or None while CUDA has not started (nothing drawn)."""
        return torch.cuda.current_device() if self.available() and torch.cuda.is_initialized() else None

    def current(self) -> int:
        """The device this process draws on (starts CUDA)."""
        return torch.cuda.current_device()

    def visible(self) -> int:
        return torch.cuda.device_count()

    def get_state(self, index: int) -> torch.Tensor:
        return torch.cuda.get_rng_state(index)

    def set_state(self, state: torch.Tensor, index: int) -> None:
        torch.cuda.set_rng_state(state, index)


CUDA = CudaGenerators()


def capture_rng_state(cuda: CudaGenerators = CUDA) -> dict:
    """This process's random generators as plain types (loadable with weights_only=True): torch's
    CPU generator, Python's, numpy's and - once CUDA has started - its own device's, with the
    device layout it was drawn on (`cuda_device`: index and number of visible GPUs)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    index = cuda.in_use()
    if index is not None:
        state["cuda"] = cuda.get_state(index)
        state["cuda_device"] = {"index": index, "visible": cuda.visible()}
    return state


def gather_rng_states(streams: "MicroStreams | None" = None) -> list[dict]:
    """Every process's `capture_rng_state()`, in rank order (a collective on every process), so
    rank 0 can store them all in one checkpoint. With `streams` (--accum-iter K) each process
    gives its K micro-batches' streams: the list is then in the order of the W x K processes the
    run stands for, as such a run would save it."""
    mine = streams.captures() if streams is not None else [capture_rng_state()]
    return [state for states in all_gather_objects(mine) for state in states]


class MicroStreams:
    """The random streams of a process's K micro-batches (--accum-iter K): micro-batch j draws from
    the stream process r*K + j of a run of W x K processes would draw from, so that what a method
    draws inside a step (MoCo's shuffle-BN permutations, DINO's drop path) is the same for any
    split of the virtual processes into real ones.

    Every process of a run seeds its generators alike before building the model, so at the start
    all K streams equal the live one. Stream 0 is the process's live generators; `slot(j)` swaps
    stream j in for a block (torch's CPU generator and, once CUDA has started, this process's CUDA
    generator: the ones a model's operations draw from). `captures()` and `restore()` carry all K
    through a checkpoint (gather_rng_states)."""

    def __init__(self, k: int, cuda: CudaGenerators = CUDA) -> None:
        self.k, self.cuda = k, cuda
        self._states = [None] + [self._capture() for _ in range(1, k)]
        self._active: int | None = None

    def _capture(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        index = self.cuda.in_use()
        if index is not None:
            state["cuda"] = self.cuda.get_state(index)
        return state

    def _set(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        index = self.cuda.in_use()
        if index is not None and state.get("cuda") is not None:
            self.cuda.set_state(state["cuda"], index)

    @contextlib.contextmanager
    def slot(self, j: int):
        """A block that draws from micro-batch j's stream (stream 0: the live generators as they are)."""
        if j == 0:
            yield
            return
        if self._active is not None:  # a nested slot would save and restore the wrong stream
            raise RuntimeError(f"micro-batch {j}'s random stream entered inside micro-batch {self._active}'s")
        self._active = j
        live = self._capture()
        self._set(self._states[j])
        try:
            yield
        finally:
            self._states[j] = self._capture()
            self._set(live)
            self._active = None

    def captures(self) -> list[dict]:
        """The K streams as `capture_rng_state()` would give them in K processes."""
        live = capture_rng_state(self.cuda)
        return [live] + [{**live, **state} for state in self._states[1:]]

    def restore(self, states: list[dict]) -> None:
        """Set the K streams from `captures()`'s output (the live generators from the first)."""
        restore_rng_state(states[0], self.cuda)
        self._states = [None] + [{k: v for k, v in state.items() if k in ("torch", "cuda")} for state in states[1:]]


def restore_rng_state(state: dict, cuda: CudaGenerators = CUDA) -> None:
    """Set this process's generators from `capture_rng_state()`'s output. The saved CUDA stream
    goes to this process's device; where the device layout differs from the saving process's (another
    GPU visibility, e.g. 8 GPUs per process then 1 under SLURM) a warning names both layouts."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    saved = state.get("cuda")
    if saved is None or not cuda.available():
        return
    index = cuda.in_use()
    if index is None:  # CUDA not started yet: the device this process will draw on
        index = cuda.current()
    if isinstance(saved, torch.Tensor):
        layout = state.get("cuda_device", {})
        if (layout.get("index"), layout.get("visible")) != (index, cuda.visible()):
            logger.warning("checkpoint written by a process on CUDA device %s of %s visible, this process is on "
                           "device %d of %d: its CUDA random stream continues on this device (bitwise only on the "
                           "same kind of GPU)", layout.get("index"), layout.get("visible"), index, cuda.visible())
        cuda.set_state(saved, index)
        return
    # A checkpoint that holds every visible GPU's generator (a list): this device's, when it has one.
    if len(saved) != cuda.visible() or index >= len(saved):
        logger.warning("checkpoint holds the CUDA generators of %d visible GPU(s), this process sees %d and draws on "
                       "device %d: %s", len(saved), cuda.visible(), index,
                       "restoring that device's" if index < len(saved) else "its CUDA random stream restarts "
                       "(resume is not bitwise)")
    if index < len(saved):
        cuda.set_state(saved[index], index)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
