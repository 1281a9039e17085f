"""watchdog's inotify observer, trimmed to the events the stabiliser needs.

The one module that leans on watchdog's internals (the emitter's `on_thread_start`, the watch
group and its move-event grouper), which is why watchdog is pinned `>=7.1,<8`; a test reads the
kernel's watch mask from /proc/self/fdinfo, so an upgrade that changes them fails loudly.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from ..items import display
from ..logs import event
from ..settings import FILE_TYPES

log = logging.getLogger(__name__)

_TYPE_NAMES = tuple(os.fsencode(t) for t in FILE_TYPES)
WATCH_LIMIT = (
    "the inotify watch limit is used up (raise fs.inotify.max_user_watches, or set polling = true)"
)


class _QuietStop(logging.Filter):
    """watchdog 7 logs an ERROR when its inotify thread is stopped mid-read: a benign race."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietStop())
# A folder renamed inside the drop folder arrives, without IN_MOVED_FROM, as a new folder that
# already has a watch; watchdog re-registers it and says so in a RuntimeWarning. Expected here.
warnings.filterwarnings("ignore", "Callback with id .* already exists", RuntimeWarning, "watchdog")


def _is_folder(path: bytes) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _unwatched(root: bytes, path: bytes, exc: OSError) -> None:
    """Say that a type folder gets no watch (watchdog drops this without a word)."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return  # the folder went (or was replaced) meanwhile: its own event says so
    why = WATCH_LIMIT if exc.errno == errno.ENOSPC else exc.strerror
    event(
        log,
        "watch_failed",
        level=logging.ERROR,
        folder=display(os.fsdecode(os.path.relpath(path, root))),
        reason=f"cannot watch this folder: {why}; its files are found only by the rescans",
    )


def observer(overflowed: Callable[[], None] = lambda: None) -> BaseObserver:
    """watchdog's inotify observer, asking the kernel only for what the stabiliser needs.

    Watches only the drop folder and its type folders (real folders, never a symlink): every
    deeper folder would cost a watch from `fs.inotify.max_user_watches` for nothing. A type
    folder that cannot be watched is said (watchdog would say nothing); a queue overflow
    (events lost) is reported to `overflowed`, on watchdog's inotify thread.

    watchdog derives the mask from the event filter, and a moved-in file (FileCreatedEvent) brings
    IN_MOVED_FROM with it. watchdog holds every IN_MOVED_FROM for 0.5 s to pair it with its
    IN_MOVED_TO, in a FIFO that makes every later event wait behind it, and each of our own moves
    out of the drop folder is one: the latency benchmark's p95 was settle_seconds + 0.51 s. And
    for every IN_MOVED_TO it searches that whole FIFO twice for a partner: in a burst of files
    renamed into the folder, quadratic work: 0.15 ms of CPU per file for 3,000 files. Without
    IN_MOVED_FROM there is never a partner, so the search is skipped; a rename inside the folder
    arrives as its new name created, and the old name simply fails its next stat.
    """
    try:
        from watchdog.observers.inotify import (
            InotifyEmitter,
            InotifyObserver,
            InotifyWatchGroup,
        )
        from watchdog.observers.inotify_c import InotifyConstants as In
        from watchdog.observers.inotify_c import InotifyEvent, Mask
        from watchdog.observers.inotify_move_event_grouper import (
            InotifyMoveEventGrouper,
            PathedInotifyEvent,
        )
    except ImportError:  # not Linux: watchdog's default observer for the platform
        return Observer()

    mask = Mask(In.IN_CREATE | In.IN_MOVED_TO | In.IN_CLOSE_WRITE | In.IN_DELETE_SELF)

    class Unpaired(InotifyMoveEventGrouper):
        def _group_moved_to_event(self, to_event: PathedInotifyEvent) -> PathedInotifyEvent:
            return to_event

        def get_queued_moved_from_event(self, cookie: int) -> None:
            return None

    @dataclass
    class Group(InotifyWatchGroup):
        _move_event_grouper: InotifyMoveEventGrouper = field(default_factory=Unpaired, init=False)

        def _is_type_folder(self, path: bytes) -> bool:
            head, name = os.path.split(path)
            return head == self.path and name in _TYPE_NAMES

        def _add_all_callbacks(self, path: bytes) -> None:
            """watchdog's walks every folder below; here: the root and its type folders."""
            if path == self.path:
                self._add_callback(path)
                for name in _TYPE_NAMES:
                    self._add_all_callbacks(os.path.join(path, name))
            elif self._is_type_folder(path) and _is_folder(path):
                self._add_callback(path)

        def _add_callback(self, path: bytes) -> None:
            """As watchdog's, which drops a failure below the root without a word."""
            try:
                wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
            except OSError as exc:
                if path == self.path:
                    raise
                _unwatched(self.path, path, exc)
                return
            self._active_callbacks_by_path[path] = wd
            self._active_callbacks_by_watch[wd] = path

        def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
            """Files already in a type folder that appeared before its watch (`mkdir users;
            cp a users/`); watchdog's walks the whole tree below any new folder."""
            wd = self._active_callbacks_by_path.get(src_path)
            if wd is None or not self._is_type_folder(src_path):
                return []
            try:
                with os.scandir(src_path) as entries:
                    names = [e.name for e in entries if not e.is_dir(follow_symlinks=False)]
            except OSError:
                return []
            return [InotifyEvent(wd, In.IN_CREATE, 0, name) for name in names]

        def on_queue_overflow(self) -> None:
            super().on_queue_overflow()  # watches rebuilt: ours, through _add_all_callbacks
            overflowed()

    class Emitter(InotifyEmitter):
        def on_thread_start(self) -> None:  # as watchdog's, with our mask and grouper
            self._inotify = Group(
                self._inotify_fd,
                os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=mask,
                follow_symlink=self.watch.follow_symlink,
            )

    inotify = InotifyObserver()
    inotify._emitter_class = Emitter  # emitters are made by schedule()
    return inotify
