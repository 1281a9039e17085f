"""Stage 4b, the PUT engine: libcurl's multi interface, on one thread, many transfers at once.

Each transfer sends one checked version of a file (body.py) to its signed URL, used exactly as
received, with an exact Content-Length (also 0: UPLOAD with INFILESIZE_LARGE, never chunked), an
empty `Expect:` (no 100-continue stall), no Content-Type unless configured, NOSIGNAL (threads),
the proxy `Network` chose for the URL (`""`: none, so libcurl never reads the environment) and
the CA file both clients trust. A slow link is not a failure: only a stall is, fewer than
`min_rate` bytes/s for `timeout_seconds` (LOW_SPEED_*), or no answer within `timeout_seconds`
after the last byte. `rate_limit` (bytes/s) is for all transfers together: a token bucket in
the READFUNCTION that pauses a transfer until its bytes are due.

The owner calls `start` and then `perform` in a loop on one thread (the uploader's transfer
thread); `put` does both for one file (the `upload` command and tests).
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import pycurl

from . import __version__
from .api import SignedUrl
from .body import Body, FileChanged, FileGone, NotRegular, Opener, Sent, etag_matches, open_version
from .curlerrors import Failure, curl_fault
from .faults import Fault, Kind, classify_put, put_reason, retry_after_seconds
from .health import Heartbeat
from .items import Item
from .network import DEFAULT_PORTS, Network

__all__ = ["Done", "FileChanged", "FileGone", "NotRegular", "RateLimit", "Sent", "Transfer"]

ANSWER_LIMIT = 64 * 1024  # of an error body kept for its S3 code and message
BURST_SECONDS = 0.25  # the bandwidth limit's bucket holds this much of a second's bytes
MAX_TURN_SECONDS = 1.0  # `perform` looks at its deadlines at least this often


class RateLimit:
    """A token bucket: `rate` bytes per second for every PUT together (0: no limit)."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = clock()
        self.rate = rate
        self._tokens = self._capacity()

    def _capacity(self) -> float:
        return max(1.0, self.rate * BURST_SECONDS)

    def set_rate(self, rate: int) -> None:
        self.rate = rate
        self._tokens = min(self._tokens, self._capacity())

    def take(self, want: int) -> int:
        """How many of `want` bytes may be sent now (taken from the bucket)."""
        if not self.rate:
            return want
        now = self._clock()
        self._tokens = min(self._capacity(), self._tokens + (now - self._at) * self.rate)
        self._at = now
        got = min(want, int(self._tokens))
        self._tokens -= got
        return got

    def wait(self, want: int) -> float:
        """Seconds until `want` bytes (at most a bucketful) may go."""
        if not self.rate:
            return 0.0
        missing = min(want, self._capacity()) - self._tokens
        return max(0.0, missing / self.rate - (self._clock() - self._at))


@dataclass(slots=True)
class Job:
    """One transfer in flight."""

    tag: object  # the owner's (the uploader's ticket)
    signed: SignedUrl
    item: Item
    body: Body
    host: str
    proxy: str  # "" when direct
    started: float
    window_end: float = 0.0  # the stall rule's window: min_rate x timeout bytes must go in it
    window_bytes: int = 0  # acknowledged by the server when the window began
    unacknowledged: int = 0  # in the socket's buffer, at the last look
    answer_due: float | None = None  # every byte arrived: the answer must come by then
    answered: bool = False
    etag: str = ""
    retry_after: str | None = None
    answer: bytes = b""


@dataclass(frozen=True, slots=True)
class Done:
    tag: object
    item: Item
    sent: Sent | None
    error: Exception | None  # Fault, FileGone, FileChanged or NotRegular


