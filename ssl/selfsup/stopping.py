"""Why a run stops before its end, and how it stops cleanly.

* `StopRequest`: Ctrl-C (SIGINT), SIGTERM, SIGUSR1 and SIGUSR2 (SLURM's warning before a time
  limit or pre-emption, with `--signal=USR1@120`; submitit asks for USR2) become a flag the
  training loop checks at step boundaries, so it can write a checkpoint and exit with the
  shell's status for that signal (`exit_status`: 130 for Ctrl-C, 143 for SIGTERM).
  A second Ctrl-C stops at once (KeyboardInterrupt; the scripts report it in one line). The
  loop calls `checkpoint_written()` the moment the stop's checkpoint is on disk, so that a
  launcher can act before the run tears down (selfsup.slurm requeues the job there).
* `ignore_stop_signals`: the loader workers leave those signals to the main process.
* `NonFiniteLossError`: the loss became NaN or infinite; raised before the step that would
  spread it into the weights.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the step that would spread it."""


class StopRequest:
    """Turns Ctrl-C (SIGINT), SIGTERM, SIGUSR1 and SIGUSR2 (SLURM's warnings) into a flag checked
    at step boundaries, so the run can write a checkpoint and exit cleanly. A second Ctrl-C raises
    KeyboardInterrupt at once. `announce` (rank 0) says on stderr what the first Ctrl-C does.
    `signum` is the first signal received and `at` its time.monotonic(): a launcher that passes
    its own StopRequest in learns why and when the run stopped, and `on_checkpoint` is called by
    `checkpoint_written` (tools/submitit_pretrain.py requeues the job there on submitit's signal)."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")

    def __init__(self, announce: bool = True, on_checkpoint: Callable[[], None] | None = None) -> None:
        self.signum: int | None = None
        self.at: float | None = None
        self.announce = announce
        self.on_checkpoint = on_checkpoint
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None and signum == signal.SIGINT and self.announce:
            # os.write, not print or logging: safe inside a signal handler
            os.write(2, b"\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)\n")
        if self.signum is None:  # `at` first: another thread that sees `signum` finds `at` set
            self.at = time.monotonic()
            self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def checkpoint_written(self) -> None:
        """The training loop's call the moment the stop's checkpoint is on disk (written, fsynced,
        renamed), before its log line, the metrics' close and the process group's teardown: runs
        `on_checkpoint`, which must not wait for those (a requeue that did could come too late)."""
        if self.requested and self.on_checkpoint is not None:
            self.on_checkpoint()


def exit_status(signum: int) -> int:
    """The exit status of a run a signal stopped: 128 + its number, as a shell reports a process
    that signal ended (130 for Ctrl-C, 143 for SIGTERM), so that `train && evaluate` stops there."""
    return 128 + int(signum)


def signal_name(signum: int | None) -> str:
    """'Ctrl-C (SIGINT)', 'SIGTERM', ... for a log line."""
    if signum is None:
        return "no signal"
    name = signal.Signals(signum).name
    return "Ctrl-C (SIGINT)" if name == "SIGINT" else name


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave Ctrl-C, SIGTERM, SIGUSR1 and SIGUSR2 to the main process.

    Pre-emption signals often reach the whole process group (SLURM, torchrun's shutdown). A
    worker killed by one makes the main process fail at once; ignoring them lets the main process
    finish its step and write a checkpoint. Workers still exit when the loader shuts down or the
    main process dies.
    """
    for name in StopRequest.SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
