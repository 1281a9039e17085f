"""Knowing when the watch has gone deaf: a drop folder whose stat hangs (a dead network mount),
and a canary file whose event never arrives (a mount that stopped sending events)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from ..disk.folders import kind_of
from ..items import Identity
from ..logs import event

log = logging.getLogger(__name__)

CANARY_NAME = ".productiv-watcher-canary"
# Made anew, never opened if anything is there: a producer's symlink is not followed (to the
# journal, say), nor its FIFO waited on.
CANARY_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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
        self._seen = False
        try:
            self._clear()
            os.close(os.open(self.path, CANARY_FLAGS, 0o600))
        except OSError:
            return heard  # the folder is gone or read-only (the identity check says so), or a
            # producer planted something again at once: the next period tries again
        self._planted = now
        return heard

    def _clear(self) -> None:
        """Remove the last canary, or what a producer put at its name (the name is reserved),
        saying so: a symlink, FIFO or folder is never followed or opened."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(self.path)
        else:
            os.unlink(self.path)
        if not stat.S_ISREG(st.st_mode):
            why = f"{self.path} was a {kind_of(st.st_mode)}, not the daemon's canary: removed"
            event(log, "canary_planted", why, level=logging.WARNING, canary=str(self.path))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
