"""Stage 2, stabilise: a noticed file becomes work only once it has stopped changing.

Stable means the file's (size, mtime_ns, ctime_ns), and its identity (dev, inode), stayed the same
for `settle_seconds`, observed by two `lstat` calls at least that far apart. ctime is in the key
because a copy that preserves the original mtime would otherwise look finished at once, and one
event is never trusted: scanners close and reopen between pages, `mv` across filesystems is a copy.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..disk.folders import kind_of
from ..heartbeats import IDLE_WAKE_SECONDS
from ..items import Item, Snapshot, Spot
from ..logs import event
from ..settings import Settings
from .markers import Markers
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

# Files looked at per step: a backlog of 100,000 that settles at once flows out in slices, so the
# first uploads start while the rest are still being checked.
STEP_LIMIT = 500


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file being watched for stability: its last snapshot and since when it has not changed."""

    spot: Spot
    snapshot: Snapshot
    since: float


def observe(previous: Candidate | None, spot: Spot, snapshot: Snapshot, now: float) -> Candidate:
    """The candidate after one more look: the clock restarts whenever the snapshot differs."""
    if previous is not None and previous.snapshot == snapshot:
        return previous
    return Candidate(spot, snapshot, now)


def is_stable(candidate: Candidate, now: float, settle_seconds: float) -> bool:
    return now - candidate.since >= settle_seconds


