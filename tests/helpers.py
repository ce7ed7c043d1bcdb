"""Shared test utilities: real multi-process runs (gloo) and tiny generated image folders."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from selfsup.data import write_idx  # noqa: F401  (the tests' idx files)

REPO = Path(__file__).resolve().parents[1]

# Intra-op CPU threads of every process the tests start (and of pytest itself, see conftest.py).
# A run's floating-point result depends on it on some CPUs (oneDNN picks other kernels, and so
# other summation orders, for another thread count: seen on AVX-512 machines, not on AVX2 ones),
# so every comparison of runs must use one value, whatever OMP_NUM_THREADS the caller's shell has.
THREADS = 1


# The smallest options of each method, for the tests that build every method of METHODS: its
# constructor's keywords beyond `dim` (build_model(name, arch, dim=..., **TINY_OPTIONS[name])), and the
# same as main_pretrain.py flags (tiny_flags). tests/test_methods.py fails for a method without
# an entry here.
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "moco": {"K": 32, "mlp": True},
    "byol": {"hidden_dim": 32},
    "simclr": {"hidden_dim": 32},
    "mocov3": {"mlp_dim": 32, "T": 0.2},
    "dino": {"out_dim": 32},
}


def tiny_flags(method: str) -> list[str]:
    """TINY_OPTIONS[method] as main_pretrain.py flags, through the method's own flag names."""
    from selfsup.methods import METHODS

    flag_of = {keyword: flag for flag, keyword in METHODS[method].flag_options.items()}
    out: list[str] = []
    for keyword, value in TINY_OPTIONS[method].items():
        flag = "--" + flag_of[keyword].replace("_", "-")
        out += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, tmp_path: Path, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` real gloo processes; return each rank's
    result (whatever torch.save can store). `fn` must be a module-level function."""
    out = tmp_path / f"dist-{fn.__name__}"
    out.mkdir(exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, str(out))) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    errors = [(out / f"rank{r}.err").read_text() for r in range(world_size) if (out / f"rank{r}.err").exists()]
    if errors or any(p.exitcode != 0 for p in procs):
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors or [str([p.exitcode for p in procs])]))
    return [load_worker_result(out / f"rank{r}.pt") for r in range(world_size)]


def load_worker_result(path: Path) -> Any:
    """A worker's return value, loaded with weights_only=True: beyond torch's defaults only
    numpy's array and dtype types (detection results) are allowed."""
    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        module, _, attr = name.rpartition(".")
        if module.split(".")[0] != "numpy":
            raise AssertionError(f"{path} holds objects other than tensors and numpy arrays: {name}")
        allowed.append(getattr(importlib.import_module(module), attr))
    if allowed:  # arrays also rebuild their dtype's class, which the scan above does not list
        allowed += [np.dtype] + [t for t in vars(np.dtypes).values() if isinstance(t, type)]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def make_image_folder(root: Path, classes: int = 2, per_class: int = 8, size: int = 24, flat: bool = False,
                      seed: int = 0, ext: str = "png") -> Path:
    """Write a tiny ImageFolder of random-but-structured RGB images (class-dependent colour)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        folder = root if flat else root / f"class{c}"
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), dtype=np.float32)
            base[..., c % 3] = 160
            img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"c{c}_{i:03d}.{ext}")
    return root


def script_env(**extra: str) -> dict[str, str]:
    """Environment for running the entry scripts in a subprocess against this checkout, with
    THREADS intra-op threads (overriding the caller's OMP_NUM_THREADS: see THREADS)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "ssl") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS)
    env.update(extra)
    return env


def run_script(args: list[str], cwd: Path | None = None, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run a Python entry script of the repository; returns the completed process (no check)."""
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=script_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def torchrun(nproc: int, args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc` on CPU (gloo)."""
    return run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
                      timeout=timeout, **env)


def fake_fashion_mnist(root: Path, n_train: int = 160, n_test: int = 60, seed: int = 0) -> Path:
    """Fashion-MNIST's idx files (gzipped) holding 10 classes of 28 x 28 images that differ by
    where a bright bar lies, with noise: learnable in a few steps, separable from raw pixels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 3 : 2 * c + 7, 4:24] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root
