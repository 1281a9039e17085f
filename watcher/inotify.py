"""watchdog's inotify observer, trimmed to the events the stabiliser needs.

The one module that leans on watchdog's internals (the emitter's `on_thread_start`, the watch
group and its move-event grouper), which is why watchdog is pinned `>=7.1,<8`; a test reads the
kernel's watch mask from /proc/self/fdinfo, so an upgrade that changes them fails loudly.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field

from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver


class _QuietStop(logging.Filter):
    """watchdog 7 logs an ERROR when its inotify thread is stopped mid-read: a benign race."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietStop())
# A folder renamed inside the drop folder arrives, without IN_MOVED_FROM, as a new folder that
# already has a watch; watchdog re-registers it and says so in a RuntimeWarning. Expected here.
warnings.filterwarnings("ignore", "Callback with id .* already exists", RuntimeWarning, "watchdog")


def observer() -> BaseObserver:
    """watchdog's inotify observer, asking the kernel only for what the stabiliser needs.

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
        from watchdog.observers.inotify_c import Mask
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
