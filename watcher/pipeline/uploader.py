"""Stage 4, upload: batches of queued files get signed URLs, then the transfer thread sends them.

One dispatcher thread takes up to `batch_size` queued files of one type, asks the API for their
URLs and hands each (file, URL) to a ready queue; one transfer thread takes them from it and
drives up to `upload_concurrency` PUTs at once through libcurl (transfer.py). The ready queue
holds one batch: the next batch's URLs are asked for while the current one is sent, instead of
every PUT waiting out each API call, and never for a whole backlog. Every failure arrives as a
`Fault` (the file's own troubles too: gone, changed, not a regular file); `fates.decide` says
what happens to the file next and `_settle` does it.

Before a file's URL is asked for, the dispatcher checks that the file could be moved afterwards
(its folder's permissions, and done/'s and failed/'s): a file that could not is never sent. It
waits, held per folder, and the folder is looked at again every FOLDER_RECHECK_SECONDS (one stat),
so its files go as soon as it is fixed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..heartbeats import IDLE_WAKE_SECONDS, Heartbeat
from ..items import Item, Spot
from ..logs import event
from ..metrics import Metrics
from ..remote.api import ApiClient, SignedUrl, name_cost, packed
from ..remote.breakers import Gates
from ..remote.faults import Fault, Kind, backoff_seconds, names_fault
from ..remote.transfer import Done, Sent, Transfer
from ..settings import Settings
from .fates import LET_GO, Blocked, Happened, Next, decide
from .finisher import Finisher
from .handoff import Handoff
from .mover import FolderLook
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

URL_MARGIN_SECONDS = 5.0  # ask again when a URL has less left than this (S3 checks at the start)
FOLDER_RECHECK_SECONDS = 1.0  # a folder that holds files back is looked at this often (a stat)
# While transfers run with slots free, the transfer thread looks for new tickets this often.
FILL_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class Ticket:
    item: Item
    url: SignedUrl
    received_at: float  # local epoch seconds


def url_is_stale(url: SignedUrl, received_at: float, now: float) -> bool:
    """A URL that was fine when it arrived but is about to expire: ask for a fresh one.

    A URL that arrived already that close is tried anyway: the storage's clock decides, and
    a fresh one would be no better.
    """
    if url.expires_at is None:
        return False
    deadline = url.expires_at - URL_MARGIN_SECONDS
    return now >= deadline > received_at


def ready_depth(settings: Settings) -> int:
    """How many tickets may wait for the transfer thread: a batch, or one per transfer."""
    return max(settings.batch_size, settings.upload_concurrency)


def refusal(item: Item, max_file_size: int) -> str | None:
    """Why a file can never be uploaded as it is, decided before asking for a URL."""
    if item.snapshot.size > max_file_size:
        return f"the file has {item.snapshot.size} bytes, more than max_file_size ({max_file_size})"
    try:
        item.spot.name.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8, so the API cannot be asked for it"
    return None


class Uploader:
    """Owns the dispatcher and worker loops; the service runs each in its own thread."""

    def __init__(
        self,
        settings: Settings,
        api: ApiClient,
        transfer: Transfer,
        finish: Finisher,
        work: WorkQueue,
        gates: Gates,
        hand_back: Callable[[list[Spot]], None],
        metrics: Metrics,
        idle_wake_seconds: float = IDLE_WAKE_SECONDS,
    ) -> None:
        self._settings = settings
        self._idle_wake_seconds = idle_wake_seconds
        self._api = api
        self._transfer = transfer
        self._finish = finish
        self._work = work
        self._gates = gates
        self._hand_back = hand_back
        self._metrics = metrics
        self._ready: Handoff[Ticket] = Handoff(ready_depth(settings))
        self._lock = threading.Lock()
        self.sending = 0
        self.progress: dict[str, tuple[int, int]] = {}  # file -> (bytes sent, bytes), for status
        self._held: dict[str, list[Item]] = {}  # folder -> files it would not let move
        self._reconfigured = True  # the engine takes the settings at the first turn
        self._recheck_at = 0.0

    # -- the dispatcher thread -------------------------------------------------------------

    def dispatch_step(self, stop: threading.Event, beat: Heartbeat) -> None:
        beat.idle()
        self._recheck()
        wake = FOLDER_RECHECK_SECONDS if self._held else self._idle_wake_seconds
        batch = self._work.take_batch(self._settings.batch_size, timeout=wake)
        beat.busy()
        sendable = []
        seen: dict[str, FolderLook] = {}  # a look per folder for the whole batch
        for item in batch:
            reason = refusal(item, self._settings.max_file_size)
            if reason is not None:  # never sendable as it is: decide says FAIL
                self._settle(item, Fault(Kind.FINAL, reason))
            elif not item.late and (problem := self._finish.blocker(item.path, seen)) is not None:
                self._hold(item, problem)
            else:
                sendable.append(item)
        beat.idle()
        budget = self._api.names_budget(batch[0].spot.file_type) if batch else 0
        for group in packed(sendable, lambda item: name_cost(item.spot.name), budget):
            if not self._gates.api.wait(stop):
                return  # stopping: the files stay in the drop folder
            self._request(group, stop, beat)

    def _hold(self, item: Item, problem: Blocked) -> None:
        """Keep a file that could not be moved after its upload: it waits for its folder."""
        self._finish.folders.report(problem)
        self._held.setdefault(problem.folder, []).append(item)

    def _recheck(self) -> None:
        """Every FOLDER_RECHECK_SECONDS, one look per folder that holds files back: once it would
        let its first file move, all its files are queued again (and each is checked again)."""
        now = time.monotonic()
        if not self._held or now < self._recheck_at:
            return
        self._recheck_at = now + FOLDER_RECHECK_SECONDS
        for folder, items in list(self._held.items()):
            problem = self._finish.blocker(items[0].path)
            if problem is None or problem.folder != folder:
                del self._held[folder]
                self._finish.folders.fixed(folder)
                for item in items:
                    self._work.put_back(item)

    def _request(self, items: list[Item], stop: threading.Event, beat: Heartbeat) -> None:
        beat.busy()  # an API call: it must answer within the watchdog period
        try:
            answer = self._api.upload_urls([i.spot.name for i in items], items[0].spot.file_type)
        except Fault as fault:
            if fault.kind is Kind.REFUSED and len(items) > 1:  # find the name(s) it refuses
                middle = len(items) // 2
                self._request(items[:middle], stop, beat)
                self._request(items[middle:], stop, beat)
                return
            if fault.kind is Kind.REFUSED and not names_fault(fault.status):
                status, wait = fault.status, fault.retry_after
                fault = Fault(Kind.SERVICE, fault.reason, status, wait, where=fault.where)
            for item in items:
                self._settle(item, fault)
            return
        self._gates.api.fine()
        received = time.time()
        beat.idle()  # handing over waits for a free worker, by design
        tickets = []
        for item in items:
            url = answer.get(item.spot.name)
            if isinstance(url, SignedUrl):
                tickets.append(Ticket(item, url, received))
            else:
                missing = Fault(Kind.FILE, "the API's answer has no URL for this file name")
                self._settle(item, url or missing)
        while tickets and not stop.is_set():  # stopping: the files stay in the drop folder
            if self._ready.put_all(tickets, timeout=0.5):
                return

    # -- the transfer thread ---------------------------------------------------------------

    def reconfigure(self, settings: Settings) -> None:
        """A reload: batch size, attempts, backoff and size limit apply from the next file on;
        the concurrency at the transfer thread's next turn, the bandwidth limit at once."""
        self._settings = settings
        self._ready.resize(ready_depth(settings))
        self._reconfigured = True
        self._wake()

    def close(self) -> None:
        """Wake the transfer thread at a stop, if it waits for a ticket."""
        self._wake()

    def _wake(self) -> None:
        self._ready.wake()

    def transfer_beats(self) -> list[Heartbeat]:
        """The transfer slots' heartbeats, for the watchdog (read from the main thread)."""
        return self._transfer.beats()

    def run_puts(self, stop: threading.Event, beat: Heartbeat) -> None:
        """The transfer thread: turns until a stop, then until the PUTs in flight have ended
        (the service waits for them up to shutdown_timeout_seconds)."""
        while not stop.is_set() or self._transfer.running:
            self.put_step(stop, beat)

    def put_step(self, stop: threading.Event, beat: Heartbeat) -> None:
        """One turn: start what may start, let libcurl work, settle what ended."""
        if self._reconfigured:
            self._reconfigured = False
            s = self._settings
            self._transfer.reconfigure(
                s.upload_concurrency, int(s.min_upload_rate), int(s.upload_rate_limit)
            )
        if not self._transfer.running:
            beat.idle()  # nothing in flight: wait for a ticket, then for the storage's gate
            if not self._first(stop):
                return
        beat.busy()
        self._start_more(stop)
        free = self._transfer.running < self._settings.upload_concurrency
        for done in self._transfer.perform(FILL_SECONDS if free else self._idle_wake_seconds):
            self._ended(done)
        beat.progress()

    def _first(self, stop: threading.Event) -> bool:
        ticket = self._ready.get(timeout=self._idle_wake_seconds)
        if ticket is None or stop.is_set():
            return False  # stopping: the file stays in the drop folder
        if not self._gates.storage.wait(stop):
            return False
        self._start(ticket)
        return True

    def _start_more(self, stop: threading.Event) -> None:
        """Tickets up to the concurrency, while the storage's gate is open (it is waited for
        only when nothing is in flight: transfers running must keep running)."""
        while not stop.is_set() and self._transfer.running < self._settings.upload_concurrency:
            if self._gates.storage.remaining() > 0:
                return
            ticket = self._ready.get_nowait()
            if ticket is None:
                return
            self._start(ticket)

    def _start(self, ticket: Ticket) -> None:
        item = ticket.item
        if url_is_stale(ticket.url, ticket.received_at, time.time()):
            self._work.put_back(decide(item, Happened.URL_STALE, 0).item)  # Next.FRESH_URL
            return
        item = item.sending()
        rel, size = item.spot.rel, item.snapshot.size
        with self._lock:
            self.sending += 1
            self.progress[rel] = (0, size)

        def progress(sent: int) -> None:
            self.progress[rel] = (sent, size)

        try:
            self._transfer.start(ticket.url, item, progress, ticket)
        except Fault as fault:
            self._ended(Done(ticket, item, None, fault))

    def _ended(self, done: Done) -> None:
        """Settle one PUT's outcome: stored, or a fault (the file's own included)."""
        item = done.item
        try:
            if done.sent is not None:
                self._stored(item, done.sent, done.tag)
            elif done.error is not None:
                self._settle(item, done.error)
        finally:
            with self._lock:
                self.sending -= 1
                self.progress.pop(item.spot.rel, None)

    # -- outcomes --------------------------------------------------------------------------

    def _stored(self, item: Item, sent: Sent, tag: object) -> None:
        """Do what `decide` says for a stored file (Next.MOVE): to the finisher, for done/."""
        fate = decide(item, Happened.STORED, self._settings.max_attempts)
        self._gates.storage.fine()
        path = tag.url.split().path if isinstance(tag, Ticket) else ""
        self._finish.done(fate.item, sent, path)

    def _settle(self, item: Item, fault: Fault) -> None:
        """Do what `decide` says for the file after a fault: one action per step."""
        fate = decide(item, fault.kind, self._settings.max_attempts)
        step, item = fate.next, fate.item
        if step is Next.BACK_OFF:
            self._gates.trouble(fault)
            self._work.put_back(item)
        elif step is Next.FRESH_URL:
            self._work.put_back(item)
        elif step is Next.CHECK_CLOCK:
            clock = "signed URLs keep arriving expired: check this host's clock"
            self._gates.storage.trouble(Fault(Kind.SERVICE, clock, where="put"))
            self._work.put_back(item)
        elif step is Next.RETRY:
            self._metrics.retried(fault.where or "urls", fault.family)
            s = self._settings
            wait = backoff_seconds(
                item.attempts, s.retry_initial_seconds, s.retry_max_seconds, random.random()
            )
            event(
                log,
                "retrying",
                file=item.spot.rel,
                attempt=item.attempts,
                status=fault.status,
                seconds=round(wait, 2),
                reason=fault.reason,
            )
            self._work.put_back(item, time.monotonic() + wait)
        elif step is Next.FAIL:
            self._finish.fail(item, fault.reason, fault.status)
        else:  # FORGET or SETTLE_AGAIN: its name is let go
            self._work.release(item.path)
            event(log, LET_GO[fault.kind], file=item.spot.rel, reason=fault.reason)
            if step is Next.SETTLE_AGAIN:
                self._hand_back([item.spot])
