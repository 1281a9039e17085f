"""Stage 1, watch: turn filesystem events and periodic scans of the drop folder into noticed spots.

Events are hints, never facts: the handler runs on watchdog's single dispatcher thread under the
observer's lock, so it only maps the path to a `Spot` and hands it on (the stabiliser decides).
A full scan runs at start (after the observer, so nothing falls between) and every
`rescan_seconds`, because inotify drops events on overflow without a word and network mounts
send none.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from ..disk.folders import LOCK_NAME, Folders
from ..items import Identity, Spot, display
from ..logs import event
from ..settings import FILE_TYPES, ConfigError
from . import inotify
from .deafness import CANARY_NAME, Canary, Hung, StatProbe

log = logging.getLogger(__name__)

OWN_NAMES = (CANARY_NAME, LOCK_NAME)  # the daemon's own files in the drop folder

# Created, closed after writing, moved in. Not modified: a write storm would cost an event per
# write() for nothing, since the stabiliser compares snapshots settle_seconds apart anyway. Not
# opened or closed-without-writing: those are our own reads. With inotify the kernel does not even
# queue the rest (see `inotify.observer`); moves come from the polling observer.
_WANTED = [FileCreatedEvent, FileClosedEvent, FileMovedEvent]
_ROOT_GONE = [DirDeletedEvent, DirMovedEvent]  # the drop folder itself (inotify's *_SELF events)


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    """Basename matching (watchdog 7's own patterns match whole paths)."""
    return _ignoring(tuple(patterns)).match(name) is not None


@functools.lru_cache(maxsize=8)
def _ignoring(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """The patterns as one expression, each as fnmatchcase translates it: one match per name,
    not one per pattern (4.2 -> 0.6 us a name with the default ten; every event, every scan)."""
    return re.compile("|".join(fnmatch.translate(pattern) for pattern in patterns) or "(?!)")


def locate(
    path: str, drop_dir: str, default_type: str | None, ignore: Iterable[str]
) -> Spot | None:
    """The spot for a path in the drop folder, or None when it is not ours to upload.

    Files directly in drop_dir get `default_type`; files in drop_dir/users|contracts|other get
    that type. Anything deeper, in another subfolder, outside, or with an ignored name is None,
    and so is a type folder's own name: whatever it is (a folder, a file `cp`-ed to `drop/users`
    before the folder existed), it is never a file to upload (`Folders` says why, once).
    """
    rel = os.path.relpath(path, drop_dir)
    parts = rel.split(os.sep)
    if rel.startswith(os.pardir) or parts == ["."] or is_ignored(parts[-1], ignore):
        return None
    if len(parts) == 1 and (parts[0] in OWN_NAMES or parts[0] in FILE_TYPES):
        return None  # ours, whatever ignore_patterns say
    if len(parts) == 1:
        return Spot(Path(path), display(rel), parts[0], default_type)
    if len(parts) == 2 and parts[0] in FILE_TYPES:
        return Spot(Path(path), display("/".join(parts)), parts[1], parts[0])
    return None


class _Handler(FileSystemEventHandler):
    """Enqueue-only; an exception here would kill watchdog's dispatcher thread for good."""

    def __init__(
        self,
        root: str,
        to_spot: Callable[[str], Spot | None],
        sink: Callable[[list[Spot]], None],
        root_gone: Callable[[], None],
        canary_seen: Callable[[], None],
        rescan: Callable[[str], None],
    ) -> None:
        self._root = root
        self._to_spot = to_spot
        self._sink = sink
        self._root_gone = root_gone
        self._canary = os.path.join(root, CANARY_NAME)
        self._canary_seen = canary_seen
        self._rescan = rescan
        self._type_names = {os.path.join(root, t) for t in FILE_TYPES}

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, tuple(_ROOT_GONE)) and os.fsdecode(event.src_path) == self._root:
            self._root_gone()  # the main loop's next check re-attaches
            return
        if os.fsdecode(event.src_path) == self._canary:
            self._canary_seen()
            return
        if event.is_directory or not isinstance(event, tuple(_WANTED)):
            return
        try:
            path = event.dest_path if isinstance(event, FileMovedEvent) else event.src_path
            if os.fsdecode(path) in self._type_names:  # `cp a.csv drop/users`: say so soon
                self._rescan("a type folder's name was taken by something else")
                return
            spot = self._to_spot(os.fsdecode(path))
            if spot is not None:
                self._sink([spot])
        except Exception:  # deliberately swallowed: the rescan is the safety net
            log.exception("could not handle %s", event.event_type, extra={"event": "watch_error"})


class Watcher:
    """The observer on the drop folder plus the full scan; both feed `sink`."""

    def __init__(
        self,
        drop_dir: Path,
        default_type: str | None,
        ignore: tuple[str, ...],
        sink: Callable[[list[Spot]], None],
        polling: bool = False,
        poll_interval_seconds: float = 2.0,
        canary_seconds: float | None = None,
        stat_fn: Callable[[Path], os.stat_result] = os.stat,
        stat_timeout: float = 5.0,
        folders: Folders | None = None,
        wake: Callable[[], None] = lambda: None,
        listing: Callable[[Path, OSError | None], None] = lambda folder, error: None,
    ) -> None:
        """`listing`: told after each scan of a folder whether it could be listed."""
        self.drop_dir = drop_dir
        self.listing = listing
        self.folders = folders or Folders(drop_dir)  # scanned through descriptors, like the rest
        self._wake = wake  # the main loop, which scans when `rescan_due` says so
        self._rescan_reason: str | None = None
        self._default_type = default_type
        self._ignore = ignore
        self._sink = sink
        self._polling = polling
        self._poll_interval = poll_interval_seconds
        self._observer: BaseObserver | None = None
        self._stopped: list[BaseObserver] = []
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the watched folder
        self._root_gone = False  # set from the dispatcher thread: the watched inode went away
        self._probe = StatProbe(drop_dir, stat_timeout, stat_fn)
        self._canary = Canary(drop_dir, canary_seconds, time.monotonic) if canary_seconds else None
        self.deaf_reason: str | None = None  # why the watch cannot be trusted now (status)

    def to_spot(self, path: str) -> Spot | None:
        return locate(path, str(self.drop_dir), self._default_type, self._ignore)

    def start(self) -> None:
        """Watch the drop folder (called once at start; `check` re-attaches later)."""
        identity = self._probe.identity()
        self._identity = None if isinstance(identity, Hung) else identity
        self._start_observer()

    def check(self) -> None:
        """Called by the main loop: notice a drop folder that was removed, replaced, remounted
        or hangs, an observer thread that died or a canary that went unheard, say so once, and
        watch again (with a full scan, which finds what arrived meanwhile) once it is back."""
        identity = self._probe.identity()
        if isinstance(identity, Hung):
            self._lose("does not answer (a dead network mount?)")
            return
        if identity is None:
            self._lose("is gone")
            return
        if self._identity is not None:
            if identity != self._identity:
                self._lose("was replaced or remounted")
            elif not self.alive():
                self._lose("lost its observer thread")
            elif self._root_gone:
                self._lose("was removed")
            elif self._canary is not None and not self._canary.tick():
                event(
                    log,
                    "watch_deaf",
                    level=logging.ERROR,
                    reason="no event came for the canary file: the folder stopped sending events",
                )
                self._lose("stopped sending events")
            else:
                return
        self._reattach(identity)

    def _lose(self, why: str) -> None:
        """Stop trusting the observer, once per episode (until the folder is back)."""
        if self._identity is not None or self._observer is not None:
            event(log, "watch_lost", level=logging.WARNING, reason=f"the drop folder {why}")
            self.deaf_reason = f"the drop folder {why}"
            self.stop()
            self._observer = None
            self._identity = None

    def _reattach(self, identity: Identity) -> None:
        try:
            self._root_gone = False
            self._start_observer()
        except ConfigError as exc:
            event(log, "watch_lost", level=logging.ERROR, reason=str(exc))
            return
        self._identity = identity
        self.deaf_reason = None
        event(log, "watch_restored", drop_dir=str(self.drop_dir), waiting=self.scan())

    def _mark_root_gone(self) -> None:
        self._root_gone = True

    def _canary_seen(self) -> None:
        if self._canary is not None:
            self._canary.seen()

    def rescan_due(self) -> bool:
        """For the main loop: True once after the watch lost events (an inotify queue overflow)
        or a type folder's name was taken; the scan it then runs finds what was missed."""
        reason, self._rescan_reason = self._rescan_reason, None
        if reason is not None:
            event(log, "rescan", level=logging.WARNING, reason=reason)
        return reason is not None

    def _want_rescan(self, reason: str) -> None:
        """From watchdog's threads: only a flag and a wake-up (never a scan on their thread)."""
        self._rescan_reason = reason
        self._wake()

    def _overflowed(self) -> None:
        self._want_rescan("the kernel's inotify queue overflowed: events were lost")

    def _start_observer(self) -> None:
        try:  # an inotify observer takes an inotify instance (and starts its reader) as it is made
            observer = (
                PollingObserver(timeout=self._poll_interval)
                if self._polling
                else inotify.observer(self._overflowed)
            )
        except OSError as exc:
            raise self._cannot_watch(exc) from None
        observer.name = "observer"
        handler = _Handler(
            str(self.drop_dir),
            self.to_spot,
            self._sink,
            self._mark_root_gone,
            self._canary_seen,
            self._want_rescan,
        )
        observer.schedule(
            handler, str(self.drop_dir), recursive=True, event_filter=[*_WANTED, *_ROOT_GONE]
        )
        try:
            observer.start()
        except OSError as exc:
            with contextlib.suppress(OSError):
                observer.stop()  # and with it that reader, which would be left behind
            raise self._cannot_watch(exc) from None
        self._observer = observer

    def _cannot_watch(self, exc: OSError) -> ConfigError:
        if exc.errno == errno.ENOSPC:
            return ConfigError(f"cannot watch the drop folder: {inotify.WATCH_LIMIT}")
        return ConfigError(f"cannot watch drop_dir {self.drop_dir}: {exc.strerror}")

    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        """Stop watching at once; `join` waits for watchdog's threads to end."""
        if self._observer is not None:
            self._stopped.append(self._observer)
            with contextlib.suppress(OSError):  # the folder may be gone already
                self._observer.stop()

    def join(self, timeout: float) -> None:
        if self._canary is not None:
            self._canary.remove()
        for observer in self._stopped:
            observer.join(timeout)

    def scan(self) -> int:
        """Notice every entry of the drop folder and its type folders; the count noticed.

        Through the folders' descriptors: a type folder that is not a real folder is refused
        (said once), never listed. Called from the main loop only."""
        noticed: list[Spot] = []
        for sub in ("", *FILE_TYPES):
            try:
                names = self.folders.scandir(sub)
            except FileNotFoundError:
                if not sub:
                    log.warning(
                        "drop folder %s is missing", self.drop_dir, extra={"event": "scan_failed"}
                    )
                continue  # a type folder that does not exist (or is refused: said once)
            except PermissionError as exc:
                self.listing(self.drop_dir / sub, exc)  # said once, with its fix
                continue
            except OSError as exc:
                folder = self.drop_dir / sub
                log.warning(
                    "cannot list %s: %s", folder, exc.strerror, extra={"event": "scan_failed"}
                )
                continue
            folder = self.drop_dir / sub
            self.listing(folder, None)
            noticed.extend(spot for name in names if (spot := self.to_spot(str(folder / name))))
        self._sink(noticed)  # at once, so files that settle together share a batch
        return len(noticed)
