"""inotify on done/ and its type folders, for late writes: which names were written to.

Only writes and removals are asked for (IN_MODIFY, IN_CLOSE_WRITE, IN_ATTRIB for a touched
mtime, IN_DELETE and IN_MOVED_FROM for a name gone). The daemon's own moves into done/ are
IN_MOVED_TO, which is not asked for: a burst of 20,000 moves costs no event here. Events are
hints, never facts: the late-write watch stats the name and compares. A queue overflow is
reported as such (the caller stats every recent name).

A plain ctypes binding rather than watchdog's observer: no dispatcher thread, no event objects,
and only the folders that hold recent names are watched. Linux only: elsewhere (or with the
watch limit used up) `add` says False and the periodic stat is the whole watch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import struct

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_DELETE
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(None, use_errno=True)
_init = getattr(_libc, "inotify_init1", None)  # None: not Linux
_add = getattr(_libc, "inotify_add_watch", None)


def parse(data: bytes) -> list[tuple[int, int, str]]:
    """(watch descriptor, mask, name) of each event in one read of an inotify descriptor."""
    events, offset = [], 0
    while offset + _HEADER.size <= len(data):
        wd, mask, _, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        raw = data[offset : offset + length].rstrip(b"\0")
        offset += length
        events.append((wd, mask, os.fsdecode(raw)))
    return events


class DoneEvents:
    """One inotify descriptor plus a wake-up socket pair, read by the late-write thread only
    (`wake` from any thread)."""

    def __init__(self) -> None:
        self._fd = -1
        if _init is not None:
            fd = _init(os.O_NONBLOCK | os.O_CLOEXEC)
            self._fd = fd if fd >= 0 else -1
        self._folders: dict[int, str] = {}  # watch descriptor -> folder
        self._watched: set[str] = set()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._reader, select.POLLIN)
        if self._fd >= 0:
            self._poll.register(self._fd, select.POLLIN)

    def add(self, folder: str) -> int:
        """Watch this folder (once); 0 when it is watched, else the errno that refused it."""
        if folder in self._watched:
            return 0
        if self._fd < 0 or _add is None:
            return errno.ENOSYS
        wd = _add(self._fd, os.fsencode(folder), MASK | IN_ONLYDIR | IN_DONT_FOLLOW)
        if wd < 0:
            return ctypes.get_errno()
        self._folders[wd] = folder
        self._watched.add(folder)
        return 0

    def wake(self) -> None:
        """Any thread: end the current `wait` at once."""
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def wait(self, seconds: float) -> tuple[list[str], bool]:
        """Wait up to `seconds` for events or a wake-up: (paths written to or gone, as text,
        whether events were lost)."""
        self._poll.poll(max(0.0, seconds) * 1000)
        with contextlib.suppress(OSError):
            while self._reader.recv(4096):
                pass
        paths: list[str] = []
        lost = False
        while self._fd >= 0:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            for wd, mask, name in parse(data):
                lost = lost or bool(mask & IN_Q_OVERFLOW)
                folder = self._folders.get(wd)
                if mask & IN_IGNORED and folder is not None:  # the folder went
                    del self._folders[wd]
                    self._watched.discard(folder)
                elif folder is not None and name:
                    paths.append(f"{folder}{os.sep}{name}")
        return paths, lost

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._reader.close()
        self._writer.close()
