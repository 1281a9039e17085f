"""The main loop's chores for operators: the status file, the metrics, the retention sweep.

Everything here runs on the main thread between its other duties and reads the stages' state;
nothing here moves a file to done/ or failed/.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..heartbeats import Counts
from ..items import display, utc_iso
from ..logs import event
from ..metrics import Metrics
from ..pipeline.finisher import Finisher
from ..pipeline.receipts import Journal
from ..pipeline.stability import Stabiliser
from ..pipeline.uploader import Uploader
from ..pipeline.watching import Watcher
from ..pipeline.workqueue import WorkQueue
from ..remote.breakers import Gates
from ..settings import Paths, Settings
from . import statusfile
from .retention import expired, sweep_interval

log = logging.getLogger(__name__)

IDLE_REFRESH_SECONDS = 15.0  # an unchanged status is rewritten this often (a liveness stamp)
MARKER_WAITERS_SHOWN = 20  # files waiting for their ready marker listed in the status file


class Trouble:
    """A chore repeated every few seconds that fails logs one line when it starts failing (or
    fails another way) and one when it works again, never a line per turn."""

    def __init__(self, name: str, what: str) -> None:
        self._name = name
        self._what = what
        self._reason: str | None = None

    def failed(self, reason: str) -> None:
        if reason != self._reason:
            self._reason = reason
            event(log, self._name, f"cannot write {self._what}: {reason}", level=logging.WARNING)

    def fine(self) -> None:
        if self._reason is not None:
            self._reason = None
            event(log, self._name, f"{self._what} written again")


class Operations:
    """Status file, metrics gauges and textfile, retention: `tick` on every main-loop turn."""

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        work: WorkQueue,
        stabiliser: Stabiliser,
        uploader: Uploader,
        finisher: Finisher,
        gates: Gates,
        watcher: Watcher,
        journal: Journal,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._paths = paths
        self._work = work
        self._stabiliser = stabiliser
        self._uploader = uploader
        self._finisher = finisher
        self._gates = gates
        self._watcher = watcher
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._started = time.time()
        self._next_status = 0.0
        self._last_doc: dict[str, Any] | None = None
        self._last_write = 0.0
        self._last_sweep = -math.inf
        self._status_trouble = Trouble("status", "the status file")
        self._textfile_trouble = Trouble("metrics", f"metrics_textfile {settings.metrics_textfile}")
        metrics.gauges(
            {
                "queue_depth": ("Files settling or queued", lambda: self.counts().waiting),
                "in_flight": ("PUTs in flight", lambda: uploader.sending),
                "oldest_waiting_seconds": ("Age of the oldest waiting file", self._oldest_age),
                "seconds_since_last_upload": (
                    "Seconds since the last successful upload (-1: none yet)",
                    self._since_last_upload,
                ),
                "service_retrying": (
                    "1 while the API or storage is failing and the daemon backs off",
                    lambda: float(gates.outage() is not None),
                ),
                "folders_not_writable": (
                    "Folders that refuse moves now; their files wait, unsent or unmoved",
                    lambda: float(len(finisher.folders)),
                ),
                "waiting_for_marker": (
                    "Stable files waiting for their ready marker (ready_marker)",
                    lambda: float(len(stabiliser.markers or ())),
                ),
                "watch_deaf": (
                    "1 while the drop folder cannot be watched",
                    lambda: float(watcher.deaf_reason is not None),
                ),
            }
        )

    def reconfigure(self, settings: Settings) -> None:
        """A reload: status_seconds and done_retention_days apply from the next turn on."""
        self.settings = settings

    def tick(self) -> None:
        now = self._clock()
        if now >= self._next_status:
            self._next_status = now + self.settings.status_seconds
            self.publish("running")
        days = self.settings.done_retention_days
        if days is not None and now >= self._last_sweep + sweep_interval(days):
            self._last_sweep = now  # from the last sweep: a reload to fewer days sweeps sooner
            self.sweep(time.time() - days * 86400)

    def counts(self) -> Counts:
        settling, (queued, taken) = len(self._stabiliser), self._work.counts()
        uploading = self._uploader.sending
        outage = self._gates.outage()
        return Counts(  # taken: holding a signed URL, being sent, being moved, or held back
            waiting=settling + queued + max(0, taken - uploading),
            uploading=uploading,
            uploaded=self._finisher.uploaded,
            failed=self._finisher.failed,
            retrying_since=outage.failing_since_epoch() if outage else None,
            last_error=outage.last_error if outage else None,
            failing=outage.label if outage else None,
            folders=tuple(self._finisher.folders.texts()),
            unmarked=len(self._stabiliser.markers or ()),
        )

    def publish(self, state: str, **extra: str) -> None:
        """The status file and the metrics textfile; a write that fails is logged, not raised."""
        self.write_status(state, **extra)
        try:
            self._metrics.write_textfile()
        except OSError as exc:
            self._textfile_trouble.failed(exc.strerror or str(exc))
        else:
            self._textfile_trouble.fine()

    def write_status(self, state: str, **extra: str) -> None:
        """The document `productiv-watcher status` shows; rewritten atomically."""
        counts = self.counts()
        doc: dict[str, Any] = {
            "state": state,
            **extra,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "version": __version__,
            "started": statusfile.iso(self._started),
            "drop_dir": str(self._paths.drop),
            "waiting": counts.waiting,
            "uploading": [
                {"file": rel, "bytes_sent": sent, "bytes": size}
                for rel, (sent, size) in list(self._uploader.progress.items())
            ],
            "uploaded": counts.uploaded,
            "failed": counts.failed,
            "last_error": counts.last_error,
            "retrying_since": statusfile.iso(counts.retrying_since),
            "failing": counts.failing,
            "folders": list(counts.folders),
            "last_upload": statusfile.iso(self._finisher.last_upload),
            "watch": self._watcher.deaf_reason or "ok",
            **self._marker_waiters(counts.unmarked),
        }
        now = time.time()
        if doc == self._last_doc and now - self._last_write < IDLE_REFRESH_SECONDS:
            return  # nothing new: an idle daemon rewrites it only now and then
        self._last_doc, self._last_write = doc, now
        refresh = max(self.settings.status_seconds, IDLE_REFRESH_SECONDS)
        stamps = {"updated": statusfile.iso(now), "updated_epoch": now, "every_seconds": refresh}
        try:
            statusfile.write(self._journal.folder, {**doc, **stamps})
        except OSError as exc:
            self._status_trouble.failed(exc.strerror or str(exc))
        else:
            self._status_trouble.fine()

    def sweep(self, cutoff: float) -> None:
        """Delete done/ files that arrived before `cutoff`, each receipted before it goes.

        A journal that cannot be written deletes nothing (the next sweep tries again), so no
        deletion is ever unrecorded; a file that then cannot be deleted gets a `kept` receipt.
        """
        done = self._paths.done  # done_dir needs a restart: the folder the finisher fills
        reason = f"older than done_retention_days ({self.settings.done_retention_days})"
        rels = {p: display(f"{done.name}/{p.relative_to(done)}") for p in expired(done, cutoff)}
        try:
            self._journal.append([_receipt(rel, "deleted", reason) for rel in rels.values()])
        except OSError as exc:
            why = f"cannot write the receipts journal ({exc.strerror}): nothing deleted"
            event(log, "retention_failed", why, level=logging.WARNING, files=len(rels))
            return
        kept = []
        for path, rel in rels.items():
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # gone already, as the receipt says
            except OSError as exc:
                kept.append(_receipt(rel, "kept", f"cannot delete it: {exc.strerror}"))
                continue
            self._metrics.deleted()
            event(log, "deleted", file=rel, reason=reason)
        if kept:
            first = f"{kept[0]['file']}: {kept[0]['reason']}"
            event(log, "retention_failed", level=logging.WARNING, files=len(kept), first=first)
            with contextlib.suppress(OSError):
                self._journal.append(kept)

    def _marker_waiters(self, count: int) -> dict[str, Any]:
        """The files waiting for their ready marker, longest first, each with its age: a stuck
        producer is told from a stuck daemon. Ages in whole seconds, so that an unchanged list
        does not rewrite the status file every turn."""
        markers = self._stabiliser.markers
        if markers is None:
            return {}
        now = self._clock()
        shown = markers.waiting(MARKER_WAITERS_SHOWN)
        return {
            "ready_marker": markers.suffix,
            "waiting_for_marker": count,
            "waiting_for_marker_files": [
                {"file": c.spot.rel, "seconds": int(now - c.since)} for c in shown
            ],
        }

    def _oldest_age(self) -> float:
        times = [t for t in (self._stabiliser.oldest(), self._work.oldest()) if t is not None]
        return self._clock() - min(times) if times else 0.0

    def _since_last_upload(self) -> float:
        last = self._finisher.last_upload
        return -1.0 if last is None else time.time() - last


def _receipt(rel: str, outcome: str, reason: str) -> dict[str, Any]:
    return {"time": utc_iso(time.time()), "file": rel, "outcome": outcome, "reason": reason}
