"""Stage 5, finish: move each uploaded file to done/ and each refused one to failed/, then log it.

Runs on its own thread so that the transfer thread never waits on the disk: it takes whatever
outcomes are waiting, renames them all, fsyncs each folder it touched once for the whole batch,
and only then logs `uploaded` / `failed`: a logged file is durably where the line says.

A move that fails (a folder not writable, read-only or full) is not an outage and never sends
the file again: the outcome is kept and the move tried again after a backoff of its own per
route (fates.py), the folder reported once (`folder_not_writable`). A file is moved only if it
is still the version that was uploaded or refused, checked before the rename and after it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..disk.access import Seen, nearest
from ..heartbeats import IDLE_WAKE_SECONDS, Heartbeat
from ..items import Item, Snapshot, Spot, display, utc_iso
from ..logs import event
from ..metrics import Metrics
from ..remote.faults import Kind
from ..remote.transfer import Sent
from .fates import (
    LET_GO,
    Blocked,
    FolderTrouble,
    MoveRetries,
    Next,
    Route,
    blocked,
    decide,
    fix_for_error,
    moved_intact,
)
from .mover import FolderLook, Mover
from .receipts import Journal
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

BATCH = 256
# In a burst, the next batch is gathered this long: each batch costs a round of fsyncs and a
# thread wake (about 1 ms of CPU on the 2-core bench machine), which its files share.
GROUP_SECONDS = 0.05
# A file sent again after a late write, refused or unreadable (it is not moved: latewrite.py).
LATE_NOT_SENT = (
    "not sent again after its late write: it stays in done/, and Productiv holds the"
    " earlier version"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    item: Item
    uploaded: bool
    status: int | None = None
    reason: str = ""  # why it failed
    sent: Sent | None = None  # the PUT that stored it
    object_path: str = ""  # the signed URL's path, never its query


class Finisher:
    """`done` / `fail` are called from the uploader's threads; `run` is the finisher's thread."""

    def __init__(
        self,
        mover: Mover,
        work: WorkQueue,
        delay: Callable[[int], float],
        hand_back: Callable[[list[Spot]], None],
        journal: Journal,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        idle_wake_seconds: float = IDLE_WAKE_SECONDS,
        placed: Callable[[list[tuple[Item, Path, bool]]], None] = lambda placed: None,
        late_writes: bool = False,
    ) -> None:
        """`delay`: the wait of each backoff step of a move that failed (the gates' settings);
        `placed`: told of the files moved (item, where, uploaded), once they are receipted;
        `late_writes`: whether `placed` watches the uploaded files for late writes."""
        self._idle_wake_seconds = idle_wake_seconds
        self._placed = placed
        self._late_writes = late_writes
        self._mover = mover
        self._work = work
        self._hand_back = hand_back
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._retries: MoveRetries[Outcome] = MoveRetries(delay)
        self.folders = FolderTrouble(monotonic)
        self._outcomes: queue.Queue[Outcome | None] = queue.Queue()
        self._lock = threading.Lock()
        self.uploaded = 0
        self.failed = 0
        self.last_upload: float | None = None  # epoch seconds

    def done(self, item: Item, sent: Sent, object_path: str) -> None:
        self._outcomes.put(Outcome(item, True, sent.status, sent=sent, object_path=object_path))

    def fail(self, item: Item, reason: str, status: int | None) -> None:
        """A file refused or unreadable: to failed/, or, sent again after a late write, said as
        such (its line and receipt say it stays in done/ and what Productiv holds)."""
        if item.late:
            reason = f"{reason}; {LATE_NOT_SENT}"
        self._outcomes.put(Outcome(item, False, status=status, reason=reason))

    def close(self) -> None:
        """Wake the finisher to end (after the last outcome already queued)."""
        self._outcomes.put(None)

    def run(self, stop: threading.Event, beat: Heartbeat) -> None:
        """Until `stop` is set and nothing is left to move (the uploader stops first). Moves still
        waiting for a folder at a stop stay in drop/: the next start uploads them again.

        Group commit: when outcomes are already waiting after a step (a burst), the next step
        waits GROUP_SECONDS for more, so that one round of fsyncs (each folder, the journal)
        serves a larger batch; a file that ends alone is moved and reported at once."""
        while not (stop.is_set() and self._outcomes.empty()):
            self.step(beat)
            if not self._outcomes.empty():
                beat.idle()
                stop.wait(GROUP_SECONDS)

    def blocker(self, path: Path, seen: dict[str, FolderLook] | None = None) -> Blocked | None:
        """The folder that would refuse this file's move, said for an operator; None if none
        (`seen`: the folders' status, shared by the files of one batch)."""
        return self._mover.blocker(path, seen)

    def step(self, beat: Heartbeat) -> None:
        beat.idle()
        batch = self._take(self._retries.next_due())
        beat.busy()
        retried = self._retries.due(self._monotonic())
        batch += [outcome for stuck in retried.values() for outcome in stuck.outcomes]
        placed: list[tuple[Outcome, Path]] = []
        tried: set[Route] = set()
        failures: dict[Route, tuple[list[Outcome], OSError]] = {}
        for outcome in batch:
            route = (outcome.item.path.parent, outcome.uploaded)
            if self._retries.holding(route):
                self._retries.hold(route, outcome)  # its folder is still failing: wait with it
                continue
            tried.add(route)
            result = self._place(outcome)
            if isinstance(result, OSError):
                failures.setdefault(route, ([], result))[0].append(outcome)
            elif result is not None:
                placed.append((outcome, result))
        for route in tried:
            before = retried.get(route)
            if route in failures:
                self._move_failed(route, *failures[route], step=before.step + 1 if before else 1)
            elif before is not None:
                self.folders.fixed(before.folder)
        self._record(placed)
        if placed:  # ready markers consumed, late-write watch (service._placed)
            self._placed([(o.item, final, o.uploaded) for o, final in placed])

    def _take(self, retry_at: float | None) -> list[Outcome]:
        """The outcomes waiting now, after waiting for one until the next move retry is due."""
        timeout = self._idle_wake_seconds
        if retry_at is not None:
            timeout = max(0.0, min(timeout, retry_at - self._monotonic()))
        try:
            first = self._outcomes.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first] if first is not None else []
        while len(batch) < BATCH:
            try:
                more = self._outcomes.get_nowait()
            except queue.Empty:
                break
            if more is not None:
                batch.append(more)
        return batch

    def _record(self, placed: list[tuple[Outcome, Path]]) -> None:
        """Make the moves durable, receipt them, then log them: a logged file is where it says."""
        if not placed:
            return
        # As text: a Path's parent and hash cost more than the rest of a file's receipt.
        folders = {os.path.dirname(p) for o, final in placed for p in (final, o.item.path)}
        try:
            self._mover.sync(Path(folder) for folder in folders)
        except OSError as exc:  # the renames are done; only their durability is in doubt
            log.error("cannot sync the moves: %s", exc.strerror, extra={"event": "sync_failed"})
        now = self._clock()
        try:
            self._journal.append([self._receipt(o, final, now) for o, final in placed])
        except OSError as exc:  # the files are where they belong; only their receipts are lost
            log.error(
                "cannot write %d receipt(s) to %s: %s",
                len(placed),
                self._journal.path,
                exc.strerror,
                extra={"event": "receipt_failed"},
            )
        for outcome, final in placed:
            self._report(outcome, final, now)

    def _place(self, outcome: Outcome) -> Path | OSError | None:
        """Move one file if it is still the version that was uploaded (or refused): its final path
        (`decide`: MOVED -> RECORD), the error of a move that failed (MOVE_FAILED -> MOVE_AGAIN:
        `step` tries its route again, never a new PUT), or None for a file let go."""
        item = outcome.item
        if item.late:  # sent again from done/ after a late write (latewrite.py): it stays
            return item.path
        try:
            if Snapshot.of(self._mover.lstat(item.path)) != item.snapshot:
                self._let_go(item, Kind.CHANGED, "the file changed before it could be moved")
                return None
            if outcome.uploaded:
                final = self._mover.to_done(item.path)
            else:
                final = self._mover.to_failed(item.path, self._sidecar(outcome))
        except FileNotFoundError:
            self._let_go(item, Kind.GONE, "removed before it could be moved")
            return None
        except OSError as exc:
            return exc
        return final if self._intact(item, final, outcome.uploaded) else None

    def _let_go(self, item: Item, what: Kind, reason: str) -> None:
        """A file gone or changed at its move: FORGET or SETTLE_AGAIN, as `decide` says (its name
        is let go and said; a file that changed settles again as the new version it is)."""
        fate = decide(item, what, 0)
        self._work.release(item.path)
        event(log, LET_GO[what], file=item.spot.rel, reason=reason)
        if fate.next is Next.SETTLE_AGAIN:
            self._hand_back([item.spot])

    def _intact(self, item: Item, final: Path, uploaded: bool) -> bool:
        """The file was replaced between the lstat and the rename (the one race a rename by name
        leaves open): what was moved goes back under its name in drop/, and is sent as the new
        version it is. If its name is taken by then, it stays where it is and is said at ERROR.
        An uploaded file written to meanwhile stays in done/ when the late-write watch is on."""
        try:
            if moved_intact(os.lstat(final), item.snapshot, uploaded and self._late_writes):
                return True
            self._mover.undo(final, item.path)
        except OSError as exc:
            event(
                log,
                "not_uploaded",
                level=logging.ERROR,
                file=item.spot.rel,
                moved_to=self._mover.relative(final),
                reason=f"replaced while it was being moved, and cannot go back ({exc.strerror}):"
                " drop it again to upload it",
            )
            self._work.release(item.path)
            return False
        self._let_go(item, Kind.CHANGED, "the file was replaced while it was being moved")
        return False

    def _sidecar(self, outcome: Outcome) -> dict[str, Any]:
        item = outcome.item
        return {
            "file": item.spot.rel,
            "reason": outcome.reason,
            "status": outcome.status,
            "attempts": item.puts,
        }

    def _move_failed(self, route: Route, outcomes: list[Outcome], exc: OSError, step: int) -> None:
        """The moves of this route wait a growing backoff, their outcomes kept: never a new PUT."""
        uploaded = route[1]
        problem = self._blame(outcomes[0].item.path, uploaded, exc)
        self.folders.report(problem)
        delay = self._retries.stuck(route, outcomes, problem.folder, step, self._monotonic())
        self._metrics.retried("move", "disk")
        event(
            log,
            "retrying",
            level=logging.WARNING,
            what="move",
            folder=problem.folder,
            files=len(outcomes),
            attempt=step,
            seconds=round(delay, 2),
            reason=f"cannot move a file into {'done' if uploaded else 'failed'}/: {exc.strerror}",
        )

    def _blame(self, path: Path, uploaded: bool, exc: OSError) -> Blocked:
        """The folder that refused a move: by its permissions, else the destination."""
        problem = self.blocker(path)
        if problem is not None:
            return problem
        destination = self._mover.destinations(path)[0 if uploaded else 1]
        try:
            destination, st = nearest(destination)
        except OSError:
            seen = None
        else:
            seen = Seen.of(destination, st)
        user, reason = self._mover.user, exc.strerror or str(exc)
        return blocked(destination, seen, user, reason, fix_for_error(exc.errno))

    def _receipt(self, outcome: Outcome, final: Path, now: float) -> dict[str, Any]:
        item, sent = outcome.item, outcome.sent
        return {
            "time": utc_iso(now),
            "file": item.spot.rel,
            "type": item.spot.file_type,
            "bytes": item.snapshot.size,
            "sha256": sent.sha256 if sent else None,
            "etag_verified": sent.etag_verified if sent else None,
            "object": outcome.object_path or None,
            "status": outcome.status,
            "attempts": item.puts,
            "seconds": round(sent.seconds, 3) if sent else None,
            "outcome": "uploaded" if outcome.uploaded else "failed",
            "moved_to": self._mover.relative(final),
            **({"reason": outcome.reason} if not outcome.uploaded else {}),
            **({"late_write": True} if item.late else {}),
        }

    def _report(self, outcome: Outcome, final: Path, now: float) -> None:
        item, sent = outcome.item, outcome.sent
        self._work.release(item.path)
        renamed = display(final.name) if final.name != item.spot.name else None
        if sent is not None:
            with self._lock:
                self.uploaded += 1
                self.last_upload = now
            self._metrics.uploaded(item.spot.file_type, item.snapshot.size, sent.seconds)
            event(
                log,
                "uploaded",
                file=item.spot.rel,
                type=item.spot.file_type,
                bytes=item.snapshot.size,
                seconds=round(sent.seconds, 3),
                status=outcome.status,
                moved_to=renamed,
                late_write=item.late or None,
            )
        else:
            with self._lock:
                self.failed += 1
            self._metrics.failed(item.spot.file_type)
            event(
                log,
                "failed",
                level=logging.WARNING,
                file=item.spot.rel,
                type=item.spot.file_type,
                status=outcome.status,
                attempts=item.puts,
                moved_to=renamed,
                reason=outcome.reason,
                late_write=item.late or None,
            )
