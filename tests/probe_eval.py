"""Run main_pretrain.py and record what each process evaluates with (tests only).

At every online kNN evaluation, each process saves the BatchNorm running statistics of the
encoder it evaluates to PROBE_DIR/rank<RANK>_<n>.pt (n counts the evaluations). Everything on
the command line goes to main_pretrain.py unchanged.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ssl"))

import torch  # noqa: E402
from selfsup import monitor  # noqa: E402

import main_pretrain  # noqa: E402

_evaluate = monitor.KNNMonitor.__call__
_count = {"n": 0}


def probed(self, encoder):
    stats = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    torch.save(stats, Path(os.environ["PROBE_DIR"]) / f"rank{os.environ.get('RANK', '0')}_{_count['n']}.pt")
    _count["n"] += 1
    return _evaluate(self, encoder)


monitor.KNNMonitor.__call__ = probed

if __name__ == "__main__":
    sys.exit(main_pretrain.cli(sys.argv[1:]))
