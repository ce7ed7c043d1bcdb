"""The self-supervised methods, one module each, behind one protocol (`base.Method`)."""

from .base import Method, MomentumMethod
from .byol import BYOL
from .moco import MoCo
from .simclr import SimCLR

# name -> class; the order is the one --method lists.
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (MoCo, BYOL, SimCLR)}

__all__ = ["BYOL", "METHODS", "Method", "MoCo", "MomentumMethod", "SimCLR"]