class Stabiliser:
    """Holds noticed files until they are stable, then puts them on the work queue.

    `notice` is called from any thread (the watchdog dispatcher, the rescan, an uploader handing
    back a file that changed, the work queue freeing a name) and only records the spot. Everything
    else happens on the stabiliser's own thread in `step`, which stats a file when it is noticed
    and again when its settle time is up: two `lstat` calls per file, whatever the backlog.
    """

    def __init__(
        self,
        settle_seconds: float,
        queue: WorkQueue,
        clock: Callable[[], float],
        lstat: Callable[[Path], os.stat_result] = os.lstat,
        markers: Markers | None = None,
        idle_wake_seconds: float = IDLE_WAKE_SECONDS,
    ) -> None:
        """`markers`: with `ready_marker` set, a stable file waits there for its marker."""
        self.settle_seconds = settle_seconds
        self._idle_wake_seconds = idle_wake_seconds
        self.markers = markers
        self._lstat = lstat  # the drop folder's, through its folders' descriptors
        self._queue = queue
        self._clock = clock
        self._noticed: dict[Path, Spot] = {}
        self._looking: dict[Path, Spot] = {}  # taken from _noticed by the step under way
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._candidates: dict[Path, Candidate] = {}
        # The count breaks ties (files noticed in one step share a due time) before the paths
        # would: comparing two Paths costs more than the rest of a push.
        self._due: list[tuple[float, int, Path]] = []
        self._order = itertools.count()
        self._skipped: set[Path] = set()

    def reconfigure(self, settings: Settings) -> None:
        """A reload: settle_seconds applies to each file from its next look on."""
        self.settle_seconds = settings.settle_seconds

    def notice(self, spots: Iterable[Spot]) -> None:
        with self._lock:
            self._noticed.update((spot.path, spot) for spot in spots)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def __len__(self) -> int:
        """Files settling, counting those noticed but not yet looked at (not those waiting for
        their ready marker: a rescan notices them again, but they are not settling)."""
        with self._lock:
            unseen = self._noticed.keys() | self._looking.keys()
        if self.markers is not None:
            unseen = {path for path in unseen if path not in self.markers}
        # Only membership tests on _candidates: the stabiliser's thread changes it without a lock.
        return len(self._candidates) + sum(1 for path in unseen if path not in self._candidates)

    def oldest(self) -> float | None:
        """Monotonic time since which the longest-settling file has been watched."""
        return min((c.since for c in list(self._candidates.values())), default=None)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            timeout = self.step(self._clock())
            self._wake.wait(timeout)
            self._wake.clear()

    def step(self, now: float) -> float:
        """Look at new notices and at files whose settle time is up; seconds until the next."""
        with self._lock:
            self._looking, self._noticed = self._noticed, {}
            marks = self._take_markers()
            # A name still held on the queue (a rescan finds every waiting file again): the notice
            # waits there for the name's release, counted by the queue rather than here.
            for spot in self._queue.park(list(self._looking.values())):
                del self._looking[spot.path]
        if self.markers is not None:  # their files, looked at through the park on the next turn
            held, lone = self.markers.due(now)
            again = held + self.markers.seen(marks + lone, now)
            if again:
                self.notice(again)
        spots = dict(self._looking)
        looked = 0
        while self._due and self._due[0][0] <= now and looked < STEP_LIMIT:
            looked += 1
            _, _, path = heapq.heappop(self._due)
            candidate = self._candidates.get(path)
            if candidate is not None and candidate.since + self.settle_seconds <= now:
                spots.setdefault(path, candidate.spot)
        items = [item for spot in spots.values() if (item := self._look(spot, now)) is not None]
        if items:  # together, so that files that settled together share a batch
            self._queue.put_many(items)
        # A file leaves len() only now that it is on the queue: counted nowhere for a moment, a
        # main loop that saw nothing waiting would go back to its slow, quiet turns.
        for item in items:
            self._candidates.pop(item.path, None)
        with self._lock:
            self._looking = {}
        waits = [self._due[0][0] - now] if self._due else [self._idle_wake_seconds]
        if self.markers is not None and (marker_wait := self.markers.next_look(now)) is not None:
            waits.append(marker_wait)
        return max(0.0, min(waits))

    def _take_markers(self) -> list[Spot]:
        """Under the lock: the notices that are ready markers, taken out (never uploaded)."""
        if self.markers is None:
            return []
        marks = [spot for spot in self._looking.values() if self.markers.is_marker(spot)]
        for spot in marks:
            del self._looking[spot.path]
        return marks

    def _look(self, spot: Spot, now: float) -> Item | None:
        """Stat one file; the item when it has just become stable. A file waiting for its
        ready marker stays held (and counted so) while it is looked at again, and leaves the
        held ones only if it does not go back: released first, it showed for a moment as
        settling, not waiting for its marker, to a status written meanwhile."""
        previous = self._candidates.get(spot.path)
        held = False
        if previous is None and self.markers is not None:
            previous = self.markers.get(spot.path)
            held = previous is not None
        item, kept = self._examine(spot, previous, held, now)
        if held and not kept and self.markers is not None:
            self.markers.release(spot.path)
        return item

    def _examine(
        self, spot: Spot, previous: Candidate | None, held: bool, now: float
    ) -> tuple[Item | None, bool]:
        """The item when the file has just become stable; and whether it is held (again)."""
        try:
            st = self._lstat(spot.path)
        except FileNotFoundError:
            if self._candidates.pop(spot.path, None) is not None or held:
                event(log, "vanished", file=spot.rel, reason="removed before it was uploaded")
            return None, False
        except OSError as exc:  # its folder not searchable, a name too long...: the next scan
            self._skip_once(spot, f"cannot look at it: {exc.strerror}")
            return None, False
        kind = kind_of(st.st_mode)
        if kind != "file":
            self._skip_once(spot, f"a {kind}, not a regular file")
            return None, False
        self._skipped.discard(spot.path)
        candidate = observe(previous, spot, Snapshot.of(st), now)
        if is_stable(candidate, now, self.settle_seconds):
            marker = None
            if self.markers is not None:
                marker = self.markers.present(spot)
                if marker is None:
                    self._hold(self.markers, candidate, now, held)
                    return None, True
            # DEBUG: at INFO a file's whole life is one line (uploaded, failed, skipped...)
            event(
                log,
                "queued",
                level=logging.DEBUG,
                file=spot.rel,
                type=spot.file_type,
                bytes=st.st_size,
            )
            return Item(spot, candidate.snapshot, noticed_at=candidate.since, marker=marker), False
        self._candidates[spot.path] = candidate
        if candidate is not previous:
            due = candidate.since + self.settle_seconds
            heapq.heappush(self._due, (due, next(self._order), spot.path))
        return None, False

    def _hold(self, markers: Markers, candidate: Candidate, now: float, again: bool) -> None:
        """A stable file without its ready marker waits for it, out of the settling count."""
        self._candidates.pop(candidate.spot.path, None)
        markers.hold(candidate, now)
        if not again:
            event(
                log,
                "waiting_for_marker",
                level=logging.DEBUG,
                file=candidate.spot.rel,
                marker=candidate.spot.name + markers.suffix,
            )

    def _skip_once(self, spot: Spot, reason: str) -> None:
        self._candidates.pop(spot.path, None)
        if spot.path not in self._skipped:
            self._skipped.add(spot.path)
            event(log, "skipped", file=spot.rel, reason=reason)
