"""The values that flow through the pipeline: where a file is, which version, its history."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

Identity = tuple[int, int]  # (st_dev, st_ino): a file or folder, whatever its name


@dataclass(frozen=True, slots=True)
class Spot:
    """A path in the drop folder and what it means: its name for the API and its type."""

    path: Path
    rel: str  # relative to drop_dir, as logs and sidecars show it (e.g. "contracts/a.csv")
    name: str  # the basename, the name sent to the API
    file_type: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One version of one file: if any field changes, the file is another version."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Snapshot:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Item:
    """A stable file on its way to done/ or failed/."""

    spot: Spot
    snapshot: Snapshot
    attempts: int = 0  # tries refused for reasons of the file's own (counts to max_attempts)
    puts: int = 0  # PUT requests made, as the failed/ sidecar reports them
    expired: int = 0  # signed URLs in a row that the storage found expired
    noticed_at: float = 0.0  # monotonic: when the stabiliser first saw this version
    marker: Identity | None = None  # its ready marker, removed after the move (markers.py)
    late: bool = False  # in done/ already, sent again after a late write (latewrite.py)

    @property
    def path(self) -> Path:
        return self.spot.path

    def retried(self) -> Item:
        return replace(self, attempts=self.attempts + 1, expired=0)

    def sending(self) -> Item:
        return replace(self, puts=self.puts + 1)

    def expired_again(self) -> Item:
        return replace(self, expired=self.expired + 1)


def display(text: str) -> str:
    """A name fit for logs and JSON: bytes that are not UTF-8 are shown as \\xNN escapes (and a
    lone surrogate that stands for no byte, from a JSON text say, as \\udNNN)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """A text for a command's output on a terminal: `display`, with every character that is not
    printable (a newline, an escape sequence, a bidi override) as its escape, so that a file's
    name can neither forge a line nor rewrite the screen."""
    shown = display(text)
    if shown.isprintable():
        return shown
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)


def utc_iso(epoch: float) -> str:
    """A time as receipts, sidecars, the status file and the lock file show it (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
