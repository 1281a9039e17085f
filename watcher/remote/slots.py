"""The PUT engine's slots: a reusable libcurl handle each, with the transfer it carries.

A slot's handle is set up once (the options every PUT shares) and keeps its connection in the
multi's cache; its callbacks (READFUNCTION, SEEKFUNCTION, HEADERFUNCTION, WRITEFUNCTION) serve
whichever transfer it holds. Each slot has the heartbeat the watchdog reads for it (put-1,
put-2...): a hung transfer shows as its slot falling silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pycurl

from .. import __version__
from ..heartbeats import Heartbeat
from ..items import Item
from .api import SignedUrl
from .body import ABORT, Body, Sent
from .faults import Fault

ANSWER_LIMIT = 64 * 1024  # of an answer's body, kept for an S3 error's code and message
DEFAULT_BUFFER = 64 * 1024  # libcurl's upload buffer, and so the most READFUNCTION is asked for
# A large file is read in blocks of LARGE_BUFFER: 16 times fewer READFUNCTION calls than with
# the default, 12 % less CPU per GiB sent (measured). Only from LARGE_FILE on, far more than the
# socket buffers hold: libcurl reads that much further ahead, and a smaller body could then be
# all read before a storage's early answer, which would change how it is judged.
LARGE_BUFFER = 1024 * 1024
LARGE_FILE = 64 * 1024 * 1024
SEEK_FAIL: int = pycurl.SEEKFUNC_FAIL


@dataclass(slots=True)
class Job:
    """One transfer in flight."""

    tag: object  # the owner's (the uploader's ticket)
    signed: SignedUrl
    item: Item
    body: Body
    host: str
    proxy: str  # host:port, "" when direct
    started: float
    window_end: float  # the stall rule's window: min_rate x timeout bytes must arrive in it
    window_bytes: int = 0  # acknowledged by the server when the window began
    unacknowledged: int = 0  # in the socket's buffer, at the last look
    look_at: float = 0.0  # the next look at the socket's buffer (0: the body is not all read)
    answer_due: float | None = None  # every byte arrived (no need to look again): answer by then
    answered: bool = False
    answered_at: float = 0.0  # when the answer's status line came
    cut: bool = False  # the answer's body was cut short (too long, or too slow): judged without it
    etag: str = ""
    retry_after: str | None = None
    answer: bytes = b""


@dataclass(frozen=True, slots=True)
class Done:
    tag: object
    item: Item
    sent: Sent | None
    error: Fault | None  # FileGone, FileChanged and NotRegular are Faults too


class Slot:
    """One handle and its transfer; called on the engine's thread only."""

    def __init__(self, number: int, clock: Callable[[], float]) -> None:
        self.curl = pycurl.Curl()
        self._clock = clock
        self.beat = Heartbeat(f"put-{number}", clock)
        self.job: Job | None = None
        self.proxy: str | None = None  # as last set on the handle
        self.buffer = DEFAULT_BUFFER  # UPLOAD_BUFFERSIZE, as last set on the handle

    def setup(self, ca_file: str, headers: list[str], timeout_seconds: float) -> None:
        """The options every PUT of this handle shares, set once. No LOW_SPEED_* and no
        TIMEOUT: the engine's stall rule decides (pacing.py); only connecting has a limit."""
        c = self.curl
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.UPLOAD, 1)  # PUT, with INFILESIZE_LARGE: an exact Content-Length
        c.setopt(pycurl.PATH_AS_IS, 1)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)  # a socket per transfer
        c.setopt(pycurl.HTTPHEADER, headers)
        c.setopt(pycurl.USERAGENT, f"productiv-watcher/{__version__}")
        c.setopt(pycurl.CAINFO, ca_file)
        c.setopt(pycurl.PROXY_CAINFO, ca_file)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(timeout_seconds * 1000)))
        c.setopt(pycurl.READFUNCTION, self.read)
        c.setopt(pycurl.SEEKFUNCTION, self.seek)
        c.setopt(pycurl.HEADERFUNCTION, self.header)
        c.setopt(pycurl.WRITEFUNCTION, self.write)

    def fit_buffer(self, size: int) -> None:
        """The upload buffer for a body of `size` bytes (set only when it changes)."""
        wanted = LARGE_BUFFER if size >= LARGE_FILE else DEFAULT_BUFFER
        if self.buffer != wanted:
            self.curl.setopt(pycurl.UPLOAD_BUFFERSIZE, wanted)
            self.buffer = wanted

    def read(self, n: int) -> bytes | int:
        if self.job is None:
            return ABORT  # libcurl reads only for the transfer this slot runs
        self.beat.progress()
        return self.job.body.read(n)

    def seek(self, offset: int, origin: int) -> int:
        job = self.job
        if job is None:
            return SEEK_FAIL
        job.answer_due, job.look_at = None, 0.0  # sent again (a fresh connection): due anew
        return job.body.seek(offset, origin)

    def header(self, line: bytes) -> None:
        job = self.job
        if job is None:
            return
        self.beat.progress()
        if line.startswith(b"HTTP/"):  # a new answer (a proxy's to CONNECT comes first)
            job.etag, job.retry_after = "", None
            if line[8:].lstrip()[:1] == b"1":  # 100 Continue: not the answer, which is still due
                return
            job.answered = job.body.pos == job.body.size
            job.answered_at = self._clock()
            return
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"etag":
            job.etag = value.strip().decode("latin-1")
        elif name == b"retry-after":
            job.retry_after = value.strip().decode("latin-1")

    def write(self, data: bytes) -> int | None:
        """Keep the answer's first ANSWER_LIMIT bytes; beyond them the transfer ends (a
        storage that answers an endless body is judged on its status and what came)."""
        job = self.job
        if job is None:
            return None
        room = ANSWER_LIMIT - len(job.answer)
        job.answer += data[:room]
        if len(data) > room:
            job.cut = True
            return 0  # CURLE_WRITE_ERROR: libcurl stops reading
        return None
