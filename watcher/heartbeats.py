"""Is the pipeline healthy? Heartbeats of the upload threads, and the status line systemd shows.

systemd's watchdog restarts a service that stops pinging. The supervisor pings only while every
upload thread is either waiting by design (an empty queue, a backoff, free workers) or has shown
progress (a block of a file sent, a call answered) within the watchdog period: a PUT or an API
call that hangs past it means the process is wedged, and a restart is the cure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# How long a pipeline thread with nothing to do waits before it looks again. Work, and a stop,
# wake it at once; each needless wake costs about 0.35 ms of CPU on the 2-core build machine.
IDLE_WAKE_SECONDS = 30.0


class Heartbeat:
    """One thread's sign of life. Written by its thread, read by the supervisor (plain floats and
    bools: each assignment is atomic)."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._last = clock()
        self._waiting = True

    def busy(self) -> None:
        self._last = self._clock()
        self._waiting = False

    def progress(self) -> None:
        self._last = self._clock()

    def idle(self) -> None:
        self._last = self._clock()
        self._waiting = True

    def silent_for(self, now: float) -> float:
        """Seconds since the last sign of life, 0 while waiting by design."""
        return 0.0 if self._waiting else max(0.0, now - self._last)


def stuck(beats: Iterable[Heartbeat], now: float, period: float) -> str | None:
    """Why the upload threads look wedged, or None."""
    for beat in beats:
        silent = beat.silent_for(now)
        if silent > period:
            return f"{beat.name} has made no progress for {silent:.0f} s"
    return None


@dataclass(frozen=True, slots=True)
class Counts:
    waiting: int  # settling or queued
    uploading: int
    uploaded: int
    failed: int
    retrying_since: float | None = None  # epoch seconds
    last_error: str | None = None
    failing: str | None = None  # which thing: "the API" or "the storage"
    folders: tuple[str, ...] = ()  # folders that refuse moves, each with what to do
    unmarked: int = 0  # stable files waiting for their ready marker (not in `waiting`)


FOLDERS_SHOWN = 2  # a status line is one line: the rest are in the log and the status file


def status_line(counts: Counts) -> str:
    """What `systemctl status` shows: the numbers, the outage if there is one, and the folders
    that hold files back (a folder problem is not an outage, and never says so)."""
    line = (
        f"{counts.waiting} waiting, {counts.uploading} uploading, "
        f"{counts.uploaded} uploaded, {counts.failed} failed"
    )
    if counts.unmarked:
        line += f", {counts.unmarked} waiting for their ready marker"
    if counts.retrying_since is not None:
        since = time.strftime("%H:%M:%S", time.localtime(counts.retrying_since))
        which = f" ({counts.failing})" if counts.failing else ""
        line += f"; service unavailable since {since}{which}, retrying: {counts.last_error}"
    for text in counts.folders[:FOLDERS_SHOWN]:
        line += f"; files wait: {text}"
    if len(counts.folders) > FOLDERS_SHOWN:
        line += f"; and {len(counts.folders) - FOLDERS_SHOWN} more folder(s) not writable"
    return line
