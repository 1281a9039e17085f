"""The service gate: when the API or the storage is unwell, every thread backs off together.

A service-side fault never fails a file. It moves the gate one backoff step further (one
`retrying` log line per step, however many files are waiting) and every network call waits at
the gate until the step is over. The first success closes the episode (`recovered`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from .faults import Fault, backoff_seconds
from .logs import event
from .metrics import Metrics

log = logging.getLogger(__name__)


class ServiceGate:
    """Shared by the dispatcher and the PUT workers; all methods are thread-safe."""

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
        self._clock = clock
        self._jitter = jitter
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

    def trouble(self, fault: Fault) -> float:
        """Record a service-side fault; returns the wait. Repeats within a step are folded."""
        if self._metrics is not None:
            self._metrics.retried(fault.where, fault.family)
        with self._lock:
            now = self._clock()
            if now < self._open_at:
                return self._open_at - now  # another thread already started this step
            self._step += 1
            if fault.retry_after is not None:
                delay = fault.retry_after
            else:
                delay = backoff_seconds(
                    self._step, self.initial_seconds, self.max_seconds, self._jitter()
                )
            self._open_at = now + delay
            self.last_error = fault.reason
            if self.failing_since is None:
                self.failing_since = now
            step = self._step
        event(
            log,
            "retrying",
            level=logging.WARNING,
            reason=fault.reason,
            status=fault.status,
            attempt=step,
            seconds=round(delay, 2),
        )
        return delay

    def fine(self) -> None:
        """A call to the service succeeded: the outage, if any, is over."""
        with self._lock:
            if self._step == 0:
                return
            since, self._step, self._open_at, self.failing_since = self.failing_since, 0, 0.0, None
            self.last_error = None
        down = self._clock() - since if since is not None else 0.0
        event(log, "recovered", seconds=round(down, 2))
