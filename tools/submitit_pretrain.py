#!/usr/bin/env python
r"""Submit main_pretrain.py to a SLURM cluster through submitit: one task per GPU, requeued on
pre-emption and time-outs, resuming bit for bit from its step checkpoint.

    python tools/submitit_pretrain.py --nodes 2 --ngpus 8 --partition gpu --timeout 4320 \
        --job-dir /shared/runs/mocov2 --preset mocov2 --save-every-steps 500 /imagenet
    python tools/submitit_pretrain.py --cluster local --nodes 1 --ngpus 2 -a resnet18 ...  # this machine

The launcher's flags come first (--help lists them), every main_pretrain.py flag after them.
Needs submitit (pip install submitit); selfsup/slurm.py holds the launcher, shared with
tools/submitit_lincls.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root, for _bootstrap
import _bootstrap  # noqa: E402,F401  (a plain clone finds selfsup in its ssl/)

import main_pretrain  # noqa: E402
from selfsup.slurm import submit  # noqa: E402

if __name__ == "__main__":
    sys.exit(submit(main_pretrain, sys.argv[1:]))
