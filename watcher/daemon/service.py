"""Wiring and lifecycle: build the stages, start their threads, supervise, stop in order.

Data flows one way: Watcher -> Stabiliser -> WorkQueue -> Uploader (dispatcher, workers) -> Mover.
The main thread owns the lifecycle: signal handlers only set a flag (the wake-up pipe of
wakeup.py wakes the main loop), and the main loop rescans, checks that every thread is alive
(a dead one ends the process with status 1, so systemd restarts it rather than letting it limp
on deaf) and shuts down in a fixed order.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import __version__, logs
from ..disk.access import prepare_folders
from ..disk.folders import Folders, resolve
from ..heartbeats import Counts, Heartbeat, status_line, stuck
from ..items import Item, Spot
from ..logs import REDACT, Detail, event
from ..metrics import Metrics
from ..pipeline import latewrite, markers
from ..pipeline.finisher import Finisher
from ..pipeline.mover import Mover
from ..pipeline.receipts import Journal
from ..pipeline.stability import Stabiliser
from ..pipeline.uploader import Uploader
from ..pipeline.watching import Watcher
from ..pipeline.workqueue import WorkQueue
from ..remote.api import ApiClient
from ..remote.breakers import Gates
from ..remote.network import Network
from ..remote.transfer import Transfer
from ..settings import ConfigError, Paths, Reconfigurable, Settings, reloaded
from . import statusfile
from .chores import Operations
from .instance import DropLock, Holder, Standby
from .notify import Notifier, SystemdNotifier
from .timings import DEFAULT, Timings
from .wakeup import Wakeup

log = logging.getLogger(__name__)

Step = Callable[[threading.Event, Heartbeat], None]
UNWAITED = ("finisher", "dispatcher")  # joined after the others
API_GRACE_SECONDS = 1.0  # an idle dispatcher ends within this at a stop; one in an API call is left


class Service:
    """The daemon. `run` blocks until a stop is requested; returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        notifier: Notifier | None = None,
        reload: Callable[[], Settings] | None = None,
        clock: Callable[[], float] = time.monotonic,
        timings: Timings = DEFAULT,
    ) -> None:
        """`timings`: the fixed turns (tests pass short ones; the defaults are the daemon's)."""
        self.settings = settings
        self.timings = timings
        self._notifier = notifier or SystemdNotifier()
        self._reload = reload
        self._clock = clock
        self._stop = threading.Event()  # tells every thread to finish
        self._moves_stop = threading.Event()  # the finisher's: set once the uploads are over
        # The stop and reload flags; wakes the main loop (signals, threads, notices).
        self._wakeup = Wakeup()
        self._quiet = False  # nothing waiting or uploading at the main loop's last turn
        self.ready = threading.Event()  # set with READY=1 (tests wait on it)
        self.standing_by = threading.Event()  # set while another instance holds the drop folder
        self._lock_deferred = False  # the lock file could not be made yet (a full disk)
        self._threads: dict[str, tuple[threading.Thread, Heartbeat]] = {}
        self._stuck: str | None = None
        self._last_status = ""

        self.paths = Paths.of(settings)
        drop = resolve(self.paths.drop)  # once: inotify and descriptors follow no symlink
        # every file operation in drop/ goes through its descriptors
        self.drop = Folders(drop, check_seconds=timings.folder_check_seconds)
        self.lock = DropLock(drop)
        REDACT.add(settings.secret_values())
        self.metrics = Metrics(settings)
        self.journal = Journal(
            self.paths.state, int(settings.receipts_max_bytes), settings.receipts_keep
        )
        self.work = WorkQueue(clock, self._noticed)
        idle = timings.idle_wake_seconds
        self.markers = markers.from_settings(settings, self.drop)
        self.stabiliser = Stabiliser(
            settings.settle_seconds,
            self.work,
            clock,
            self.drop.lstat,
            self.markers,
            idle_wake_seconds=idle,
        )
        self.late = latewrite.from_settings(
            settings,
            self.paths.done,
            self.work,
            clock,
            self.metrics,
            idle,
            timings.folder_check_seconds,
        )
        self.gates = Gates(
            settings.retry_initial_seconds, settings.retry_max_seconds, clock, self.metrics
        )
        self.network = Network.from_settings(settings)
        self.api = ApiClient(settings, network=self.network)
        self.mover = Mover(
            drop, self.paths.done, self.paths.failed, time.time, timings.folder_check_seconds
        )
        self.finisher = Finisher(
            self.mover,
            self.work,
            self.gates.delay,
            self._noticed,
            self.journal,
            self.metrics,
            idle_wake_seconds=idle,
            placed=self._placed,
            late_writes=self.late is not None,
        )
        self.uploader = Uploader(
            settings,
            self.api,
            Transfer(
                settings.request_timeout_seconds,
                settings.upload_concurrency,
                settings.content_type,
                network=self.network,
                opener=self.drop.open if self.late is None else self.late.opener(self.drop.open),
                clock=clock,
            ),
            self.finisher,
            self.work,
            self.gates,
            self._handed_back,
            self.metrics,
            idle_wake_seconds=idle,
        )
        self.watcher = Watcher(
            drop,
            settings.file_type,
            settings.ignore_patterns,
            self._noticed,
            settings.polling,
            settings.poll_interval_seconds,
            settings.canary_seconds,
            folders=self.drop,
            wake=self._wakeup.set,
            listing=self.finisher.folders.listing,
        )
        self.operations = Operations(
            settings,
            self.paths,
            self.work,
            self.stabiliser,
            self.uploader,
            self.finisher,
            self.gates,
            self.watcher,
            self.journal,
            self.metrics,
            clock,
        )
        # What a reload reconfigures, each from its own reconfigure(settings).
        self._live: tuple[Reconfigurable, ...] = tuple(
            part
            for part in (
                self.stabiliser,
                self.gates,
                self.uploader,
                self.operations,
                self.markers,
                self.late,
            )
            if part is not None
        )

    def handle_signals(self) -> None:
        """Main thread only: SIGTERM/SIGINT stop, SIGHUP reloads (handlers only set a flag)."""
        self._wakeup.handle_signals()

    def request_stop(self) -> None:
        """From another thread: as SIGTERM does. A second request abandons the graceful wait."""
        self._wakeup.request_stop()

    def request_reload(self) -> None:
        """From another thread: as SIGHUP does."""
        self._wakeup.request_reload()

    def _wait(self, seconds: float) -> None:
        """The main thread's one way to wait: returns early on a signal, a stop or reload
        request, a thread that ends, or a notice after a quiet spell."""
        self._wakeup.wait(seconds)

    def run(self) -> int:
        problems = prepare_folders(self.settings)
        if problems:
            raise ConfigError("\n".join(problems))
        self.metrics.start()  # a port in use is exit 78, before any thread starts
        network = self.network.describe()
        event(
            log,
            "started",
            version=__version__,
            notify_socket="set" if self._notifier.enabled else "unset",
            watchdog_seconds=self._notifier.watchdog_seconds,
            settings=Detail(self.settings.public_view(), self.settings.brief_view()),
            network=Detail(network, network),  # text: ca=... https_proxy=...
        )
        if not self._hold_drop_folder():
            return self._stop_standing_by()
        try:
            return self._start_and_supervise()
        finally:
            self.lock.release()  # last: a standby takes over only once every move is done

    def _start_and_supervise(self) -> int:
        self._spawn("stabiliser", lambda stop, beat: self.stabiliser.run(stop))
        self._spawn("dispatcher", self.uploader.dispatch_step)
        self._spawn("finisher", lambda stop, beat: self.finisher.run(self._moves_stop, beat))
        self._spawn("transfers", self.uploader.run_puts)
        if self.late is not None:
            self._spawn("late_writes", self.late.step)
        self.watcher.start()
        waiting = self.watcher.scan()
        self._notifier.send("READY=1", f"STATUS=watching, {waiting} file(s) waiting at start")
        event(log, "ready", drop_dir=str(self.watcher.drop_dir), waiting=waiting)
        self.ready.set()
        try:
            return self._supervise()
        finally:
            self._shutdown()

    # -- one daemon per drop folder: the standby -------------------------------------------

    def _hold_drop_folder(self) -> bool:
        """Take the drop folder's lock, standing by while another instance holds it. False
        when a stop came first. A reload asked for meanwhile is applied after the takeover."""
        standby = Standby(
            self._try_lock,
            self._notifier,
            self._wait,
            self.standing_by,
            self.timings.standby_retry_seconds,
        )
        return standby.hold(
            lambda: self._wakeup.stops > 0,
            lambda holder: self._own_status("standby", active=holder.describe()),
        )

    def _try_lock(self) -> Holder | None:
        """`lock.acquire`, with its failures judged: a full disk (the lock file cannot be made
        yet) is no reason not to start, and the main loop tries again; anything else (a folder
        that cannot hold the file, NFS mounted without locks) ends the start with exit 78."""
        try:
            return self.lock.acquire()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise ConfigError(
                    f"drop_dir {self.lock.path.parent}: cannot lock {self.lock.path.name}:"
                    f" {exc.strerror} (see docs/deployment.md, High availability)"
                ) from None
            if not self._lock_deferred:
                self._lock_deferred = True
                every = self.timings.check_seconds
                reason = f"cannot make {self.lock.path}: {exc.strerror}; again every {every:g} s"
                event(log, "lock_deferred", reason, level=logging.WARNING)
            return None

    def _stop_standing_by(self) -> int:
        """A stop while standing by: nothing was started, nothing to drain."""
        self._notifier.send("STOPPING=1", "STATUS=stopping")
        self._own_status("stopped")
        self.api.close()
        event(log, "stopped", uploaded=0, failed=0)
        return 0

    def _own_status(self, state: str, **extra: str) -> None:
        """Write the status file, unless it describes another live instance (one host, one
        state folder): the active instance's status stays what `status` shows."""
        doc = statusfile.read(self.journal.folder)
        mine = doc is not None and (doc.get("pid"), doc.get("host")) == (
            os.getpid(),
            socket.gethostname(),
        )
        if mine or not statusfile.running(doc, time.time()):
            self.operations.write_status(state, **extra)

    def _keep_lock(self) -> bool:
        """The main loop's check that the lock file is still the one held (producers may remove
        it, and a standby would lock a new one). Lost: take it again, or end with status 1 when
        another instance already has it (systemd's restart makes this one the standby). Not
        while the watch has lost the drop folder (gone, replaced, hanging): that is the watch's
        to report, and the lock stays on the file it holds."""
        if self.watcher.deaf_reason is not None or self.lock.still_ours():
            return True
        self.lock.release()
        try:
            holder = self._try_lock()
        except ConfigError as exc:  # the folder went away meanwhile: the next check sees it
            event(log, "lock_deferred", str(exc), level=logging.WARNING)
            return True
        if holder is None:
            if self.lock.held:
                self._lock_deferred = False
                event(log, "lock_restored", level=logging.WARNING, lock=str(self.lock.path))
            return True
        if self._lock_deferred:  # it never held the lock: nothing was removed or replaced
            why = f"{holder.describe()} made and holds {self.lock.path}, which this one could not"
        else:
            why = f"{self.lock.path} was removed or replaced, and {holder.describe()} holds it now"
        event(log, "lock_lost", why, level=logging.CRITICAL)
        return False

    # -- threads ---------------------------------------------------------------------------

    def _spawn(self, name: str, step: Step, keep: Callable[[], bool] = lambda: True) -> None:
        beat = Heartbeat(name, self._clock)

        def loop() -> None:
            try:
                while not self._stop.is_set() and keep():
                    step(self._stop, beat)
            finally:
                self._wakeup.set()  # a thread that ends: the main loop looks at once

        thread = threading.Thread(target=loop, name=name, daemon=True)
        self._threads[name] = (thread, beat)
        thread.start()

    def _dead_threads(self) -> list[str]:
        return [name for name, (thread, _) in self._threads.items() if not thread.is_alive()]

    # -- the main loop -----------------------------------------------------------------------

    def _supervise(self) -> int:
        """Rescan on time, reload on SIGHUP, keep systemd informed, fail fast on a dead thread."""
        next_scan = self._clock() + self.settings.rescan_seconds
        next_ping = next_check = self._clock()
        interval = self._notifier.watchdog_seconds
        while not self._wakeup.stops:
            now = self._clock()
            dead = self._dead_threads()
            if dead:
                event(log, "crashed", level=logging.CRITICAL, reason=f"thread died: {dead}")
                return 1
            if now >= next_check:  # a stat on a helper thread: not on every turn
                next_check = now + self.timings.check_seconds
                self.watcher.check()
                if not self._keep_lock():
                    return 1
            if self._wakeup.reload:
                self._wakeup.reload = False
                self._apply_reload()
            if now >= next_scan or self.watcher.rescan_due():
                self.watcher.scan()
                next_scan = now + self.settings.rescan_seconds
            # Quiet until these counts say otherwise: a file noticed from this moment on wakes
            # the loop, even one these counts missed.
            self._quiet = True
            counts = self.operations.counts()
            self._send_status(counts)
            self.operations.tick()
            if interval is not None and now >= next_ping:
                next_ping = now + interval
                self._ping(now, 2 * interval)
            # Quiet, it turns only every check_seconds: a turn after a long sleep costs ~15 ms of
            # CPU here (cold caches), however little it does. Signals, threads that end, and the
            # first file after a quiet spell wake it at once.
            self._quiet = not (counts.waiting or counts.uploading)
            turn = self.timings.check_seconds if self._quiet else self.settings.status_seconds
            self._wait(min(turn, interval or turn, next_check - now, next_scan - now))
        return 0

    def _noticed(self, spots: list[Spot]) -> None:
        """Every notice (the watch, a file handed back, a name freed) goes to the stabiliser
        through here, to wake a main loop in its slow, quiet turns (each costs CPU)."""
        self.stabiliser.notice(spots)
        if self._quiet and spots:
            self._wakeup.set()

    def _handed_back(self, spots: list[Spot]) -> None:
        """A file that changed during its upload: to the stabiliser, or, sent again from done/
        after a late write, back to the late-write watch."""
        late = self.late
        if late is not None and any(late.owns(spot.path) for spot in spots):
            late.handed_back([spot for spot in spots if late.owns(spot.path)])
            spots = [spot for spot in spots if not late.owns(spot.path)]
        self._noticed(spots)

    def _placed(self, placed: list[tuple[Item, Path, bool]]) -> None:
        """The finisher's thread, after moves are receipted: ready markers are consumed, and
        uploaded files watched for late writes."""
        if self.markers is not None:
            for item, _, _ in placed:
                if item.marker is not None:
                    self.markers.consume(item.spot, item.marker)
        if self.late is not None:
            self.late.placed(placed)

    def _ping(self, now: float, period: float) -> None:
        """WATCHDOG=1 only while the upload threads show life; say once when they do not."""
        beats = [beat for name, (_, beat) in self._threads.items() if name != "stabiliser"]
        beats += self.uploader.transfer_beats()  # put-1, put-2...: one per transfer slot
        reason = stuck(beats, now, period)
        if reason is None:
            self._notifier.send("WATCHDOG=1")
        elif reason != self._stuck:
            event(log, "stuck", level=logging.ERROR, reason=reason + ": no watchdog ping")
        self._stuck = reason

    def _send_status(self, counts: Counts) -> None:
        line = status_line(counts)
        if line != self._last_status:
            self._last_status = line
            self._notifier.send(f"STATUS={line}")

    def _apply_reload(self) -> None:
        """Apply the live settings of a valid reload; refuse one that is not, whole."""
        if self._reload is None:
            return
        try:
            loaded = self._reload()
            Paths.of(loaded)  # a reload without drop_dir is refused whole
        except ConfigError as exc:
            reason = "; ".join(str(exc).splitlines())
            event(log, "reload_failed", f"{reason}: nothing changed", level=logging.ERROR)
            return
        new, applied, restart = reloaded(self.settings, loaded)
        self.settings = new
        for part in self._live:
            part.reconfigure(new)
        logs.set_level(new.log_level)
        event(log, "reloaded", applied=applied or None, restart_needed=restart or None)

    def _shutdown(self) -> None:
        """Observer first, then let PUTs in flight finish within the timeout, then go.

        The dispatcher is hardly waited for: it holds no bytes in flight, only perhaps an API
        call (a token, signed URLs) that may hang for request_timeout_seconds; its files stay in
        the drop folder, and it is a daemon thread that ends with the process."""
        self._notifier.send("STOPPING=1", "STATUS=stopping")
        event(log, "stopping", in_flight=self.uploader.sending)
        self.watcher.stop()
        self._stop.set()
        self.work.close()
        self.stabiliser.wake()
        if self.late is not None:
            self.late.wake()
        self.uploader.close()
        deadline = self._clock() + self.settings.shutdown_timeout_seconds
        uploads = [thread for name, (thread, _) in self._threads.items() if name not in UNWAITED]
        self._join(uploads, deadline)
        dispatcher = self._threads["dispatcher"][0]
        self._join([dispatcher], min(deadline, self._clock() + API_GRACE_SECONDS))
        self._moves_stop.set()  # the uploads are over: move what they finished, then end
        self.finisher.close()
        self._join([self._threads["finisher"][0]], deadline)
        self.watcher.join(max(0.0, deadline - self._clock()))
        self.mover.close()
        if self.late is not None:
            self.late.close()
        self.drop.close()
        self.metrics.stop()
        self.operations.publish("stopped")
        abandoned = self.uploader.sending if self._threads["transfers"][0].is_alive() else 0
        api_call = dispatcher.is_alive()
        self.api.close()
        event(
            log,
            "stopped",
            uploaded=self.finisher.uploaded,
            failed=self.finisher.failed,
            abandoned=abandoned or None,
            api_call_abandoned=api_call or None,
        )
        self._wakeup.close()

    def _join(self, threads: list[threading.Thread], deadline: float) -> None:
        """Join against one deadline; a second stop request gives up at once."""
        for thread in threads:
            while thread.is_alive() and self._wakeup.stops < 2:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return
                thread.join(min(remaining, 0.2))
