"""inotify on done/ and its type folders, for late writes: which names were written to.

Only writes and removals are asked for (IN_MODIFY, IN_CLOSE_WRITE, IN_ATTRIB for a touched
mtime, IN_DELETE and IN_MOVED_FROM for a name gone). The daemon's own moves into done/ are
IN_MOVED_TO, which is not asked for: a burst of 20,000 moves costs no event here. Events are
hints, never facts: the late-write watch stats the name and compares. A queue overflow is
reported as such (the caller stats every recent name).

watchdog's own inotify reader (`InotifyFD`: the descriptor, its thread, the event parsing, the
watches' book-keeping), without its observer: no emitter, no event objects for a dispatcher,
and only the folders that hold recent names are watched. An instance of its own (a kernel
queue of its own: a burst in the drop folder cannot overflow it). Its thread calls back here: a
callback only notes the name and wakes the late-write thread (one exception would leave the
reader deaf, PITFALLS 1). Linux only: elsewhere (or with the watch limit used up) `add` says
why not and the periodic stat is the whole watch.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from watchdog.utils import UnsupportedLibcError

try:
    from watchdog.observers.inotify_c import CallbackId, InotifyFD, Mask
    from watchdog.observers.inotify_c import InotifyConstants as In
except (ImportError, UnsupportedLibcError):  # not Linux: the periodic stat only
    LINUX = False
else:
    LINUX = True

if TYPE_CHECKING:
    from watchdog.observers.inotify_c import InotifyEvent

THREAD = "late_writes_inotify"
JOIN_SECONDS = 5.0


def mask() -> int:
    """What is asked of the kernel for each folder: writes and a name gone, in a real folder
    (IN_ONLYDIR, IN_DONT_FOLLOW: never through a symlink)."""
    wanted = In.IN_MODIFY | In.IN_ATTRIB | In.IN_CLOSE_WRITE | In.IN_MOVED_FROM | In.IN_DELETE
    return wanted | In.IN_ONLYDIR | In.IN_DONT_FOLLOW


class DoneEvents:
    """watchdog's inotify reader with one callback for every watched folder. `add` and `wait`
    are the late-write thread's; `wake` any thread's; the `on_*` callbacks are the reader's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._woken = threading.Event()
        self._written: set[str] = set()  # since the last wait: one entry per name, not per write
        self._lost = False
        self._folders: dict[int, str] = {}  # watch descriptor -> folder
        self._watched: set[str] = set()
        self._reader: InotifyFD | None = None  # started at the first folder (a Service made
        self._refused = 0 if LINUX else errno.ENOSYS  # but never run starts no thread)

    def add(self, folder: str) -> int:
        """Watch this folder (once); 0 when it is watched, else the errno that refused it."""
        if folder in self._watched:
            return 0
        reader = self._reader or self._start()
        if reader is None:
            return self._refused
        try:
            wd = reader.add_callback(os.fsencode(folder), Mask(mask()), self, CallbackId(id(self)))
        except OSError as exc:
            return exc.errno or errno.EIO
        if wd < 0:  # watchdog returns -1 for EACCES instead of raising
            return errno.EACCES
        with self._lock:
            self._folders[wd] = folder
            self._watched.add(folder)
        return 0

    def _start(self) -> InotifyFD | None:
        """watchdog's reader and its thread, None when there can be none (not Linux, closed,
        the user's inotify instances used up: EMFILE), which is then `_refused`."""
        if self._refused:
            return None
        try:
            self._reader = InotifyFD()
        except OSError as exc:
            self._refused = exc.errno or errno.EMFILE
            return None
        self._reader.name = THREAD
        self._reader.start()
        return self._reader

    def wake(self) -> None:
        """Any thread (not a signal handler): end the current `wait` at once."""
        self._woken.set()

    def wait(self, seconds: float) -> tuple[list[str], bool]:
        """Wait up to `seconds` for events or a wake-up: (paths written to or gone, as text,
        whether events were lost)."""
        self._woken.wait(max(0.0, seconds))
        self._woken.clear()  # before taking the names: a later one sets it again
        with self._lock:
            written, self._written = self._written, set()
            lost, self._lost = self._lost, False
        return list(written), lost

    def close(self) -> None:
        """Remove the watches and end the reader's thread; none starts after this."""
        self._refused = self._refused or errno.EBADF
        if self._reader is not None:
            self._reader.stop()
            self._reader.join(JOIN_SECONDS)
            self._reader = None

    # -- watchdog's WatchCallback, on its reader's thread ------------------------------------

    def on_event(self, event: InotifyEvent) -> None:
        with self._lock:
            folder = self._folders.get(event.wd)
            if folder is None or not event.name:
                return
            self._written.add(f"{folder}{os.sep}{os.fsdecode(event.name)}")
        self._woken.set()

    def on_watch_deleted(self, wd: int) -> None:
        """The folder went (or the reader closed): a new folder of that name is watched anew."""
        with self._lock:
            folder = self._folders.pop(wd, None)
            if folder is not None:
                self._watched.discard(folder)

    def on_queue_overflow(self) -> None:
        with self._lock:
            self._lost = True
        self._woken.set()
