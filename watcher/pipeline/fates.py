"""A file's fate: what happens next after each thing that can go wrong, decided in one place.

The rules (docs/reliability.md, "A file's fate"):
- A fault of the API or the storage never costs the file an attempt: the gate of the thing that
  failed backs off (remote/breakers.py) and the file waits in the queue.
- A file is uploaded only if it can then be moved: a folder that would refuse the move holds its
  files, unsent, until it is fixed, and is reported once (`folder_not_writable`), not per file.
- A move that fails after the upload keeps the file's outcome and is tried again as a move, with
  a backoff of its own per route (source folder, done/ or failed/): the file is never PUT again
  for it (only a restart may do that: at-least-once).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from ..disk.access import UNIT_GROUP, WORK, Seen, User, current_user, drop_group, fix, lacks, owners
from ..items import Item, Snapshot
from ..logs import event
from ..remote.faults import Kind

log = logging.getLogger(__name__)

EXPIRED_IN_A_ROW = 3  # URLs that arrive already expired point at a clock problem: back off


class Happened(enum.Enum):
    """What happened to a file that is not a fault (a fault is told by its `Kind`)."""

    URL_STALE = "url stale"  # its URL would expire before the PUT could begin: no PUT made
    STORED = "stored"  # the storage stored it
    MOVE_FAILED = "move failed"  # the rename into done/ or failed/ failed (a folder, the disk)
    MOVED = "moved"  # in done/ or failed/, and the version that was uploaded or refused


class Next(enum.Enum):
    """What happens to a file next."""

    BACK_OFF = "back off"  # the API's or storage's gate takes a step; the file waits, no attempt
    FRESH_URL = "fresh url"  # ask for a new signed URL, no attempt
    CHECK_CLOCK = "check clock"  # URLs keep arriving expired: the storage's gate backs off
    RETRY = "retry"  # the file itself was refused: again after a backoff, one attempt used
    FAIL = "fail"  # to failed/ with the reason
    FORGET = "forget"  # gone, or no longer a regular file: its name is let go, nothing moves
    SETTLE_AGAIN = "settle again"  # another version: let go, and it settles again as such
    MOVE = "move"  # uploaded: to the finisher, for done/
    MOVE_AGAIN = "move again"  # its route backs off and the move is tried again: never a new PUT
    RECORD = "record"  # moved: made durable, receipted, then logged


@dataclass(frozen=True, slots=True)
class Fate:
    """A file's next step and its state from now on (attempts, expired URLs in a row)."""

    next: Next
    item: Item


FAULT_STEPS = {
    Kind.SERVICE: Next.BACK_OFF,
    Kind.FINAL: Next.FAIL,
    Kind.REFUSED: Next.FAIL,  # a single name the API refuses
    Kind.GONE: Next.FORGET,
    Kind.NOT_REGULAR: Next.FORGET,
    Kind.CHANGED: Next.SETTLE_AGAIN,
}
STEPS = {
    Happened.URL_STALE: Next.FRESH_URL,
    Happened.STORED: Next.MOVE,
    Happened.MOVE_FAILED: Next.MOVE_AGAIN,
    Happened.MOVED: Next.RECORD,
}


# The line said for a file let go (Next.FORGET or SETTLE_AGAIN), by what happened to it.
LET_GO = {Kind.GONE: "vanished", Kind.NOT_REGULAR: "skipped", Kind.CHANGED: "changed"}


def decide(item: Item, what: Kind | Happened, max_attempts: int) -> Fate:
    """A file's next step after `what`, and its new state: the one place that decides.

    Like urllib3's `Retry.increment`, it changes nothing and returns the new value: only a
    file's own refusal costs an attempt, only an expired URL counts towards a clock problem,
    and nothing that happens at the move ever sends the file again.
    """
    if what is Kind.EXPIRED:
        late = item.expired_again()
        return Fate(Next.CHECK_CLOCK if late.expired >= EXPIRED_IN_A_ROW else Next.FRESH_URL, late)
    if what is Kind.FILE:
        if item.attempts + 1 < max_attempts:
            return Fate(Next.RETRY, item.retried())
        return Fate(Next.FAIL, item)
    if isinstance(what, Kind):
        return Fate(FAULT_STEPS[what], item)
    return Fate(STEPS[what], item)


def moved_intact(moved: os.stat_result, uploaded: Snapshot, late_writes: bool = False) -> bool:
    """Is the file now in done/ (or failed/) the version that was uploaded (or refused)?

    The rename itself changes the ctime, so the identity, size and mtime decide. With
    `late_writes` (an uploaded file, done/ watched for late writes), the identity alone: the
    same file written to since the lstat before its rename is a late write, which that watch
    sends again (its baseline is the version uploaded), not a replacement to take back.
    """
    if (moved.st_dev, moved.st_ino) != (uploaded.dev, uploaded.ino):
        return False
    return late_writes or (moved.st_size, moved.st_mtime_ns) == (uploaded.size, uploaded.mtime_ns)


