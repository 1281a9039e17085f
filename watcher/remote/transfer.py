"""Stage 4b, the PUT engine: libcurl's multi interface, on one thread, many transfers at once.

Each transfer sends one checked version of a file (body.py) to its signed URL, used exactly as
received, with an exact Content-Length (also 0: UPLOAD with INFILESIZE_LARGE, never chunked), an
empty `Expect:` (no 100-continue stall), no Content-Type unless configured, NOSIGNAL (threads),
the proxy `Network` chose for the URL (`""`: none, so libcurl never reads the environment) and
the CA file both clients trust. A slow link is not a failure: only a stall is, fewer than
`min_rate` bytes/s reaching the server for `timeout_seconds`, or no answer within
`timeout_seconds` after the last byte arrived. `rate_limit` (bytes/s) is for all transfers
together: a token bucket in the READFUNCTION pauses a transfer until its bytes are due
(pacing.py). Each transfer runs in a slot: a reused handle with its heartbeat (slots.py).

The owner calls `start` and then `perform` in a loop on one thread (the uploader's transfer
thread); `put` does both for one file (the `upload` command and tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from urllib.parse import SplitResult

import pycurl

from ..heartbeats import Heartbeat
from ..items import Item
from .api import SignedUrl
from .body import Body, FileChanged, FileGone, NotRegular, Opener, Sent, etag_matches, open_version
from .curlerrors import Failure, curl_fault
from .faults import Fault, Kind, classify_put, put_reason, retry_after_seconds
from .network import Network, host_port
from .pacing import RateLimit, acknowledged, stall_rate, stalled, unacknowledged
from .slots import Done, Job, Slot

__all__ = ["Done", "FileChanged", "FileGone", "NotRegular", "Sent", "Transfer"]

MAX_TURN_SECONDS = 1.0  # `perform` looks at its deadlines at least this often
LOOK_SECONDS = 0.1  # a transfer whose body is all read: its socket's queue is read this often


class Transfer:
    """The PUT engine; all its methods are called from one thread."""

    def __init__(
        self,
        timeout_seconds: float,
        concurrency: int,
        content_type: str = "",
        *,
        network: Network,
        opener: Opener = os.open,
        min_rate: int = 1024,
        rate_limit: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout = timeout_seconds
        self._network = network
        self._opener = opener
        self._clock = clock
        self._headers = ["Expect:"] + ([f"Content-Type: {content_type}"] if content_type else [])
        self._multi = pycurl.CurlMulti()
        self._slots: list[Slot] = []
        self._by_handle: dict[pycurl.Curl, Slot] = {}
        self._done: list[Done] = []
        self.running = 0  # transfers in flight (read several times a turn: kept, not counted)
        self.limit = RateLimit(rate_limit, clock)
        self.concurrency = concurrency
        self.min_rate = min_rate

    def reconfigure(self, concurrency: int, min_rate: int, rate_limit: int) -> None:
        """A reload: applies to transfers started from now on (the rate limit at once)."""
        self.concurrency, self.min_rate = concurrency, min_rate
        self.limit.set_rate(rate_limit)

    def beats(self) -> list[Heartbeat]:
        return [slot.beat for slot in self._slots]

    def start(
        self, signed: SignedUrl, item: Item, on_progress: Callable[[int], None], tag: object = None
    ) -> None:
        """Begin a PUT of the item's file; its outcome comes out of `perform`. Raises Fault,
        FileGone, FileChanged or NotRegular for a PUT that cannot even begin."""
        try:
            parts = signed.split()
            host, port = parts.hostname or "", parts.port
            url = signed.url.encode("ascii")
        except (ValueError, UnicodeEncodeError) as exc:
            reason = f"the signed URL cannot be used: {type(exc).__name__}"
            raise Fault(Kind.FINAL, reason, where="put") from None
        proxy = self._network.proxy_for(parts.scheme, host, port) or ""
        # The request line exactly as received: libcurl would upper-case %2f, say.
        target = signed.url if proxy and parts.scheme == "http" else _target(parts)
        fd = open_version(item.path, item.snapshot, self._opener)
        slot = self._free_slot()
        body = Body(fd, item.snapshot.size, self.limit.take, on_progress)
        now = self._clock()
        proxy_at = host_port(proxy) if proxy else ""
        slot.job = Job(tag, signed, item, body, host, proxy_at, now, now + self._timeout)
        curl = slot.curl
        try:
            curl.setopt(pycurl.URL, url)
            curl.setopt(pycurl.REQUEST_TARGET, target.encode("ascii"))
            curl.setopt(pycurl.INFILESIZE_LARGE, item.snapshot.size)
            slot.fit_buffer(item.snapshot.size)
            if slot.proxy != proxy:
                curl.setopt(pycurl.PROXY, proxy)
                slot.proxy = proxy
            self._multi.add_handle(curl)
        except pycurl.error:  # a NUL in the URL, say: nothing was sent
            slot.job = None
            os.close(fd)
            raise Fault(Kind.FINAL, "the signed URL cannot be used", where="put") from None
        self.running += 1
        slot.beat.busy()

    def perform(self, wait: float) -> list[Done]:
        """Wait up to `wait` seconds for sockets or deadlines, let libcurl work, and return the
        transfers that ended."""
        wait = min(wait, MAX_TURN_SECONDS, self._next_deadline())
        suggested = self._multi.timeout()
        if suggested >= 0:
            wait = min(wait, suggested / 1000)
        if wait > 0 and self.running:
            self._multi.select(wait)
        self._resume()
        while self._multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, ok, failed = self._multi.info_read()
            for curl in ok:
                self._end(self._by_handle[curl], 0, "")
            for curl, code, message in failed:
                self._end(self._by_handle[curl], code, message)
            if not queued:
                break
        self._check_progress()
        done, self._done = self._done, []
        return done

    def put(
        self, signed: SignedUrl, item: Item, on_progress: Callable[[int], None] = lambda _: None
    ) -> Sent:
        """One PUT, start to end: raises Fault, FileGone, FileChanged or NotRegular."""
        self.start(signed, item, on_progress)
        while True:
            for done in self.perform(MAX_TURN_SECONDS):
                if done.sent is not None:
                    return done.sent
                no_answer = Fault(Kind.SERVICE, "the PUT ended without an answer", where="put")
                raise done.error or no_answer

    # -- inside ---------------------------------------------------------------------------

    def _free_slot(self) -> Slot:
        for slot in self._slots:
            if slot.job is None:
                return slot
        slot = Slot(len(self._slots) + 1, self._clock)
        slot.setup(self._network.ca_file, self._headers, self._timeout)
        self._slots.append(slot)
        self._by_handle[slot.curl] = slot
        return slot

    def _next_deadline(self) -> float:
        now, wait = self._clock(), MAX_TURN_SECONDS
        for slot in self._slots:
            job = slot.job
            if job is None:
                continue
            if not job.answered:
                wait = min(wait, (job.answer_due or job.window_end) - now)
            if job.body.paused:
                wait = min(wait, self.limit.resume_wait(job.body.size - job.body.pos))
        return max(0.0, wait)

    def _resume(self) -> None:
        """Unpause the transfers that the bandwidth limit held, once their bytes are due."""
        for slot in self._slots:
            job = slot.job
            left = job.body.size - job.body.pos if job is not None else 0
            if job is not None and job.body.paused and self.limit.resume_wait(left) <= 0:
                job.body.paused = False
                slot.curl.pause(pycurl.PAUSE_CONT)

    def _check_progress(self) -> None:
        """The stall rule and the answer's deadline, in bytes the server acknowledged."""
        now = self._clock()
        for slot in self._slots:
            job = slot.job
            if job is None:
                continue
            if job.answered:  # the body of the answer, too, must end within the timeout
                if now >= job.answered_at + self._timeout:
                    job.cut = True
                    self._end(slot, 0, "")
                continue
            if job.body.pos == job.body.size:  # all read: in the socket, or at the server
                if job.answer_due is None and now >= job.look_at:
                    self._look(slot, job, now)
                if job.answer_due is not None:
                    if now >= job.answer_due:
                        self._abort(slot, f"no answer from {job.host} within {self._timeout:g} s")
                    continue
            if now >= job.window_end:
                self._check_window(slot, job, now)

    def _look(self, slot: Slot, job: Job, now: float) -> None:
        """How much of the body is still in the socket (an ioctl), on a turn at least
        LOOK_SECONDS after the last look, the first one that long after the body was all read:
        a small body's answer mostly comes before it (delayed ACKs keep a small body "in the
        socket" until the answer, so looking at every turn cost 2.5 ioctls a file). Once none is
        left, every byte is at the server, and the answer is due within the timeout."""
        if not job.look_at:  # just all read
            job.look_at = now + LOOK_SECONDS
            return
        job.look_at = now + LOOK_SECONDS
        queued = unacknowledged(slot.curl)
        if queued < job.unacknowledged:
            slot.beat.progress()  # the buffer drains: the link is alive
        job.unacknowledged = queued
        if not queued:
            job.answer_due = now + self._timeout

    def _check_window(self, slot: Slot, job: Job, now: float) -> None:
        """At the end of each window of `timeout` seconds: fewer than `min_rate` bytes/s went
        in it (connecting aside: CONNECTTIMEOUT covers that) is a stall."""
        acked = acknowledged(slot.curl)
        connected = slot.curl.getinfo(pycurl.PRETRANSFER_TIME) > 0
        rate = stall_rate(self.min_rate, self.limit.rate, self.concurrency)
        if connected and stalled(acked, job.window_bytes, rate, self._timeout):
            self._abort(
                slot,
                f"fewer than {rate} bytes/s went to {job.host} for {self._timeout:g} s"
                " (min_upload_rate, request_timeout_seconds)",
            )
            return
        job.window_end, job.window_bytes = now + self._timeout, acked

    def _abort(self, slot: Slot, why: str) -> None:
        self._multi.remove_handle(slot.curl)
        fault = Fault(Kind.SERVICE, f"PUT to storage failed: {why}", where="put")
        self._finish(slot, None, fault)

    def _end(self, slot: Slot, code: int, message: str) -> None:
        job = slot.job
        if job is None:
            raise RuntimeError(f"PUT engine: slot {slot.beat.name} ended without a transfer")
        self._multi.remove_handle(slot.curl)
        try:
            sent = self._outcome(slot, job, code, message)
        except Fault as exc:  # FileChanged is one
            self._finish(slot, None, exc)
        else:
            self._finish(slot, sent, None)

    def _outcome(self, slot: Slot, job: Job, code: int, message: str) -> Sent:
        curl, body = slot.curl, job.body
        if body.failure is not None:
            raise body.failure
        if code and not job.cut:
            raise curl_fault(self._failure(curl, job, code, message))
        seconds = self._clock() - job.started
        status = curl.getinfo(pycurl.RESPONSE_CODE)
        expired = job.signed.expires_at is not None and time.time() >= job.signed.expires_at
        kind = classify_put(status, job.answer, expired)
        if kind is not None:
            wait = retry_after_seconds(job.retry_after, time.time())
            raise Fault(kind, put_reason(status, job.answer), status, wait, where="put")
        if body.changed(job.item.snapshot):
            raise FileChanged("the file changed while it was being sent")
        md5 = body.md5.hexdigest()
        verified = etag_matches(job.etag, md5)
        if verified is False:
            reason = (
                f"the storage's ETag {job.etag.strip(chr(34))} is not the MD5 of the bytes sent"
                f" ({md5}): the stored object may be corrupt"
            )
            raise Fault(Kind.FILE, reason, status, where="put")
        return Sent(status, seconds, job.etag.strip('"'), body.sha256.hexdigest(), verified)

    def _failure(self, curl: pycurl.Curl, job: Job, code: int, message: str) -> Failure:
        return Failure(
            code,
            message,
            job.host,
            job.proxy,
            connect_code=curl.getinfo(pycurl.HTTP_CONNECTCODE),
            os_errno=curl.getinfo(pycurl.OS_ERRNO),
            verify_result=curl.getinfo(pycurl.SSL_VERIFYRESULT),
            proxy_verify_result=curl.getinfo(pycurl.PROXY_SSL_VERIFYRESULT) if job.proxy else 0,
            timeout_seconds=self._timeout,
            connected=curl.getinfo(pycurl.CONNECT_TIME) > 0,
        )

    def _finish(self, slot: Slot, sent: Sent | None, error: Fault | None) -> None:
        job = slot.job
        if job is None:
            raise RuntimeError(f"PUT engine: slot {slot.beat.name} finished without a transfer")
        slot.job = None
        self.running -= 1
        slot.beat.idle()
        os.close(job.body.fd)
        self._done.append(Done(job.tag, job.item, sent, error))


def _target(parts: SplitResult) -> str:
    """The request target as the URL spells it (urlsplit keeps every escape as written)."""
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
