"""The main loop's requests (stop, reload) and its one wake-up: a non-blocking socket pair.

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
    """Flags for the main loop plus a self-pipe: `set` from anywhere, `wait` on the main loop."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._poll = select.poll()  # not select(): no limit on the descriptor's number
        self._poll.register(self._reader, select.POLLIN)
        self._signals = False
        self.stops = 0  # stop requests so far: a second one abandons the graceful wait
        self.reload = False  # re-read the settings at the next turn

    def handle_signals(self) -> None:
        """Main thread only: SIGTERM and SIGINT request a stop, SIGHUP a reload. The handler
        sets a flag and nothing else (no lock, no logging); the signal itself wakes the loop,
        whichever thread it interrupted, through set_wakeup_fd."""
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._signals = True
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stops += 1

    def request_stop(self) -> None:
        """From another thread (tests, the demo's embedding): as SIGTERM does."""
        self.stops += 1
        self.set()

    def request_reload(self) -> None:
        """From another thread: as SIGHUP does."""
        self.reload = True
        self.set()

    def set(self) -> None:
        """Any thread: wake the loop. A full buffer means a wake-up is pending already."""
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def wait(self, seconds: float) -> None:
        """Return after `seconds`, or at once if woken since the last `wait`; drain the pipe."""
        self._poll.poll(max(0.0, seconds) * 1000)
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
