"""The gates: when the API or the storage is unwell, the threads that use it back off together.

There is one gate per thing that can fail: the API (token and signed URLs) and the storage (the
PUTs). A service-side fault never fails a file. It moves the gate of the thing that failed one
backoff step further (one `retrying` log line per step, however many files are waiting) and the
calls to that thing wait at its gate until the step is over. Only a success of the same kind ends
the episode (`recovered`): a good signed-URL answer ends the API's, a stored PUT the storage's.
Were one success to end every episode, a storage outage would never back off past its first step
while the API kept answering (issue 11, item 4).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from ..logs import event
from ..metrics import Metrics
from ..settings import Settings
from .faults import Fault, backoff_seconds

log = logging.getLogger(__name__)

LABELS = {"api": "the API", "storage": "the storage"}


def gate_for(where: str) -> str:
    """Which thing a service fault belongs to: the PUT's to the storage, all else to the API."""
    return "storage" if where == "put" else "api"


class ServiceGate:
    """One thing's backoff, shared by the threads that call it; all methods are thread-safe."""

    def __init__(
        self,
        name: str,
        delay: Callable[[int], float],
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.label = LABELS.get(name, name)
        self._delay = delay
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()
        self._step = 0
        self._open_at = 0.0
        self.last_error: str | None = None
        self.failing_since: float | None = None

    def failing_since_epoch(self) -> float | None:
        """When the current outage began, as wall-clock time (for the status line)."""
        since = self.failing_since
        return None if since is None else time.time() - (self._clock() - since)

    def wait(self, stop: threading.Event) -> bool:
        """Block until the current backoff step is over; False when stopping."""
        while not stop.is_set():
            with self._lock:
                remaining = self._open_at - self._clock()
            if remaining <= 0:
                return True
            stop.wait(remaining)
        return False

    def remaining(self) -> float:
        """Seconds left of the current backoff step (0 when calls may go): for a thread that
        must not block on the gate."""
        with self._lock:
            return max(0.0, self._open_at - self._clock())

    def trouble(self, fault: Fault) -> float:
        """Record a service-side fault; returns the wait. Repeats within a step are folded."""
        if self._metrics is not None:
            self._metrics.retried(fault.where, fault.family)
        with self._lock:
            now = self._clock()
            if now < self._open_at:
                return self._open_at - now  # another thread already started this step
            self._step += 1
            delay = fault.retry_after if fault.retry_after is not None else self._delay(self._step)
            self._open_at = now + delay
            self.last_error = fault.reason
            if self.failing_since is None:
                self.failing_since = now
            step = self._step
        event(
            log,
            "retrying",
            level=logging.WARNING,
            what=self.name,
            reason=fault.reason,
            status=fault.status,
            attempt=step,
            seconds=round(delay, 2),
        )
        return delay

    def fine(self) -> None:
        """A call to this thing succeeded: its outage, if any, is over."""
        with self._lock:
            if self._step == 0:
                return
            since, self._step, self._open_at, self.failing_since = self.failing_since, 0, 0.0, None
            self.last_error = None
        down = self._clock() - since if since is not None else 0.0
        event(log, "recovered", what=self.name, seconds=round(down, 2))


class Gates:
    """The API's gate and the storage's, with the backoff settings they share (a reload changes
    `initial_seconds` / `max_seconds` for the next step of each, and of the finisher's moves)."""

    def __init__(
        self,
        initial_seconds: float,
        max_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self._jitter = jitter
        self.api = ServiceGate("api", self.delay, clock, metrics)
        self.storage = ServiceGate("storage", self.delay, clock, metrics)

    def reconfigure(self, settings: Settings) -> None:
        """A reload: the backoff settings apply from the next step of each gate on."""
        self.initial_seconds = settings.retry_initial_seconds
        self.max_seconds = settings.retry_max_seconds

    def delay(self, step: int) -> float:
        """The wait of a backoff step, with the current settings and a fresh jitter."""
        return backoff_seconds(step, self.initial_seconds, self.max_seconds, self._jitter())

    def trouble(self, fault: Fault) -> float:
        """A service-side fault: the gate of the thing that failed takes a step."""
        gate = self.storage if gate_for(fault.where) == "storage" else self.api
        return gate.trouble(fault)

    def outage(self) -> ServiceGate | None:
        """The gate failing the longest, for the status line and file; None when all is well."""
        failing = [g for g in (self.api, self.storage) if g.failing_since is not None]
        return min(failing, key=lambda g: g.failing_since or 0.0, default=None)
