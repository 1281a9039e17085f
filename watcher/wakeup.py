"""The main loop's one wake-up: a non-blocking socket pair it waits on with a timeout.

Signals (through `signal.set_wakeup_fd`, written by the C-level handler) and threads (`set`)
write a byte; the main loop's `wait` returns at once and drains them. Nothing here takes a
lock, so a signal that lands anywhere in the main thread cannot deadlock it (PITFALLS 29): a
`threading.Event` set from a handler re-enters the lock its own `wait` holds.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading


class Wakeup:
    """A self-pipe: `set` from anywhere, `wait` on the main loop's thread only."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._signals = False

    def route_signals(self) -> None:
        """Main thread only: a signal writes to this pipe, whichever thread it interrupts."""
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._signals = True

    def set(self) -> None:
        """Any thread: wake the loop. A full buffer means a wake-up is pending already."""
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def wait(self, seconds: float) -> None:
        """Return after `seconds`, or at once if woken since the last `wait`; drain the pipe."""
        select.select([self._reader], [], [], max(0.0, seconds))
        with contextlib.suppress(OSError):
            while self._reader.recv(4096):
                pass

    def close(self) -> None:
        """Signals stop writing here first (main thread), then the pair is closed."""
        if self._signals and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
            self._signals = False
        if not self._signals:
            self._reader.close()
            self._writer.close()
