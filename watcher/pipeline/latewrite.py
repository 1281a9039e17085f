"""Late writes (`late_write_seconds`, on by default): a file that grows after its upload goes again.

A producer that pauses longer than `settle_seconds` gets half its file uploaded, and then keeps
writing through its open descriptor, into the file now in done/. So each file moved into done/
is watched for `late_write_seconds`: if its size, mtime or ctime differ from the version that
was uploaded, `late_write` is logged (WARNING), the file must settle again (the stabiliser's
rule), and it is uploaded again from done/, where it stays, under the name and type it was
uploaded under; the finisher writes a second receipt with `late_write: true`.

Cheap at any backlog: inotify on done/ and its type folders hears only writes and removals
(donewatch.py; the daemon's own moves in are not asked for), and a stat of every recent name
every `sweep_seconds` is the safety net (network mounts, a lost event). Entries expire after the
window, and at most MAX_RECENT are kept (the oldest go first): nothing grows with done/. A file
removed or replaced in done/ is forgotten; a restart forgets the window. A file that keeps
changing is sent again at most MAX_AGAIN times, once per settle.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..disk.folders import CHECK_SECONDS, Folders
from ..heartbeats import IDLE_WAKE_SECONDS, Heartbeat
from ..items import Item, Snapshot, Spot, display
from ..logs import event
from ..metrics import Metrics
from ..remote.body import Opener
from ..settings import Settings
from .donewatch import DoneEvents
from .inotify import WATCH_LIMIT
from .latelook import Look, Recent, compare, first_look
from .stability import Candidate, is_stable, observe
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

MAX_RECENT = 10_000  # names watched at once (about 1 KiB each); beyond, the oldest go early
MAX_AGAIN = 5  # uploads again per file; a file still changing after that is said, not sent


def from_settings(
    settings: Settings,
    done_dir: Path,
    work: WorkQueue,
    clock: Callable[[], float],
    metrics: Metrics,
    idle_wake_seconds: float = IDLE_WAKE_SECONDS,
    folder_check_seconds: float = CHECK_SECONDS,
) -> LateWrites | None:
    """The watch on done/, None when `late_write_seconds` is 0. Its safety-net stat runs every
    `rescan_seconds`, or every `poll_interval_seconds` with `polling` (no events from NFS)."""
    if not settings.late_write_seconds:
        return None
    return LateWrites(
        done_dir,
        settings.late_write_seconds,
        settings.settle_seconds,
        sweep_seconds(settings),
        work,
        clock,
        metrics.late_write,
        idle_wake_seconds,
        folder_check_seconds,
    )


def sweep_seconds(settings: Settings) -> float:
    """How often every recent name is stat-ed: with `polling` (a network mount, whose other
    clients' writes send no inotify event) as often as the drop folder is polled."""
    return settings.poll_interval_seconds if settings.polling else settings.rescan_seconds


class LateWrites:
    """`placed` is called from the finisher's thread, `handed_back` from the uploader's;
    `step` is the late-write thread (the service's `late_writes`)."""

    def __init__(
        self,
        done_dir: Path,
        window_seconds: float,
        settle_seconds: float,
        sweep_seconds: float,
        work: WorkQueue,
        clock: Callable[[], float] = time.monotonic,
        counted: Callable[[], None] = lambda: None,
        idle_wake_seconds: float = IDLE_WAKE_SECONDS,
        folder_check_seconds: float = CHECK_SECONDS,
    ) -> None:
        """`sweep_seconds`: how often every recent name is stat-ed (the safety net);
        `counted`: told of each late write (the metrics)."""
        # stat and open through descriptors, like drop/
        self.folders = Folders(done_dir, check_seconds=folder_check_seconds)
        self._idle_wake_seconds = idle_wake_seconds
        self.window_seconds = window_seconds
        self.settle_seconds = settle_seconds
        self.sweep_seconds = sweep_seconds
        self._work = work
        self._clock = clock
        self._counted = counted
        self._events = DoneEvents()
        self._lock = threading.Lock()
        self._arrived: list[tuple[Item, Path, bool]] = []  # from the finisher
        self._handed: list[str] = []  # from the uploader: changed during the upload again
        # By the path in done/ as text (a str caches its hash, a Path does not).
        self._recent: dict[str, Recent] = {}  # in the order they arrived: oldest first
        self._settling: dict[str, tuple[Recent, Candidate]] = {}
        self._queued: dict[str, Recent] = {}  # on the work queue, to be sent again
        self._next_sweep = clock() + sweep_seconds
        self._said: set[str] = set()  # folders that cannot be watched, said once
        self._full_said = False

    # -- other threads -----------------------------------------------------------------------

    def placed(self, done: Iterable[tuple[Item, Path, bool]]) -> None:
        """The finisher moved (or, for a late one, uploaded again) these files: watch them."""
        with self._lock:
            self._arrived.extend(done)
        self._events.wake()

    def handed_back(self, spots: Iterable[Spot]) -> None:
        """A file sent again changed during its upload: it settles again."""
        with self._lock:
            self._handed.extend(os.fspath(spot.path) for spot in spots)
        self._events.wake()

    def owns(self, path: Path) -> bool:
        return os.fspath(path).startswith(f"{self.folders.root}{os.sep}")

    def opener(self, other: Opener) -> Opener:
        """The PUT's open: a file in done/ (sent again) through done/'s descriptors."""

        def open_file(path: Path, flags: int) -> int:
            return (self.folders.open if self.owns(path) else other)(path, flags)

        return open_file

    def reconfigure(self, settings: Settings) -> None:
        """A reload: the settle rule and the safety net's period (the window needs a restart)."""
        self.settle_seconds = settings.settle_seconds
        self.sweep_seconds = sweep_seconds(settings)
        self._next_sweep = 0.0  # a shorter period applies now, not after the old one ran out
        self.wake()

    def wake(self) -> None:
        self._events.wake()

    def close(self) -> None:
        """At a stop, once the late-write thread has ended: a late write not sent again yet is
        said (a restart forgets the window, so Productiv keeps the first version for good)."""
        self._events.close()
        with self._lock:
            arrived, self._arrived = self._arrived, []
        changed = []  # moved during the stop's drain, and already written to since the upload
        for item, final, uploaded in arrived:
            if item.late:  # sent again during the stop's drain
                self._queued.pop(os.fspath(final), None)
            elif uploaded and (moved := self._stat(final)) is not None:
                base, look = first_look(item.snapshot, moved)
                if look is Look.CHANGED:
                    changed.append(Recent(final, item.spot, base, 0.0))
        for recent in [
            *self._queued.values(),
            *(r for r, _ in self._settling.values()),
            *changed,
        ]:
            reason = (
                "written to after its upload and not sent again before the stop: Productiv"
                " holds the earlier version; drop the complete file again"
            )
            self._say("late_write_abandoned", logging.ERROR, recent, reason=reason, uploaded=True)
        self.folders.close()

    def __len__(self) -> int:
        return len(self._recent) + len(self._settling) + len(self._queued)

    # -- the late-write thread ---------------------------------------------------------------

    def step(self, stop: threading.Event, beat: Heartbeat) -> None:
        beat.idle()
        written, lost = self._events.wait(self._timeout(self._clock()))
        if stop.is_set():
            return
        beat.busy()
        now = self._clock()
        with self._lock:
            arrived, self._arrived = self._arrived, []
            handed, self._handed = self._handed, []
        # Written to before its watch began: no event will tell, so it is looked at now.
        looks = {key for i, f, up in arrived if (key := self._arrive(i, f, up, now)) is not None}
        for path in handed:
            recent = self._queued.pop(path, None)
            if recent is not None:
                self._settle(recent, now)
        self._expire(now)
        looks.update(path for path in written if path in self._recent or path in self._settling)
        if lost or now >= self._next_sweep:
            self._next_sweep = now + self.sweep_seconds
            looks.update(self._recent)
            self._forget_gone_queued()
        looks.update(
            path
            for path, (_, candidate) in self._settling.items()
            if candidate.since + self.settle_seconds <= now
        )
        for path in looks:
            self._look(path, now)

    def _timeout(self, now: float) -> float:
        waits = [self._idle_wake_seconds]
        if self._recent or self._queued:
            waits.append(self._next_sweep - now)
        waits += [c.since + self.settle_seconds - now for _, c in self._settling.values()]
        return max(0.0, min(waits))

    def _arrive(self, item: Item, final: Path, uploaded: bool, now: float) -> str | None:
        """A file moved into done/ (or sent again from there): its baseline, from one stat
        taken once it is watched; its key when it has changed already."""
        key, again = os.fspath(final), 0
        if item.late:
            queued = self._queued.pop(key, None)
            again = queued.again + 1 if queued is not None else MAX_AGAIN
        if not uploaded:
            return None  # failed/ is nobody's upload; a late one refused stays in done/
        self._watch(key.rpartition(os.sep)[0])
        try:
            moved = Snapshot.of(self.folders.lstat(final))
        except OSError:
            return None  # gone already
        if key in self._recent:
            del self._recent[key]  # to the end: the newest
        base, look = first_look(item.snapshot, moved)
        self._recent[key] = Recent(final, item.spot, base, now + self.window_seconds, again)
        if len(self._recent) > MAX_RECENT:
            del self._recent[next(iter(self._recent))]
            if not self._full_said:
                self._full_said = True
                event(
                    log,
                    "late_write_window_full",
                    f"more than {MAX_RECENT} files moved within late_write_seconds: the oldest"
                    " leave the late-write watch early",
                )
        return key if look is Look.CHANGED else None

    def _watch(self, folder: str) -> None:
        problem = self._events.add(folder)
        if problem in (0, errno.ENOSYS, errno.ENOENT) or folder in self._said:
            return
        self._said.add(folder)
        why = WATCH_LIMIT if problem == errno.ENOSPC else os.strerror(problem)
        event(
            log,
            "watch_failed",
            level=logging.ERROR,
            folder=self._relative(Path(folder)),
            reason=f"cannot watch this folder: {why}; late writes in it are found by a stat"
            f" every {self.sweep_seconds:g} s",
        )

    def _expire(self, now: float) -> None:
        while self._recent:
            oldest = next(iter(self._recent.values()))
            if oldest.until > now:
                return
            del self._recent[os.fspath(oldest.path)]

    def _stat(self, path: Path) -> Snapshot | None:
        try:
            return Snapshot.of(self.folders.lstat(path))
        except OSError:
            return None

    def _look(self, path: str, now: float) -> None:
        recent = self._recent.get(path)
        if recent is not None:
            verdict = compare(recent.base, self._stat(recent.path))
            if verdict is Look.GONE:
                del self._recent[path]
            elif verdict is Look.CHANGED:
                del self._recent[path]
                self._changed(recent, now)
            return
        if path in self._settling:
            recent, previous = self._settling[path]
            snapshot = self._stat(recent.path)
            if snapshot is None or compare(recent.base, snapshot) is Look.GONE:
                del self._settling[path]
                return
            candidate = observe(previous, previous.spot, snapshot, now)
            if not is_stable(candidate, now, self.settle_seconds):
                self._settling[path] = (recent, candidate)
                return
            del self._settling[path]
            self._queued[path] = recent
            item = Item(recent.late_spot(), snapshot, noticed_at=candidate.since, late=True)
            self._work.put_many([item])

    def _changed(self, recent: Recent, now: float) -> None:
        """Said once per change; then the file settles and goes again, or is given up."""
        if recent.again >= MAX_AGAIN:
            reason = (
                f"changed again after {MAX_AGAIN} uploads again: not sent again; drop the"
                " complete file again, or have its producer use a ready marker"
            )
            self._say("late_write_given_up", logging.ERROR, recent, reason=reason)
            return
        self._counted()
        self._say("late_write", logging.WARNING, recent, uploaded=True)
        self._settle(recent, now)

    def _say(
        self, name: str, level: int, recent: Recent, reason: str = "", uploaded: bool = False
    ) -> None:
        """One line about a late-written file: its name, where it is in done/, its size now
        (and the size uploaded, the reason)."""
        snapshot = self._stat(recent.path)
        fields: dict[str, Any] = {
            "file": recent.spot.rel,
            "moved_to": self._relative(recent.path),
        }
        if uploaded:
            fields["bytes_uploaded"] = recent.base.size
        fields["bytes_now"] = snapshot.size if snapshot is not None else None
        if reason:
            fields["reason"] = reason
        event(log, name, level=level, **fields)

    def _settle(self, recent: Recent, now: float) -> None:
        snapshot = self._stat(recent.path)
        if snapshot is not None:
            candidate = Candidate(recent.late_spot(), snapshot, now)
            self._settling[os.fspath(recent.path)] = (recent, candidate)

    def _forget_gone_queued(self) -> None:
        """A file sent again that vanished during its upload never comes back here."""
        for key in [k for k, r in self._queued.items() if self._stat(r.path) is None]:
            del self._queued[key]

    def _relative(self, path: Path) -> str:
        root = self.folders.root
        text = os.fspath(path)
        prefix = f"{root}{os.sep}"
        if text == os.fspath(root):
            return display(root.name)
        return display(f"{root.name}/{text[len(prefix) :]}" if text.startswith(prefix) else text)
