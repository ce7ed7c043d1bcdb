"""Run main_pretrain.py with one injected fault (tests only).

    FAULT=kill:N   the process (rank FAULT_RANK, default all) dies abruptly (os._exit(137), like
                   SIGKILL) right after global step N, once: FAULT_MARKER names a file that
                   records that the fault already fired, so a restarted group runs clean.
    FAULT=nan:N    the loss of global step N (1-based) becomes NaN on rank FAULT_RANK.
Everything else on the command line goes to main_pretrain.py unchanged.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ssl"))

from selfsup import engine  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402

import main_pretrain  # noqa: E402

kind, n = os.environ["FAULT"].split(":")
n = int(n)
rank = int(os.environ.get("RANK", "0"))
target_rank = os.environ.get("FAULT_RANK")
here = target_rank is None or int(target_rank) == rank
marker = os.environ.get("FAULT_MARKER")

_train_one_epoch = engine.train_one_epoch


def train_one_epoch(model, loader, make_views, optimizer, scaler, epoch, start_step, ctx, after_step=None,
                    meter_state=None):
    def hook(steps_done, meters):
        if after_step is not None:
            after_step(steps_done, meters)
        done = epoch * ctx.steps_per_epoch + steps_done
        if kind == "kill" and here and done == n and not (marker and Path(marker).exists()):
            if marker:
                Path(marker).write_text(f"killed rank {rank} after global step {n}\n")
            sys.stdout.flush()
            os._exit(137)

    return _train_one_epoch(model, loader, make_views, optimizer, scaler, epoch, start_step, ctx, hook, meter_state)


engine.train_one_epoch = train_one_epoch  # what engine.fit calls

if kind == "nan":
    calls = {"n": 0}

    def with_nan(objective):
        def objective_with_nan(self, views, plan, j):
            out, loss = objective(self, views, plan, j)
            if j == 0:  # an optimizer step
                calls["n"] += 1
            if here and calls["n"] == n:
                return out * float("nan"), loss * float("nan")
            return out, loss

        return objective_with_nan

    for method in METHODS.values():
        method.objective = with_nan(method.objective)

if __name__ == "__main__":
    sys.exit(main_pretrain.cli(sys.argv[1:]))
