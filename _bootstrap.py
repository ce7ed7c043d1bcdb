"""Lets a plain clone run wherever torch and torchvision are installed, as facebookresearch/moco does.

Every entry point imports this module first (`main_*.py` directly; `tools/` and `detection/` scripts
after putting the clone's root on `sys.path`). When `selfsup` is not importable from this clone - the project is
not pip-installed, as on a machine without pip, or installed from another clone - it puts this
clone's source root `ssl/` first on `sys.path`, and on `PYTHONPATH` so that the processes the
scripts start (torchrun's workers, the benchmark's runs of main_pretrain.py) find the same code.
"""

import importlib.util
import os
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent / "ssl"


def ensure_selfsup_importable() -> None:
    """Make `import selfsup` find this clone's ssl/: not installed, or installed from elsewhere
    (another clone, an older copy), a script runs the code of the clone it belongs to."""
    spec = importlib.util.find_spec("selfsup")
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(SOURCE_ROOT):
        return
    sys.path.insert(0, str(SOURCE_ROOT))
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *inherited])


ensure_selfsup_importable()
