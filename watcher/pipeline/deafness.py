"""Knowing when the watch has gone deaf: a drop folder whose stat hangs (a dead network mount),
and a canary file whose event never arrives (a mount that stopped sending events)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from ..disk.folders import kind_of
from ..disk.renames import clear_reserved
from ..items import Identity
from ..logs import event

log = logging.getLogger(__name__)

CANARY_NAME = ".productiv-watcher-canary"
# Made anew, never opened if anything is there (O_EXCL): a producer's symlink is not followed
# (to the journal, say), nor its FIFO waited on.
CANARY_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


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
        self._failing = False  # said once, until a canary is made again

    def seen(self) -> None:
        """Called from the watchdog dispatcher thread for any event on the canary's path."""
        self._seen = True

    def tick(self) -> bool:
        """Plant a new canary when one is due; False when the last one went unheard."""
        now = self._clock()
        if self._planted is not None and now - self._planted < self.period:
            return True
        heard = self._seen or self._planted is None
        self._seen = False  # before the creation: its event may come at once
        try:
            self._clear()
            os.close(os.open(self.path, CANARY_FLAGS, 0o600))
        except OSError as exc:
            # The folder is gone or read-only (the identity check says so), or what a producer
            # put at the name cannot be cleared: no canary, so none is judged at the next check.
            self._planted = None
            if exc.errno != errno.ENOENT and not self._failing:
                self._failing = True
                why = f"cannot make {self.path}: {exc.strerror}; no canary until it can be made"
                event(log, "canary_planted", why, level=logging.WARNING, canary=str(self.path))
            return heard
        self._planted, self._failing = now, False
        return heard

    def _clear(self) -> None:
        """Clear the canary's name of the last canary, or of what a producer put there."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        how = clear_reserved(self.path, st)
        if not stat.S_ISREG(st.st_mode):
            why = f"{self.path} was a {kind_of(st.st_mode)}, not the daemon's canary: {how}"
            event(log, "canary_planted", why, level=logging.WARNING, canary=str(self.path))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
