"""User-facing errors: the CLI prints them as one line and exits with code 2."""

import sys


def say_error(message: str) -> None:
    """The one line a UserError ends as (flushed: under torchrun the rank may be ended right after)."""
    print(f"error: {message}", file=sys.stderr, flush=True)


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, incompatible checkpoint).

    The message names the problem and the fix; the CLI prints ``error: <message>`` and exits 2.
    """


class SaidByRankZero(UserError):
    """Under torchrun, rank 0's error on every other rank: those exit with its code without repeating it."""


class DiskFull(UserError):
    """A write failed because the disk (or the user's quota) is full; what was written before is intact."""


class TrainingDiverged(UserError):
    """The training loss became non-finite: a setting to change (learning rate, precision), not a bug. Under
    torchrun every rank meets it at the same step (it is checked on all-reduced numbers), and rank 0 says it."""

    def __init__(self, message: str, step: int, tokens: int):
        super().__init__(message)
        self.step, self.tokens = step, tokens


class TrainingStopped(Exception):
    """SIGTERM ended a run before its budget: the last checkpoint is kept and the run is not finished (no
    summary), so callers stop too instead of treating a cut-short run as a result. The CLI exits 143."""
