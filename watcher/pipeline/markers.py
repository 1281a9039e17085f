"""Ready markers (`ready_marker`, opt-in): a file goes only once its producer says it is complete.

With `ready_marker = ".done"`, a file `NAME` in the drop folder (or a type folder) is uploaded
only once `NAME.done` exists beside it; the settle rule still applies to `NAME`. The marker is
never uploaded, and is removed once its file is in done/ or failed/ (the signal is consumed).

The stabiliser asks three things, all on its own thread: is this notice a marker (then its file
is looked at again), is this stable file's marker there (else the file is held here), and which
held files and lone markers are due for another look. Held files and lone markers are looked
at again every `rescan_seconds` (two stats each), never in a loop; a marker's own event brings
its file at once. Everything goes through the drop folder's descriptors (folders.py).
"""

from __future__ import annotations

import heapq
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..disk.folders import Folders
from ..items import Identity, Spot, display
from ..logs import event
from ..settings import Settings
from .watching import OWN_NAMES, locate

if TYPE_CHECKING:
    from .stability import Candidate

log = logging.getLogger(__name__)

ORPHAN_RESCANS = 10  # a marker alone this many rescan periods is said once
ORPHAN_REASON = "a ready marker without its file"


def marked_name(name: str, suffix: str) -> str | None:
    """The name of the file a marker stands for (`a.csv` for `a.csv.done`), or None when
    `name` is no marker: markers off, another suffix, or nothing before the suffix."""
    if not suffix or not name.endswith(suffix) or len(name) == len(suffix):
        return None
    return name[: -len(suffix)]


def counts_as_marker(name: str, mode: int) -> bool:
    """Is this entry beside a file its marker? Not a folder (it could never be removed, so it
    would stand for every later file of that name), nor one of the daemon's own files (the
    drop folder's lock: removing it would let a second daemon in)."""
    return name not in OWN_NAMES and not stat.S_ISDIR(mode)


def orphan_due(since: float, now: float, rescan_seconds: float) -> bool:
    """Has a marker been alone long enough to be said (`rescan_seconds` x 10)?"""
    return now - since >= ORPHAN_RESCANS * rescan_seconds


@dataclass(slots=True)
class Orphan:
    spot: Spot  # the marker's
    since: float
    said: bool = False


def from_settings(settings: Settings, folders: Folders) -> Markers | None:
    """The marker rule for the drop folder `folders` serves, None when `ready_marker` is off."""
    if not settings.ready_marker:
        return None
    drop, file_type, ignore = str(folders.root), settings.file_type, settings.ignore_patterns
    return Markers(
        settings.ready_marker,
        folders,
        lambda path: locate(path, drop, file_type, ignore),
        settings.rescan_seconds,
    )


