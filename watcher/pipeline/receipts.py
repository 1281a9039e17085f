"""The receipts journal: one JSON line per outcome, an audit trail that outlives the logs.

`receipts.jsonl` in the state folder, appended and fsynced before the outcome is logged, rotated
by size into `receipts.jsonl.1` ... `.N`. Readable with `jq`; `productiv-watcher status FILE`
searches it, newest first.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..disk.owners import adopt_open, make_folders
from ..logs import REDACT

NAME = "receipts.jsonl"


def write_whole(fd: int, data: bytes) -> None:
    """Append all of `data` and fsync it, or none of it: a nearly full disk takes part of a
    write without an error (and NFS may say ENOSPC only at the fsync), and a torn line left
    behind would swallow the next receipt too. On any failure the file is cut back to where it
    was, and the error raised."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


def _ends_a_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


class Journal:
    """Append-only and thread-safe; `append` returns once the lines are on disk."""

    def __init__(self, folder: Path, max_bytes: int, keep: int) -> None:
        self.folder = folder
        self.path = folder / NAME
        self._max_bytes = max_bytes
        self._keep = keep
        self._lock = threading.Lock()

    def append(self, docs: list[dict[str, Any]]) -> None:
        """Write the lines, flush and fsync once for all of them, rotating first if need be."""
        if not docs:
            return
        lines = "".join(json.dumps(REDACT.doc(d), ensure_ascii=False) + "\n" for d in docs)
        with self._lock:
            make_folders(self.folder)
            self._rotate_if_full(len(lines))
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                adopt_open(fd, self.folder)
                if not _ends_a_line(fd):  # a line a crash tore: end it, so it takes only itself
                    lines = "\n" + lines
                write_whole(fd, lines.encode())
            finally:
                os.close(fd)

    def _rotate_if_full(self, adding: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + adding <= self._max_bytes or size == 0:
            return
        for n in range(self._keep - 1, 0, -1):
            older = self.path.with_name(f"{NAME}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{NAME}.{n + 1}"))
        if self._keep > 0:
            os.replace(self.path, self.path.with_name(f"{NAME}.1"))
        else:
            self.path.unlink()

    def newest_first(self) -> Iterator[dict[str, Any]]:
        """Every receipt, newest first, across the rotated files (for `status`)."""
        files = [self.path, *(self.path.with_name(f"{NAME}.{n}") for n in range(1, self._keep + 1))]
        for path in files:
            try:  # a byte that is not UTF-8 (a write torn inside a name) spoils one name only
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except FileNotFoundError:
                continue
            for line in reversed(lines):
                try:
                    receipt = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash: skip it
                if isinstance(receipt, dict):
                    yield receipt
