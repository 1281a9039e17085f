"""systemd's notify protocol through sdnotify: READY, STATUS, WATCHDOG, STOPPING.

Silent when NOTIFY_SOCKET is unset (the service logs at start whether it is). Abstract sockets
(`@name`) work: sdnotify maps the `@` to a leading NUL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

import sdnotify

from ..logs import REDACT


class Notifier(Protocol):
    """The seam the service talks to."""

    enabled: bool
    watchdog_seconds: float | None  # ping this often, or None when systemd asked for no pings

    def send(self, *lines: str) -> None: ...


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of WATCHDOG_USEC, when it is meant for this process (WATCHDOG_PID unset or ours)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not (usec.isascii() and usec.isdigit()) or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2_000_000


class SystemdNotifier:
    """Sends to $NOTIFY_SOCKET; does nothing when it is unset."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.watchdog_seconds = watchdog_interval(os.environ, os.getpid()) if self.enabled else None
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            # sdnotify encodes as latin-1: keep the text to ASCII. One line per assignment: a
            # newline in a status text would forge another (WATCHDOG=1, MAINPID=...).
            text = "\n".join(" ".join(REDACT(line).split("\n")) for line in lines)
            text = text.encode("ascii", "replace").decode("ascii")
            self._notifier.notify(text)
