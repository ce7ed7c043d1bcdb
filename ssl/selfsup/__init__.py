"""selfsup: MoCo v1/v2, BYOL and SimCLR with exact distributed semantics.

Modules: builder (the models), losses, distributed (process-group helpers), loader (augmentation
presets), data (datasets), optim (LARS and schedules), checkpoint, meters.
"""

__version__ = "0.1.0"

from .builder import BYOL, MoCo, SimCLR, build_model  # noqa: F401
