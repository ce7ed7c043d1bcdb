#!/usr/bin/env python
r"""Submit main_lincls.py (the linear evaluation) to a SLURM cluster through submitit: one task per
GPU, requeued on pre-emption and time-outs, resuming from its last epoch.

    python tools/submitit_lincls.py --nodes 1 --ngpus 8 --partition gpu --timeout 1440 \
        --pretrained /shared/runs/mocov2/checkpoint.pth.tar /imagenet

The launcher's flags come first (--help lists them), every main_lincls.py flag after them; the
job folder defaults to main_lincls.py's own output folder (next to the pretrained checkpoint).
Needs submitit (pip install submitit); selfsup/slurm.py holds the launcher, shared with
tools/submitit_pretrain.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

import main_lincls  # noqa: E402
from selfsup.slurm import submit  # noqa: E402

if __name__ == "__main__":
    sys.exit(submit(main_lincls, sys.argv[1:]))
