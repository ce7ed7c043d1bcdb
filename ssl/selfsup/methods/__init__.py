"""The self-supervised methods, one module each, behind one protocol (`base.Method`): each module
holds the whole method - its defaults, options, recipes, demo settings, linear-evaluation
protocol, what defines its run, its loss and its momentum schedule."""

from .base import Method, MomentumMethod, check_complete, protocol_problems
from .byol import BYOL
from .dino import DINO
from .moco import MoCo
from .mocov3 import MoCoV3
from .simclr import SimCLR

# name -> class; the order is the one --method lists. A new method: its module and one entry here.
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (MoCo, BYOL, SimCLR, MoCoV3, DINO)}

check_complete(METHODS)  # a method missing a piece fails here, not later with another method's value

__all__ = ["BYOL", "DINO", "METHODS", "Method", "MoCo", "MoCoV3", "MomentumMethod", "SimCLR", "check_complete", "protocol_problems"]