# -- folders that refuse moves ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Blocked:
    """A folder that refuses moves, said so an operator can act on it."""

    folder: str
    user: str  # the daemon's
    owner: str  # user:group of the folder
    mode: str  # as ls shows it
    reason: str  # access.refusal's, or the move's own error
    fix: str  # access.fix's command, or fix_for_error's advice

    def text(self) -> str:
        return (
            f"{self.folder} is not writable by {self.user} "
            f"({self.owner} {self.mode}: {self.reason}); fix: {self.fix}"
        )


def fix_for_error(number: int | None) -> str:
    """What to do about a move refused for a reason the folder's mode does not show."""
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "free space (or quota) on its filesystem"
    if number == errno.EROFS:
        return "mount it read-write"
    if number in (errno.EACCES, errno.EPERM):
        return "check its ACLs and security labels (getfacl, ls -Z) and attributes (lsattr)"
    if number == errno.EXDEV:
        return "put done/ and failed/ on the drop folder's mount (a bind mount is another)"
    return "see the reason"


def blocked(folder: Path, seen: Seen | None, user: User, reason: str, fix: str) -> Blocked:
    """Name the daemon's user and the folder's owner (numbers when they have no name); `seen`
    is None for a folder that could not be looked at."""
    who = f"{user.name} (uid {user.uid})"
    if seen is None:
        return Blocked(str(folder), who, "?", "?", reason, fix)
    return Blocked(str(folder), who, owners(seen), stat.filemode(seen.mode), reason, fix)


class FolderTrouble:
    """Folders that refuse moves now. Each is logged once per episode (at ERROR, with what to do),
    and once more when it works again; the status line lists them. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, tuple[Blocked, float]] = {}
        self._unlisted: set[str] = set()  # reported by `listing`: the main thread's

    def report(self, problem: Blocked) -> None:
        with self._lock:
            if problem.folder in self._open:
                return
            self._open[problem.folder] = (problem, self._clock())
        event(
            log,
            "folder_not_writable",
            problem.text(),
            level=logging.ERROR,
            folder=problem.folder,
            user=problem.user,
            owner=problem.owner,
            mode=problem.mode,
            reason=problem.reason,
            fix=problem.fix,
        )

    def fixed(self, folder: str) -> None:
        with self._lock:
            ended = self._open.pop(folder, None)
        if ended is not None:
            event(log, "folder_writable", folder=folder, seconds=round(self._clock() - ended[1], 2))

    def listing(self, folder: Path, error: OSError | None) -> None:
        """A scan's word on a type folder of drop/: one it cannot list (a producer's umask 0077)
        hides its files, so it is reported like one that refuses moves, once, with its fix; the
        episode ends when a scan lists it again."""
        if error is None:
            if str(folder) in self._unlisted:
                self._unlisted.discard(str(folder))
                self.fixed(str(folder))
            return
        user = current_user("the daemon's user")
        try:
            seen: Seen | None = Seen.of(folder, os.stat(folder))
            group = drop_group(folder.parent, user)
        except OSError:
            seen, group = None, UNIT_GROUP
        self._unlisted.add(str(folder))
        reason = f"cannot list it ({error.strerror}): its files are not seen"
        by_bits = seen is not None and lacks(seen, user, WORK)  # else ACLs, root_squash...
        advice = fix(seen, user, WORK, group) if seen and by_bits else fix_for_error(error.errno)
        self.report(blocked(folder, seen, user, reason, advice))

    def __len__(self) -> int:
        return len(self._open)

    def texts(self) -> list[str]:
        with self._lock:
            return [problem.text() for problem, _ in self._open.values()]


# -- moves tried again -----------------------------------------------------------------------

Route = tuple[Path, bool]  # (the file's folder in drop/, uploaded: to done/ rather than failed/)
T = TypeVar("T")


@dataclass
class Stuck(Generic[T]):
    """A route whose last move failed: its outcomes wait for the next try."""

    step: int
    due: float
    folder: str  # as reported to FolderTrouble
    outcomes: list[T] = field(default_factory=list)


class MoveRetries(Generic[T]):
    """Outcomes whose move failed, per route, each route with its own growing backoff. The
    finisher's thread only. An outcome for a route that is stuck joins it untried, so the step
    grows once per try of the route, not once per file."""

    def __init__(self, delay: Callable[[int], float]) -> None:
        self._delay = delay
        self._stuck: dict[Route, Stuck[T]] = {}

    def __len__(self) -> int:
        return sum(len(s.outcomes) for s in self._stuck.values())

    def holding(self, route: Route) -> bool:
        return route in self._stuck

    def hold(self, route: Route, outcome: T) -> None:
        self._stuck[route].outcomes.append(outcome)

    def stuck(self, route: Route, outcomes: list[T], folder: str, step: int, now: float) -> float:
        """The route failed its `step`th try: its outcomes wait a backoff; returns the wait."""
        delay = self._delay(step)
        self._stuck[route] = Stuck(step, now + delay, folder, list(outcomes))
        return delay

    def due(self, now: float) -> dict[Route, Stuck[T]]:
        """The routes whose wait is over, taken out to be tried again."""
        ready = {route: s for route, s in self._stuck.items() if s.due <= now}
        for route in ready:
            del self._stuck[route]
        return ready

    def next_due(self) -> float | None:
        return min((s.due for s in self._stuck.values()), default=None)
