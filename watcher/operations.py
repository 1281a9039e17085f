"""The main loop's chores for operators: the status file, the metrics, the retention sweep.

Everything here runs on the main thread between its other duties and reads the stages' state;
nothing here moves a file to done/ or failed/.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from . import __version__, statusfile
from .finisher import Finisher
from .gate import ServiceGate
from .health import Counts
from .logs import event
from .metrics import Metrics
from .receipts import Journal, receipt_time
from .retention import expired, sweep_interval
from .settings import Settings
from .stability import Stabiliser
from .uploader import Uploader
from .watching import Watcher
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

IDLE_REFRESH_SECONDS = 15.0  # an unchanged status is rewritten this often (a liveness stamp)


class Operations:
    """Status file, metrics gauges and textfile, retention: `tick` on every main-loop turn."""

    def __init__(
        self,
        settings: Settings,
        work: WorkQueue,
        stabiliser: Stabiliser,
        uploader: Uploader,
        finisher: Finisher,
        gate: ServiceGate,
        watcher: Watcher,
        journal: Journal,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._work = work
        self._stabiliser = stabiliser
        self._uploader = uploader
        self._finisher = finisher
        self._gate = gate
        self._watcher = watcher
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._started = time.time()
        self._next_status = 0.0
        self._last_doc: dict[str, Any] | None = None
        self._last_write = 0.0
        self._last_sweep = -math.inf
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
                    lambda: float(gate.failing_since is not None),
                ),
                "watch_deaf": (
                    "1 while the drop folder cannot be watched",
                    lambda: float(watcher.deaf_reason is not None),
                ),
            }
        )

    def tick(self) -> None:
        now = self._clock()
        if now >= self._next_status:
            self._next_status = now + self.settings.status_seconds
            self.write_status("running")
            self._metrics.write_textfile()
        days = self.settings.done_retention_days
        if days is not None and now >= self._last_sweep + sweep_interval(days):
            self._last_sweep = now  # from the last sweep: a reload to fewer days sweeps sooner
            self.sweep(time.time() - days * 86400)

    def counts(self) -> Counts:
        settling, (queued, taken) = len(self._stabiliser), self._work.counts()
        uploading = self._uploader.sending
        return Counts(  # taken: holding a signed URL, being sent, or being moved
            waiting=settling + queued + max(0, taken - uploading),
            uploading=uploading,
            uploaded=self._finisher.uploaded,
            failed=self._finisher.failed,
            retrying_since=self._gate.failing_since_epoch(),
            last_error=self._gate.last_error,
        )

    def write_status(self, state: str) -> None:
        """The document `productiv-watcher status` shows; rewritten atomically."""
        counts = self.counts()
        doc: dict[str, Any] = {
            "state": state,
            "pid": os.getpid(),
            "version": __version__,
            "started": statusfile.iso(self._started),
            "drop_dir": str(self.settings.drop_dir),
            "waiting": counts.waiting,
            "uploading": [
                {"file": rel, "bytes_sent": sent, "bytes": size}
                for rel, (sent, size) in list(self._uploader.progress.items())
            ],
            "uploaded": counts.uploaded,
            "failed": counts.failed,
            "last_error": counts.last_error,
            "retrying_since": statusfile.iso(counts.retrying_since),
            "last_upload": statusfile.iso(self._finisher.last_upload),
            "watch": self._watcher.deaf_reason or "ok",
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
            log.warning("cannot write the status file: %s", exc.strerror, extra={"event": "status"})

    def sweep(self, cutoff: float) -> None:
        """Delete done/ files that arrived before `cutoff`; each is logged and receipted."""
        assert self.settings.done_dir is not None
        receipts = []
        for path in expired(self.settings.done_dir, cutoff):
            rel = f"{self.settings.done_dir.name}/{path.relative_to(self.settings.done_dir)}"
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot delete %s: %s", rel, exc.strerror, extra={"event": "deleted"})
                continue
            self._metrics.deleted()
            reason = f"older than done_retention_days ({self.settings.done_retention_days})"
            event(log, "deleted", file=rel, reason=reason)
            receipts.append(
                {
                    "time": receipt_time(time.time()),
                    "file": rel,
                    "outcome": "deleted",
                    "reason": reason,
                }
            )
        self._journal.append(receipts)

    def _oldest_age(self) -> float:
        times = [t for t in (self._stabiliser.oldest(), self._work.oldest()) if t is not None]
        return self._clock() - min(times) if times else 0.0

    def _since_last_upload(self) -> float:
        last = self._finisher.last_upload
        return -1.0 if last is None else time.time() - last
