"""Wiring and lifecycle: build the stages, start their threads, supervise, stop in order.

Data flows one way: Watcher -> Stabiliser -> WorkQueue -> Uploader (dispatcher, workers) -> Mover.
The main thread owns the lifecycle: signal handlers only call `request_stop`, and the main
loop rescans, checks that every thread is alive (a dead one ends the process with status 1, so
systemd restarts it rather than letting it limp on deaf) and shuts down in a fixed order.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from . import __version__
from .api import ApiClient
from .gate import ServiceGate
from .logs import REDACT, event
from .mover import Mover
from .notify import Notifier, SystemdNotifier
from .settings import ConfigError, Settings, require_folders
from .stability import Stabiliser
from .transfer import Transfer
from .uploader import Uploader
from .watching import Watcher
from .workqueue import WorkQueue

log = logging.getLogger(__name__)


def prepare_folders(settings: Settings, create: bool = True) -> list[str]:
    """Problems with the folders, one sentence each; creates done/ and failed/ when asked.

    Without `create` (the `check` command), a missing done/ or failed/ is judged by its parent,
    where the daemon would create it.
    """
    drop, done, failed = require_folders(settings)
    if not drop.is_dir():
        return [f"drop_dir {drop} does not exist or is not a folder (it is never created)"]
    problems = []
    drop_dev = drop.stat().st_dev
    for name, wanted in (("drop_dir", drop), ("done_dir", done), ("failed_dir", failed)):
        if not wanted.exists() and create:
            try:
                wanted.mkdir(parents=True)
            except OSError as exc:
                problems.append(f"{name} {wanted} cannot be created: {exc.strerror}")
                continue
        folder = wanted if wanted.exists() else wanted.parent
        if not folder.is_dir():
            problems.append(f"{name} {wanted} does not exist")
        elif not os.access(folder, os.W_OK | os.X_OK):
            problems.append(f"{name} {folder} is not writable by this user")
        elif folder.stat().st_dev != drop_dev:
            problems.append(
                f"{name} {wanted} is not on the drop folder's filesystem (files move by rename)"
            )
    return problems


class Service:
    """The daemon. `run` blocks until a stop is requested; returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._notifier = notifier or SystemdNotifier()
        self._clock = clock
        self._stop = threading.Event()  # tells every thread to finish
        self._wakeup = threading.Event()  # wakes the main loop (signals)
        self._stop_requests = 0
        self.ready = threading.Event()  # set with READY=1 (tests wait on it)
        self._threads: list[threading.Thread] = []

        drop, done, failed = require_folders(settings)
        REDACT.add(settings.secret_values())
        self.work = WorkQueue(clock)
        self.stabiliser = Stabiliser(settings.settle_seconds, self.work, clock)
        self.gate = ServiceGate(settings.retry_initial_seconds, settings.retry_max_seconds, clock)
        self.api = ApiClient(settings)
        self.uploader = Uploader(
            settings,
            self.api,
            Transfer(
                settings.request_timeout_seconds,
                settings.upload_concurrency,
                settings.content_type,
            ),
            Mover(drop, done, failed, time.time),
            self.work,
            self.gate,
            self.stabiliser.notice,
        )
        self.watcher = Watcher(
            drop,
            settings.file_type,
            settings.ignore_patterns,
            self.stabiliser.notice,
            settings.polling,
            settings.poll_interval_seconds,
        )

    def request_stop(self) -> None:
        """Signal-handler safe: only flips flags. A second request abandons the graceful wait."""
        self._stop_requests += 1
        self._wakeup.set()

    def run(self) -> int:
        problems = prepare_folders(self.settings)
        if problems:
            raise ConfigError("\n".join(problems))
        event(
            log,
            "started",
            version=__version__,
            notify_socket="set" if self._notifier.enabled else "unset",
            settings=self.settings.public_view(),
        )
        self._start_threads()
        self.watcher.start()
        waiting = self.watcher.scan()
        self._notifier.send("READY=1", f"STATUS=watching, {waiting} file(s) waiting at start")
        event(log, "ready", drop_dir=str(self.watcher.drop_dir), waiting=waiting)
        self.ready.set()
        try:
            return self._supervise()
        finally:
            self._shutdown()

    def _start_threads(self) -> None:
        loops: list[tuple[str, Callable[[threading.Event], None]]] = [
            ("stabiliser", self.stabiliser.run),
            ("dispatcher", self._forever(self.uploader.dispatch_step)),
        ]
        loops += [
            (f"put-{n}", self._forever(self.uploader.put_step))
            for n in range(1, self.settings.upload_concurrency + 1)
        ]
        for name, loop in loops:
            thread = threading.Thread(target=loop, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @staticmethod
    def _forever(
        step: Callable[[threading.Event], None],
    ) -> Callable[[threading.Event], None]:
        def loop(stop: threading.Event) -> None:
            while not stop.is_set():
                step(stop)

        return loop

    def _supervise(self) -> int:
        """The main loop: rescan on time, and fail fast when a thread has died."""
        next_scan = self._clock() + self.settings.rescan_seconds
        while not self._stop_requests:
            self._wakeup.wait(0.5)
            dead = [t.name for t in self._threads if not t.is_alive()]
            if not self.watcher.alive():
                dead.append("observer")
            if dead and not self._stop_requests:
                event(log, "crashed", level=logging.CRITICAL, reason=f"thread died: {dead}")
                return 1
            if self._clock() >= next_scan:
                self.watcher.scan()
                next_scan = self._clock() + self.settings.rescan_seconds
        return 0

    def _shutdown(self) -> None:
        """Observer first, then let PUTs in flight finish within the timeout, then go."""
        self._notifier.send("STOPPING=1", "STATUS=stopping")
        event(log, "stopping", in_flight=self.uploader.sending)
        self.watcher.stop()
        self._stop.set()
        self.work.close()
        self.stabiliser.wake()
        self.uploader.close()
        deadline = self._clock() + self.settings.shutdown_timeout_seconds
        for thread in self._threads:
            while thread.is_alive() and self._stop_requests < 2:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                thread.join(min(remaining, 0.2))
        self.watcher.join(max(0.0, deadline - self._clock()))
        abandoned = sum(t.is_alive() for t in self._threads if t.name.startswith("put-"))
        self.api.close()
        event(
            log,
            "stopped",
            uploaded=self.uploader.uploaded,
            failed=self.uploader.failed,
            abandoned=abandoned or None,
        )
