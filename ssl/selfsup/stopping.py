"""Why a run stops before its end, and how it stops cleanly.

* `StopRequest`: SIGTERM and SIGUSR1 (SLURM's pre-emption warning) become a flag the training
  loop checks at step boundaries, so it can write a checkpoint and exit with status 0.
* `ignore_stop_signals`: the loader workers leave those signals to the main process.
* `NonFiniteLossError`: the loss became NaN or infinite; raised before the step that would
  spread it into the weights.
"""

from __future__ import annotations

import signal


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the step that would spread it."""


class StopRequest:
    """Turns SIGTERM / SIGUSR1 (SLURM's pre-emption warning) into a flag checked at step
    boundaries, so the run can write a checkpoint and exit cleanly."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None
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
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave SIGTERM/SIGUSR1 to the main process.

    Pre-emption signals often reach the whole process group (SLURM, torchrun's shutdown). A
    worker killed by one makes the main process fail at once; ignoring them lets the main process
    finish its step and write a checkpoint. Workers still exit when the loader shuts down or the
    main process dies.
    """
    for name in StopRequest.SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
