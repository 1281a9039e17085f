"""systemd's notify protocol (READY, STATUS, STOPPING) through sdnotify; silent without systemd."""

from __future__ import annotations

import os
from typing import Protocol

import sdnotify


class Notifier(Protocol):
    """The seam the service talks to; tests may pass their own."""

    enabled: bool

    def send(self, *lines: str) -> None: ...


class SystemdNotifier:
    """Sends to $NOTIFY_SOCKET (abstract `@` sockets too); does nothing when it is unset."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            # sdnotify encodes as latin-1: keep status text to ASCII.
            text = "\n".join(lines).encode("ascii", "replace").decode("ascii")
            self._notifier.notify(text)
