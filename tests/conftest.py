"""Test setup: this tree's sources first on sys.path, few threads, quiet logs."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tests exercise this checkout's code even where another copy is pip-installed.
sys.path.insert(0, str(REPO / "ssl"))
sys.path.insert(0, str(REPO))  # the entry scripts (main_pretrain.py, ...)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def repo() -> Path:
    return REPO
