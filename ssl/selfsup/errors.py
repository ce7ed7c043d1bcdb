"""The errors that mean bad input, which every part of the project may raise and every entry
script reports as one line (exit status 2) instead of a traceback."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input found before training (a flag, a folder, a checkpoint of another run); the message
    names the problem and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the fix."""


# What setup raises on bad input: reported as one line, exit status 2 (never a traceback).
INPUT_ERRORS = (ValueError, CheckpointError, FileNotFoundError, NotADirectoryError)
