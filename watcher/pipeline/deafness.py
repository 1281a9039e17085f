"""Knowing when the watch has gone deaf: a drop folder whose stat hangs (a dead network mount),
and a canary file whose event never arrives (a mount that stopped sending events)."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from ..items import Identity

CANARY_NAME = ".productiv-watcher-canary"


class Hung:
    """The answer of a stat that did not come back in time."""


HUNG = Hung()


class StatProbe:
    """stat() the drop folder on a helper thread, so that a dead NFS mount cannot freeze the
    main loop. While one stat hangs, no second one is started: the answer stays HUNG."""

    def __init__(
        self, path: Path, timeout: float, stat_fn: Callable[[Path], os.stat_result] = os.stat
    ) -> None:
        self._path = path
        self._timeout = timeout
        self._stat = stat_fn
        self._thread: threading.Thread | None = None
        self._answer: Identity | None = None

    def identity(self) -> Identity | Hung | None:
        if self._thread is not None and self._thread.is_alive():
            return HUNG  # the previous stat still has not returned
        self._thread = threading.Thread(target=self._run, name="stat-probe", daemon=True)
        self._thread.start()
        self._thread.join(self._timeout)
        return HUNG if self._thread.is_alive() else self._answer

    def _run(self) -> None:
        try:
            st = self._stat(self._path)
        except OSError:
            self._answer = None
            return
        self._answer = (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class Canary:
    """Every `period`, replace a hidden file in the drop folder; if the observer did not report
    the previous one within a period, the watch is deaf. Never uploaded: its name is ignored."""

    def __init__(self, folder: Path, period: float, clock: Callable[[], float]) -> None:
        self.path = folder / CANARY_NAME
        self.period = period
        self._clock = clock
        self._planted: float | None = None
        self._seen = True

    def seen(self) -> None:
        """Called from the watchdog dispatcher thread for any event on the canary's path."""
        self._seen = True

    def tick(self) -> bool:
        """Plant a new canary when one is due; False when the last one went unheard."""
        now = self._clock()
        if self._planted is not None and now - self._planted < self.period:
            return True
        heard = self._seen or self._planted is None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._seen = False
        try:
            self.path.write_bytes(b"")
        except OSError:
            return heard  # the folder is gone or read-only: the identity check says so
        self._planted = now
        return heard

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
