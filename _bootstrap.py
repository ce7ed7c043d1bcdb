"""Lets a plain clone run wherever torch and torchvision are installed, as facebookresearch/moco does.

Every entry point imports this module first (`main_*.py` directly; `tools/` and `detection/` scripts
after putting the clone's root on `sys.path`). When `selfsup` is not importable - the project is
not pip-installed, as on a machine without pip - it puts this clone's source root `ssl/` first on
`sys.path`, and on `PYTHONPATH` so that the processes the scripts start (torchrun's workers, the
benchmark's runs of main_pretrain.py) find the same code. An installed `selfsup` is left alone.
"""

import importlib.util
import os
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent / "ssl"


def ensure_selfsup_importable() -> None:
    """Make `import selfsup` work, from this clone's ssl/ when no installed copy is found."""
    if importlib.util.find_spec("selfsup") is not None:
        return
    sys.path.insert(0, str(SOURCE_ROOT))
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *inherited])


ensure_selfsup_importable()
