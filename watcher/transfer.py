"""Stage 4b, the PUT: send exactly one stable version of a file to its signed URL.

The file is opened without following links or blocking, checked to be the very version that
settled, streamed from that descriptor with an exact `Content-Length` (S3 refuses chunked bodies),
and its descriptor checked again afterwards (the finisher checks the path before the move); if it
changed, the upload does not count. The PUT goes through urllib3's pool directly: requests adds
per-request overhead that decides small-file throughput (see the README), and the body, headers
and URL need nothing requests offers.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.exceptions import HTTPError

from .answers import bounded
from .api import SignedUrl
from .faults import Fault, Kind, classify_put, put_reason, retry_after_seconds, transport_retry
from .items import Item, Snapshot
from .network import Network, explain

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
SEND_BLOCK_BYTES = 1024 * 1024  # fewer, larger writes for big bodies; bounds memory per PUT
ANSWER_BYTES = 64 * 1024  # of a PUT's answer: S3's error XML is under 1 KiB, a success empty


class FileGone(Exception):
    """The producer removed the file: forget it."""


class FileChanged(Exception):
    """The file is not the version that settled: let it settle again."""


class NotRegular(Exception):
    """The path is now a link, FIFO, folder...: never opened for reading."""


@dataclass(frozen=True, slots=True)
class Sent:
    status: int
    seconds: float
    etag: str
    sha256: str  # of the bytes sent, computed while streaming


class BoundedReader:
    """Reads exactly `size` bytes of a descriptor; seekable so urllib3 can rewind for a retry.

    A file that grows is cut at `size` (the rest is another version); one that shrinks raises
    FileChanged instead of letting the server wait for bytes that never come. It hashes what it
    reads (SHA-256, for the receipt) without a second read; urllib3 is given the length itself,
    so the body still goes with Content-Length, never chunked.
    """

    def __init__(self, fd: int, size: int, on_read: Callable[[int], None]) -> None:
        self._fd = fd
        self._size = size
        self._pos = 0
        self._on_read = on_read
        self.sha256 = hashlib.sha256()
        # One buffer, reused: a fresh 1 MiB bytes object per block costs page faults that
        # showed up as a third of the large-file throughput. No larger than the file: a 1 MiB
        # buffer for a 16 KiB file was 7 % of the daemon's CPU in the small-file burst.
        self._buffer = memoryview(bytearray(max(1, min(size, SEND_BLOCK_BYTES))))

    def read(self, n: int = -1) -> memoryview:
        """The next block, as a view valid until the next read (urllib3 sends it at once)."""
        want = min(self._size - self._pos, len(self._buffer) if n < 0 else n, len(self._buffer))
        if want <= 0:
            return self._buffer[:0]
        got = os.readv(self._fd, [self._buffer[:want]])
        if not got:
            raise FileChanged("the file shrank while it was being sent")
        block = self._buffer[:got]
        self._pos += got
        self.sha256.update(block)
        self._on_read(self._pos)
        return block

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """urllib3 rewinds to the start for a retry: the hash starts again too."""
        self._pos = os.lseek(self._fd, offset, whence)
        if self._pos == 0:
            self.sha256 = hashlib.sha256()
        return self._pos


Opener = Callable[[Path, int], int]  # (path, flags) -> descriptor, as `os.open`


def open_version(path: Path, expected: Snapshot, opener: Opener = os.open) -> int:
    """A descriptor on the file, provided it is still the regular file that settled.

    The daemon's opener works relative to a descriptor of the file's folder (`Folders.open`),
    so that a type folder swapped for a symlink is refused rather than followed."""
    try:
        fd = opener(path, OPEN_FLAGS)
    except FileNotFoundError:
        raise FileGone from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular("a symlink") from None
        raise Fault(Kind.FINAL, f"cannot read the file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular("not a regular file")
        if Snapshot.of(st) != expected:
            raise FileChanged("the file changed after it settled")
    except BaseException:
        os.close(fd)
        raise
    return fd


class Transfer:
    """Shared by the PUT worker threads: urllib3's pool managers are thread-safe.

    One manager for direct PUTs and one per proxy URL (made on first use), all trusting the
    network's CA file; which one a URL takes is `Network`'s cached decision. Files are opened
    through `opener` (the drop folder's descriptors: see folders.py)."""

    def __init__(
        self,
        timeout_seconds: float,
        concurrency: int,
        content_type: str = "",
        *,
        network: Network,
        opener: Opener = os.open,
    ) -> None:
        self._content_type = content_type
        self._timeout_seconds = timeout_seconds
        self._network = network
        self._opener = opener
        self._pool_kw: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": concurrency,  # the setting's bound: a reload may add workers
            "retries": transport_retry(),
            "timeout": urllib3.Timeout(connect=timeout_seconds, read=timeout_seconds),
            "blocksize": SEND_BLOCK_BYTES,
            "ca_certs": network.ca_file,
        }
        self._pool = urllib3.PoolManager(**self._pool_kw)
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._lock = threading.Lock()

    def _manager(self, proxy: str | None) -> urllib3.PoolManager:
        if proxy is None:
            return self._pool
        manager = self._proxied.get(proxy)
        if manager is None:
            with self._lock:
                manager = self._proxied.get(proxy)
                if manager is None:
                    manager = self._proxied[proxy] = proxy_manager(proxy, self._pool_kw)
        return manager

    def put(
        self, signed: SignedUrl, item: Item, on_progress: Callable[[int], None] = lambda _: None
    ) -> Sent:
        """PUT the item's file to the signed URL; raises Fault, FileGone, FileChanged or
        NotRegular, never anything else, whatever the URL or the storage's answer.

        `on_progress(bytes sent)` is called for every block (status, and the watchdog's sign
        of life)."""
        url = signed.url
        expected = item.snapshot
        fd = open_version(item.path, expected, self._opener)
        try:
            headers = {"Content-Length": str(expected.size)}
            if self._content_type:
                headers["Content-Type"] = self._content_type
            reader = BoundedReader(fd, expected.size, on_progress)
            # File-like enough for urllib3 (read, tell, seek), though not an io class.
            body = cast("IO[bytes]", reader) if expected.size else b""
            # The connection pool directly, not the PoolManager: it would parse the long signed
            # URL once more, with urllib3's slower parser, for every file.
            host, proxy = "", None
            started = time.monotonic()
            try:
                parts = urlsplit(url)
                host, port = parts.hostname or "", parts.port
                proxy = self._network.proxy_for(parts.scheme, host, port)
                target = f"{parts.path}?{parts.query}" if parts.query else parts.path
                if proxy is not None and parts.scheme == "http":
                    target = url  # no tunnel: the proxy's pool is asked for the absolute URL
                pool = self._manager(proxy).connection_from_host(host, port, parts.scheme)
                response = pool.urlopen(
                    "PUT",
                    target or "/",
                    body=body,
                    headers=headers,
                    redirect=False,
                    assert_same_host=False,
                    preload_content=False,  # read bounded: see answers.py
                )
            except HTTPError as exc:
                reason = f"PUT to storage failed: {explain(exc, host, proxy) or _why(exc)}"
                raise Fault(Kind.SERVICE, reason, where="put") from None
            except ValueError as exc:  # a URL that url_problem let through but cannot be sent
                reason = f"the signed URL cannot be used: {type(exc).__name__}"
                raise Fault(Kind.FINAL, reason, where="put") from None
            answer = bounded(response, ANSWER_BYTES, self._timeout_seconds).data
            seconds = time.monotonic() - started
            expired = signed.expires_at is not None and time.time() >= signed.expires_at
            kind = classify_put(response.status, answer, expired)
            if kind is not None:
                wait = retry_after_seconds(response.headers.get("Retry-After"), time.time())
                reason = put_reason(response.status, answer)
                raise Fault(kind, reason, response.status, wait, where="put")
            if Snapshot.of(os.fstat(fd)) != expected:  # the path: the finisher checks it
                raise FileChanged("the file changed while it was being sent")
            etag = response.headers.get("ETag", "").strip('"')
            return Sent(response.status, seconds, etag, reader.sha256.hexdigest())
        finally:
            os.close(fd)


def proxy_manager(proxy: str, pool_kw: dict[str, Any]) -> urllib3.ProxyManager:
    """A manager that tunnels through `proxy` (CONNECT for https), with its credentials as a
    Proxy-Authorization header: urllib3 does not take them from the URL itself."""
    parts = urlsplit(proxy)
    headers = None
    if parts.username is not None:
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers = urllib3.make_headers(proxy_basic_auth=login)
    return urllib3.ProxyManager(proxy, proxy_headers=headers, **pool_kw)


def _why(exc: HTTPError) -> str:
    """A short cause for a network failure, without the URL (its query is a credential)."""
    reason = getattr(exc, "reason", None) or exc
    text = type(reason).__name__
    if isinstance(reason, OSError) and reason.strerror:
        text += f" ({reason.strerror})"
    return text