class Slot:
    """One reusable libcurl handle (its connection stays in the multi's cache) and the heartbeat
    the watchdog reads for it (put-1, put-2...): a hung transfer shows as its slot falling silent.
    """

    def __init__(self, number: int, clock: Callable[[], float]) -> None:
        self.curl = pycurl.Curl()
        self.beat = Heartbeat(f"put-{number}", clock)
        self.job: Job | None = None
        self.proxy: str | None = None  # as last set on the handle

    def read(self, n: int) -> bytes | int:
        assert self.job is not None
        self.beat.progress()
        return self.job.body.read(n)

    def header(self, line: bytes) -> None:
        job = self.job
        if job is None:
            return
        self.beat.progress()
        if line.startswith(b"HTTP/"):  # a new answer (a proxy's to CONNECT comes first)
            job.etag, job.retry_after = "", None
            job.answered = job.body.pos == job.body.size
            return
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"etag":
            job.etag = value.strip().decode("latin-1")
        elif name == b"retry-after":
            job.retry_after = value.strip().decode("latin-1")

    def write(self, data: bytes) -> None:
        job = self.job
        if job is not None and len(job.answer) < ANSWER_LIMIT:
            job.answer += data[: ANSWER_LIMIT - len(job.answer)]


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
        self.limit = RateLimit(rate_limit, clock)
        self.concurrency = concurrency
        self.min_rate = min_rate

    def reconfigure(self, concurrency: int, min_rate: int, rate_limit: int) -> None:
        """A reload: applies to transfers started from now on (the rate limit at once)."""
        self.concurrency, self.min_rate = concurrency, min_rate
        self.limit.set_rate(rate_limit)

    @property
    def running(self) -> int:
        return sum(slot.job is not None for slot in self._slots)

    def beats(self) -> list[Heartbeat]:
        return [slot.beat for slot in self._slots]

    def start(
        self, signed: SignedUrl, item: Item, on_progress: Callable[[int], None], tag: object = None
    ) -> None:
        """Begin a PUT of the item's file; its outcome comes out of `perform`. Raises Fault,
        FileGone, FileChanged or NotRegular for a PUT that cannot even begin."""
        try:
            parts = urlsplit(signed.url)
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
        slot.job = Job(tag, signed, item, body, host, proxy and f"{_host_port(proxy)}", 0.0)
        curl = slot.curl
        try:
            curl.setopt(pycurl.URL, url)
            curl.setopt(pycurl.REQUEST_TARGET, target.encode("ascii"))
            curl.setopt(pycurl.INFILESIZE_LARGE, item.snapshot.size)
            if slot.proxy != proxy:
                curl.setopt(pycurl.PROXY, proxy)
                slot.proxy = proxy
            self._multi.add_handle(curl)
        except pycurl.error:  # a NUL in the URL, say: nothing was sent
            slot.job = None
            os.close(fd)
            raise Fault(Kind.FINAL, "the signed URL cannot be used", where="put") from None
        slot.beat.busy()
        slot.job.started = self._clock()
        slot.job.window_end = slot.job.started + self._timeout

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
                if done.error is not None:
                    raise done.error
                assert done.sent is not None
                return done.sent

    # -- inside ---------------------------------------------------------------------------

    def _free_slot(self) -> Slot:
        for slot in self._slots:
            if slot.job is None:
                return slot
        slot = Slot(len(self._slots) + 1, self._clock)
        self._setup(slot)
        self._slots.append(slot)
        self._by_handle[slot.curl] = slot
        return slot

    def _setup(self, slot: Slot) -> None:
        """The options every PUT of this handle shares, set once."""
        c, ca = slot.curl, self._network.ca_file
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.UPLOAD, 1)
        c.setopt(pycurl.PATH_AS_IS, 1)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)  # a socket per transfer
        c.setopt(pycurl.HTTPHEADER, self._headers)
        c.setopt(pycurl.USERAGENT, f"productiv-watcher/{__version__}")
        c.setopt(pycurl.CAINFO, ca)
        c.setopt(pycurl.PROXY_CAINFO, ca)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(self._timeout * 1000)))
        c.setopt(pycurl.READFUNCTION, slot.read)
        c.setopt(pycurl.SEEKFUNCTION, lambda offset, origin: _seek(slot, offset, origin))
        c.setopt(pycurl.HEADERFUNCTION, slot.header)
        c.setopt(pycurl.WRITEFUNCTION, slot.write)

    def _stall_rate(self) -> int:
        """min_rate, or less when the bandwidth limit's share per transfer is lower: a limit
        that the operator set must never look like a stall."""
        if not self.limit.rate:
            return self.min_rate
        return max(1, min(self.min_rate, self.limit.rate // (2 * max(1, self.concurrency))))

    def _next_deadline(self) -> float:
        now, wait = self._clock(), MAX_TURN_SECONDS
        for slot in self._slots:
            job = slot.job
            if job is None:
                continue
            if not job.answered:
                wait = min(wait, (job.answer_due or job.window_end) - now)
            if job.body.paused:
                wait = min(wait, self.limit.wait(job.body.size - job.body.pos))
        return max(0.0, wait)

    def _resume(self) -> None:
        """Unpause the transfers that the bandwidth limit held, once their bytes are due."""
        for slot in self._slots:
            job = slot.job
            if job is not None and job.body.paused and self.limit.wait(1) <= 0:
                job.body.paused = False
                slot.curl.pause(pycurl.PAUSE_CONT)

    def _check_progress(self) -> None:
        """The stall rule and the answer's deadline, counted in bytes the server acknowledged:
        libcurl's own low-speed rule counts bytes written to the socket, and a slow link drains
        a send buffer of megabytes long after libcurl's last write (a stall to libcurl)."""
        now = self._clock()
        for slot in self._slots:
            job = slot.job
            if job is None or job.answered:
                continue
            if job.body.pos == job.body.size:  # all read: in the socket, or at the server
                unacknowledged = _unacknowledged(slot.curl)
                if unacknowledged < job.unacknowledged:
                    slot.beat.progress()  # the buffer drains: the link is alive
                job.unacknowledged = unacknowledged
                if not unacknowledged:
                    job.answer_due = job.answer_due or now + self._timeout
                    if now >= job.answer_due:
                        self._abort(slot, f"no answer from {job.host} within {self._timeout:g} s")
                    continue
            if now >= job.window_end:
                self._check_window(slot, job, now)

    def _check_window(self, slot: Slot, job: Job, now: float) -> None:
        """At the end of each window of `timeout` seconds: fewer than `min_rate` bytes/s went
        in it (connecting aside: CONNECTTIMEOUT covers that) is a stall."""
        acked = slot.curl.getinfo(pycurl.SIZE_UPLOAD_T) - _unacknowledged(slot.curl)
        connected = slot.curl.getinfo(pycurl.PRETRANSFER_TIME) > 0
        rate = self._stall_rate()
        if connected and acked - job.window_bytes < rate * self._timeout:
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
        assert job is not None
        self._multi.remove_handle(slot.curl)
        try:
            sent = self._outcome(slot, job, code, message)
        except (Fault, FileChanged) as exc:
            self._finish(slot, None, exc)
        else:
            self._finish(slot, sent, None)

    def _outcome(self, slot: Slot, job: Job, code: int, message: str) -> Sent:
        curl, body = slot.curl, job.body
        if body.failure is not None:
            raise body.failure
        if code:
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
        )

    def _finish(self, slot: Slot, sent: Sent | None, error: Exception | None) -> None:
        job = slot.job
        assert job is not None
        slot.job = None
        slot.beat.idle()
        os.close(job.body.fd)
        self._done.append(Done(job.tag, job.item, sent, error))


def _unacknowledged(curl: pycurl.Curl) -> int:
    """Bytes of the transfer's socket that the peer has not acknowledged yet (Linux)."""
    fd = curl.getinfo(pycurl.ACTIVESOCKET)
    if fd < 0:
        return 0
    try:
        queued = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(queued, sys.byteorder, signed=True)


def _seek(slot: Slot, offset: int, origin: int) -> int:
    return slot.job.body.seek(offset, origin) if slot.job else pycurl.SEEKFUNC_FAIL


def _target(parts: SplitResult) -> str:
    """The request target as the URL spells it (urlsplit keeps every escape as written)."""
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or DEFAULT_PORTS.get(parts.scheme, 80)}"
