"""The daemon's fixed turns, gathered so that tests can run them short.

These are not settings: an operator has no reason to change them, and each default is explained
where it is used. They are a parameter of `Service` (and `cli.main`) so that a test need not wait
out a 10-s turn to see what happens on the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..disk.folders import CHECK_SECONDS as FOLDER_CHECK_SECONDS
from ..heartbeats import IDLE_WAKE_SECONDS
from .instance import RETRY_SECONDS as STANDBY_RETRY_SECONDS

CHECK_SECONDS = 10.0  # how often the drop folder's identity (and the canary) is checked


@dataclass(frozen=True, slots=True)
class Timings:
    """`check_seconds`: the main loop's look at the drop folder, the canary and the lock, and
    its turn while quiet. `idle_wake_seconds`: a pipeline thread with nothing to do looks again.
    `folder_check_seconds`: a cached folder descriptor's name is checked again at most this
    often. `standby_retry_seconds`: a standby tries the drop folder's lock again."""

    check_seconds: float = CHECK_SECONDS
    idle_wake_seconds: float = IDLE_WAKE_SECONDS
    folder_check_seconds: float = FOLDER_CHECK_SECONDS
    standby_retry_seconds: float = STANDBY_RETRY_SECONDS


DEFAULT = Timings()  # the daemon's