class Markers:
    """The marker rule for one drop folder. `hold`, `seen` and `due` are the stabiliser's
    thread's; `waiting` is read by the main loop (status, metrics); `consume` by the finisher's
    hook after a move."""

    def __init__(
        self,
        suffix: str,
        folders: Folders,
        locate: Callable[[str], Spot | None],
        rescan_seconds: float,
    ) -> None:
        """`locate`: the watcher's rule for a path (ignored names, type folders)."""
        self.suffix = suffix
        self.rescan_seconds = rescan_seconds
        self._folders = folders
        self._locate = locate
        self._lock = threading.Lock()  # _held is read by the main loop
        self._held: dict[Path, Candidate] = {}  # stable files waiting for their marker
        self._orphans: dict[Path, Orphan] = {}
        self._next_look = 0.0

    def reconfigure(self, settings: Settings) -> None:
        """A reload: held files and lone markers are looked at on the new rescan period."""
        self.rescan_seconds = settings.rescan_seconds
        self._next_look = 0.0  # a shorter period applies now, not after the old one ran out

    def is_marker(self, spot: Spot) -> bool:
        return marked_name(spot.name, self.suffix) is not None

    def file_of(self, marker: Spot) -> Spot | None:
        """The spot of the file a marker stands for; None when that name is not ours to upload
        (an ignored name, a type folder's name)."""
        name = marked_name(marker.name, self.suffix)
        if name is None:
            return None
        return self._locate(str(marker.path.with_name(name)))

    def present(self, spot: Spot) -> Identity | None:
        """The identity of this file's marker, None when there is none (or it cannot be seen)."""
        name = spot.name + self.suffix
        try:
            st = self._folders.lstat(spot.path.with_name(name))
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if counts_as_marker(name, st.st_mode) else None

    # -- held files ----------------------------------------------------------------------------

    def hold(self, candidate: Candidate, now: float) -> None:
        with self._lock:
            self._held[candidate.spot.path] = candidate
        if len(self._held) == 1 and not self._orphans:
            self._next_look = now + self.rescan_seconds

    def get(self, path: Path) -> Candidate | None:
        """The candidate of a held file, which stays held."""
        return self._held.get(path)

    def release(self, path: Path) -> None:
        """A held file that went on (or is gone): no longer held here."""
        with self._lock:
            self._held.pop(path, None)

    def waiting(self, most: int) -> list[Candidate]:
        """The `most` files waiting longest for their marker (for status)."""
        with self._lock:
            held = list(self._held.values())
        return heapq.nsmallest(most, held, key=lambda h: h.since)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, path: Path) -> bool:
        return path in self._held

    # -- markers noticed ---------------------------------------------------------------------

    def seen(self, markers: list[Spot], now: float) -> list[Spot]:
        """The files to look at for these marker notices; a marker whose file is not there is
        kept, and said once (`skipped`) when alone for `rescan_seconds` x 10."""
        files = []
        for marker in markers:
            spot = self.file_of(marker)
            if spot is None:
                self._orphans.pop(marker.path, None)
                continue
            try:
                self._folders.lstat(spot.path)
            except FileNotFoundError:
                self._alone(marker, now)
                continue
            except OSError:
                pass  # the stabiliser's own look says why
            self._orphans.pop(marker.path, None)
            files.append(spot)
        return files

    def _alone(self, marker: Spot, now: float) -> None:
        if not self._orphans and not self._held:
            self._next_look = now + self.rescan_seconds
        orphan = self._orphans.setdefault(marker.path, Orphan(marker, now))
        if not orphan.said and orphan_due(orphan.since, now, self.rescan_seconds):
            orphan.said = True
            event(log, "skipped", file=marker.rel, reason=ORPHAN_REASON)

    def due(self, now: float) -> tuple[list[Spot], list[Spot]]:
        """Every `rescan_seconds`: (held files, lone markers still there) to look at again. A
        marker that went is forgotten; one whose file came is looked at through `seen`."""
        if now < self._next_look or not (self._held or self._orphans):
            return [], []
        self._next_look = now + self.rescan_seconds
        with self._lock:
            files = [held.spot for held in self._held.values()]
        markers = []
        for path, orphan in list(self._orphans.items()):
            try:
                self._folders.lstat(path)
            except OSError:
                del self._orphans[path]
                continue
            markers.append(orphan.spot)
        return files, markers

    def next_look(self, now: float) -> float | None:
        """Seconds until `due` has something, None when nothing waits."""
        if not (self._held or self._orphans):
            return None
        return max(0.0, self._next_look - now)

    # -- after the move ------------------------------------------------------------------------

    def consume(self, spot: Spot, marker: Identity) -> None:
        """Remove the marker of a file that is now in done/ or failed/, if it is still the
        marker that was seen (a producer may already have made a new one for a new file)."""
        name = spot.name + self.suffix
        try:
            sub, _ = self._folders.locate(spot.path)
            with self._folders.folder(sub) as fd:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == marker:
                    os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return  # the producer took it away: consumed all the same
        except OSError as exc:
            event(
                log,
                "marker_kept",
                level=logging.WARNING,
                file=display(spot.rel + self.suffix),
                reason=f"cannot remove the ready marker ({exc.strerror}): remove it by hand, or"
                " a new file of this name will go without waiting for its own",
            )
