"""Stage 5, finish: move each uploaded file to done/ and each refused one to failed/, then log it.

Runs on its own thread so that PUT workers never wait on the disk: it takes whatever outcomes
are waiting, renames them all, fsyncs each folder it touched once for the whole batch, and only
then logs `uploaded` / `failed`: a logged file is durably where the line says. A folder that
refuses the file (read-only, full) is treated like an outage: the file stays in drop/ and is
tried again after a backoff step.
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

from .faults import Fault, Kind
from .gate import ServiceGate
from .health import IDLE_WAKE_SECONDS, Heartbeat
from .items import Item, Snapshot, Spot, display
from .logs import event
from .metrics import Metrics
from .mover import Mover
from .receipts import Journal, receipt_time
from .transfer import Sent
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

BATCH = 256


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
        gate: ServiceGate,
        hand_back: Callable[[list[Spot]], None],
        journal: Journal,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._mover = mover
        self._work = work
        self._gate = gate
        self._hand_back = hand_back
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._outcomes: queue.Queue[Outcome | None] = queue.Queue()
        self._lock = threading.Lock()
        self.uploaded = 0
        self.failed = 0
        self.last_upload: float | None = None  # epoch seconds

    def done(self, item: Item, sent: Sent, object_path: str) -> None:
        self._outcomes.put(Outcome(item, True, sent.status, sent=sent, object_path=object_path))

    def fail(self, item: Item, reason: str, status: int | None) -> None:
        self._outcomes.put(Outcome(item, False, status=status, reason=reason))

    def close(self) -> None:
        """Wake the finisher to end (after the last outcome already queued)."""
        self._outcomes.put(None)

    def run(self, stop: threading.Event, beat: Heartbeat) -> None:
        """Until `stop` is set and nothing is left to move (the uploader stops first)."""
        while not (stop.is_set() and self._outcomes.empty()):
            self.step(beat)

    def step(self, beat: Heartbeat) -> None:
        beat.idle()
        try:
            first = self._outcomes.get(timeout=IDLE_WAKE_SECONDS)
        except queue.Empty:
            return
        beat.busy()
        batch = [first] if first is not None else []
        while len(batch) < BATCH:
            try:
                more = self._outcomes.get_nowait()
            except queue.Empty:
                break
            if more is not None:
                batch.append(more)
        placed = [(outcome, final) for outcome in batch if (final := self._place(outcome))]
        folders = {path.parent for _, path in placed} | {o.item.path.parent for o, _ in placed}
        try:
            self._mover.sync(folders)
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

    def _place(self, outcome: Outcome) -> Path | None:
        item = outcome.item
        try:
            if not outcome.uploaded:
                sidecar = {
                    "file": item.spot.rel,
                    "reason": outcome.reason,
                    "status": outcome.status,
                    "attempts": item.puts,
                }
                return self._mover.to_failed(item.path, sidecar)
            if Snapshot.of(os.lstat(item.path)) != item.snapshot:
                self._work.release(item.path)  # changed after its PUT: send it again
                event(log, "changed", file=item.spot.rel, reason="the file changed after upload")
                self._hand_back([item.spot])
                return None
            return self._mover.to_done(item.path)
        except FileNotFoundError:
            self._work.release(item.path)
            event(log, "vanished", file=item.spot.rel, reason="removed before it could be moved")
        except OSError as exc:
            where = "done" if outcome.uploaded else "failed"
            reason = f"cannot move a file into {where}/: {exc.strerror}"
            self._metrics.retried("move", "disk")
            self._gate.trouble(Fault(Kind.SERVICE, reason, where="move"))
            self._work.put_back(item)
        return None

    def _receipt(self, outcome: Outcome, final: Path, now: float) -> dict[str, Any]:
        item, sent = outcome.item, outcome.sent
        return {
            "time": receipt_time(now),
            "file": item.spot.rel,
            "type": item.spot.file_type,
            "bytes": item.snapshot.size,
            "sha256": sent.sha256 if sent else None,
            "object": outcome.object_path or None,
            "status": outcome.status,
            "attempts": item.puts,
            "seconds": round(sent.seconds, 3) if sent else None,
            "outcome": "uploaded" if outcome.uploaded else "failed",
            "moved_to": self._mover.relative(final),
            **({"reason": outcome.reason} if not outcome.uploaded else {}),
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
            )
