"""Stage 3, queue: stable files waiting for an upload slot, each path at most once.

The drop folder is the durable queue; this is only its in-memory index. A path stays "in" the
queue from `put` until `release`, through its upload, so that neither a rescan nor an event can
queue it twice. Items can be put back with a not-before time (a file-side retry). A notice for a
name still held here (a new file dropped under it, or a rescan) waits for that name's release.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from pathlib import Path

from ..items import Item, Spot


class WorkQueue:
    """Thread-safe; `take_batch` is called by the uploader's dispatcher thread only."""

    def __init__(self, clock: Callable[[], float], renotice: Callable[[list[Spot]], None]) -> None:
        self._clock = clock
        self._renotice = renotice  # back to the stabiliser: a parked notice, once its name is free
        self._parked: dict[Path, Spot] = {}
        self._heap: list[tuple[float, int, Item]] = []
        self._order = itertools.count()
        self._paths: set[Path] = set()  # queued or in flight
        self._changed = threading.Condition()
        self._closed = False

    def counts(self) -> tuple[int, int]:
        """(waiting in the queue, taken and not yet released)."""
        with self._changed:
            return len(self._heap), len(self._paths) - len(self._heap)

    def oldest(self) -> float | None:
        """When the longest-waiting queued file was first noticed (monotonic)."""
        with self._changed:
            return min((entry[2].noticed_at for entry in self._heap), default=None)

    def put_many(self, items: list[Item]) -> None:
        """Queue files; a path already queued or in flight is ignored."""
        with self._changed:
            for item in items:
                if item.path not in self._paths:
                    self._paths.add(item.path)
                    self._push(item, 0.0)

    def put_back(self, item: Item, not_before: float = 0.0) -> None:
        """Return a taken item (its path is still held) to wait for another try."""
        with self._changed:
            self._push(item, not_before)

    def _push(self, item: Item, not_before: float) -> None:
        heapq.heappush(self._heap, (not_before, next(self._order), item))
        self._changed.notify()

    def park(self, spots: list[Spot]) -> list[Spot]:
        """Hold the notices for names still queued or in flight until their release (a new file
        may take a name the moment the old one is moved out); those held."""
        with self._changed:
            held = [spot for spot in spots if spot.path in self._paths]
            self._parked.update((spot.path, spot) for spot in held)
        return held

    def release(self, path: Path) -> None:
        """The uploader is done with this path (moved, vanished, or handed back to settle)."""
        with self._changed:
            self._paths.discard(path)
            parked = self._parked.pop(path, None)
        if parked is not None:
            self._renotice([parked])

    def close(self) -> None:
        """Wake `take_batch` for good: the service is stopping."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def take_batch(self, limit: int, timeout: float | None = None) -> list[Item]:
        """Up to `limit` due items of one type with distinct names, as soon as one is due.

        Waits until at least one item is due, the timeout passes ([]), or the queue is closed ([]).
        Never waits to fill a batch: a lone file goes at once.
        """
        deadline = None if timeout is None else self._clock() + timeout
        with self._changed:
            while not self._closed:
                now = self._clock()
                if self._heap and self._heap[0][0] <= now:
                    return self._pick(limit, now)
                waits = [t - now for t in (deadline, self._heap[0][0] if self._heap else None) if t]
                if deadline is not None and now >= deadline:
                    return []
                self._changed.wait(min(waits) if waits else None)
            return []

    def _pick(self, limit: int, now: float) -> list[Item]:
        # Look at a bounded number of due entries so a mixed backlog costs O(limit log n).
        batch: list[Item] = []
        names: set[str] = set()
        passed_over: list[tuple[float, int, Item]] = []
        while self._heap and self._heap[0][0] <= now and len(batch) < limit:
            entry = heapq.heappop(self._heap)
            item = entry[2]
            same_type = not batch or item.spot.file_type == batch[0].spot.file_type
            if same_type and item.spot.name not in names:
                batch.append(item)
                names.add(item.spot.name)
            else:
                passed_over.append(entry)
                if len(passed_over) >= 4 * limit:
                    break
        for entry in passed_over:
            heapq.heappush(self._heap, entry)
        return batch
