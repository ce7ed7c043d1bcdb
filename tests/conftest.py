"""Test setup: this tree's sources first on sys.path, few threads, quiet logs."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tests exercise this checkout's code even where another copy is pip-installed.
sys.path.insert(0, str(REPO / "ssl"))
sys.path.insert(0, str(REPO))  # the entry scripts (main_pretrain.py, ...)
sys.path.insert(0, str(REPO / "tests"))  # helpers
from helpers import THREADS  # noqa: E402

# The same thread count here as in every process the tests start (helpers.THREADS), whatever
# the shell's OMP_NUM_THREADS: results compared bit for bit must come from one thread count.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)

import torch  # noqa: E402

torch.set_num_threads(THREADS)


@pytest.fixture
def repo() -> Path:
    return REPO
