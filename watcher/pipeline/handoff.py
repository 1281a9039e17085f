"""The hand-over of tickets from the dispatcher thread to the transfer thread, a batch at a time.

A bounded queue, as `queue.Queue(maxsize=depth)` would be, with one difference that the burst
measures: the dispatcher hands over a whole batch once it fits, so it is woken once per batch,
not once for every ticket the transfer thread takes (each thread wake costs 0.1-0.35 ms of CPU
on the 2-core bench machine, and a burst of small files takes hundreds of tickets a second).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """At most `depth` items wait (a batch larger than that goes alone); thread-safe."""

    def __init__(self, depth: int) -> None:
        self._depth = depth
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # the dispatcher waits here
        self._filled = threading.Condition(self._lock)  # the transfer thread waits here
        self._wanted = 0  # the size of the batch the dispatcher waits to put, 0: none
        self._woken = False

    def put_all(self, items: list[T], timeout: float) -> bool:
        """Hand the whole batch over once it fits; False when it did not within `timeout`."""
        with self._lock:
            self._wanted = len(items)
            fits = self._room.wait_for(lambda: self._fits(len(items)), timeout)
            self._wanted = 0
            if fits:
                self._items.extend(items)
                self._filled.notify()
            return fits

    def get(self, timeout: float) -> T | None:
        """The next item, waiting up to `timeout`; None after the timeout or a `wake`."""
        with self._lock:
            self._filled.wait_for(lambda: self._items or self._woken, timeout)
            self._woken = False
            return self._take()

    def get_nowait(self) -> T | None:
        """The next item, None when none waits."""
        with self._lock:
            return self._take()

    def resize(self, depth: int) -> None:
        """A reload's new depth: a dispatcher waiting for room is told at once."""
        with self._lock:
            self._depth = depth
            self._room.notify()

    def wake(self) -> None:
        """End a `get` that waits (a stop, a reload)."""
        with self._lock:
            self._woken = True
            self._filled.notify()

    def _fits(self, n: int) -> bool:
        return not self._items or len(self._items) + n <= self._depth

    def _take(self) -> T | None:
        if not self._items:
            return None
        item = self._items.popleft()
        if self._wanted and self._fits(self._wanted):  # once per batch, not per item
            self._room.notify()
        return item
