"""One PUT's body: the checked version of a file, read from its descriptor, hashed as it goes.

The file is opened without following links or blocking, checked to be the very version that
settled, and streamed from that descriptor (never reopened by path) to libcurl's READFUNCTION,
exactly `size` bytes: a file that grows is cut at its settled size (the rest is another version,
which the check after the PUT sees), one that shrinks aborts the PUT rather than letting the
server wait for bytes that never come. SHA-256 (for the receipt) and MD5 (to check the storage's
ETag against) are computed from the same reads.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pycurl

from ..items import Snapshot
from .faults import Fault, Kind

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MD5_ETAG = re.compile(r"[0-9a-f]{32}")
PAUSE: int = pycurl.READFUNC_PAUSE
ABORT: int = pycurl.READFUNC_ABORT
SEEK_OK: int = pycurl.SEEKFUNC_OK
SEEK_FAIL: int = pycurl.SEEKFUNC_FAIL
CANNOT_SEEK: int = pycurl.SEEKFUNC_CANTSEEK

Opener = Callable[[Path, int], int]  # (path, flags) -> descriptor, as `os.open`


class FileGone(Fault):
    """The producer removed the file: forget it."""

    def __init__(self, reason: str = "removed before it was uploaded") -> None:
        super().__init__(Kind.GONE, reason)


class FileChanged(Fault):
    """The file is not the version that settled: let it settle again."""

    def __init__(self, reason: str) -> None:
        super().__init__(Kind.CHANGED, reason)


class NotRegular(Fault):
    """The path is now a link, FIFO, folder...: never opened for reading."""

    def __init__(self, what: str) -> None:
        super().__init__(Kind.NOT_REGULAR, f"{what}, not a regular file")


@dataclass(frozen=True, slots=True)
class Sent:
    status: int
    seconds: float
    etag: str
    sha256: str  # of the bytes sent, computed while streaming
    etag_verified: bool | None = None  # the ETag was a plain MD5 and matched; None: not an MD5


def etag_matches(etag: str, md5: str) -> bool | None:
    """Whether the storage's ETag is the MD5 of the bytes sent: True or False when the ETag is a
    plain 32-hex MD5 (a single PUT without KMS), None when it is something else (KMS, multipart,
    none at all) and proves nothing."""
    tag = etag.strip().removeprefix("W/").strip('"').lower()
    return tag == md5 if MD5_ETAG.fullmatch(tag) else None


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
            raise NotRegular("something else")  # said: "something else, not a regular file"
        if Snapshot.of(st) != expected:
            raise FileChanged("the file changed after it settled")
    except BaseException:
        os.close(fd)
        raise
    return fd


class Body:
    """libcurl's READFUNCTION and SEEKFUNCTION for one PUT; never raises into libcurl.

    `allow(n)` says how many of `n` bytes may go now (the shared bandwidth limit): 0 pauses the
    transfer until the engine resumes it. A failure is kept in `failure` and the PUT aborted.
    """

    def __init__(
        self, fd: int, size: int, allow: Callable[[int], int], on_read: Callable[[int], None]
    ) -> None:
        self.fd = fd
        self.size = size
        self.pos = 0
        self.paused = False
        self.failure: Exception | None = None
        self._allow = allow
        self._on_read = on_read
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()  # noqa: S324 - S3's ETag, not security

    def read(self, n: int) -> bytes | int:
        want = min(n, self.size - self.pos)
        if want <= 0:
            return b""
        allowed = self._allow(want)
        if allowed <= 0:
            self.paused = True
            return PAUSE
        try:
            block = os.read(self.fd, allowed)
        except OSError as exc:
            self.failure = Fault(Kind.FILE, f"cannot read the file: {exc.strerror}", where="put")
            return ABORT
        if not block:
            self.failure = FileChanged("the file shrank while it was being sent")
            return ABORT
        self.pos += len(block)
        self.sha256.update(block)
        self.md5.update(block)
        self._on_read(self.pos)
        return block

    def seek(self, offset: int, origin: int) -> int:
        """libcurl rewinds to the start to send the body again on a fresh connection (a reused
        one that turned out dead): the hashes start again too. Nothing else is supported."""
        if offset != 0 or origin != os.SEEK_SET:
            return CANNOT_SEEK
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
        except OSError:
            return SEEK_FAIL
        self.pos = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()  # noqa: S324
        return SEEK_OK

    def changed(self, expected: Snapshot) -> bool:
        """After the PUT: is the descriptor's file still the version that settled? (The path is
        the finisher's to check, before the move.)"""
        return Snapshot.of(os.fstat(self.fd)) != expected
