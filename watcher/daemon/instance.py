"""One daemon per drop folder: an exclusive lock on a hidden file in the drop folder.

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `.productiv-watcher.lock`, opened O_RDWR|O_CREAT
and held on that one descriptor for the daemon's life. The file is the daemon's own (mode 0600,
owned by the daemon's user): producers write in the drop folder, and one who could open the
file could flock it and stand every daemon by forever, naming any holder it likes. Whatever
else is found at its name (a symlink, FIFO or folder, a file of another user) was put there by
a producer: it is removed, said, and the lock file made anew.

flock, not lockf: a flock belongs to the
open file description, so nothing else in the process can drop it by opening and closing the
same file (a POSIX lock is dropped by the first close of any descriptor of the file), and two
daemons in one process (the tests) exclude each other. On NFS the Linux client turns a flock
into a whole-file POSIX lock, which needs a descriptor open for writing (hence O_RDWR) and is
held by the NFSv4 lease: released at once when the holder exits or is killed, and when its host
dies, once the server's lease time (typically 90 s) has run out.

The holder writes its pid and host into the file, for the standby's message and for `status`.
The watcher never uploads the file (watching.locate ignores its name).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..disk.folders import LOCK_NAME, kind_of
from ..disk.owners import adopt_open
from ..disk.renames import clear_reserved
from ..items import printable, utc_iso
from ..logs import event
from .notify import Notifier

log = logging.getLogger(__name__)

LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# A symlink, a folder, a socket; a file this user may not open (perhaps a producer's).
LOOK_AGAIN = (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES)
HOLDER_BYTES = 4096  # of the lock file, for its holder's name: a daemon writes under 200
RETRY_SECONDS = 2.0  # how often a standby tries again: a takeover within 10 s with room to spare


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds the lock, as the holder wrote it (pid None: not written yet, or unreadable)."""

    pid: int | None
    host: str
    since: str | None = None

    def describe(self) -> str:
        """As the holder wrote it, a producer perhaps: never more than one printable line."""
        if self.pid is None:
            return "another instance"
        return f"pid {self.pid} on {printable(self.host)}"


def planted(st: os.stat_result, owners: set[int]) -> str | None:
    """Why what is at the lock file's name is not a daemon's lock file, or None when it is: a
    regular file owned by one of `owners` (this user, root, the drop folder's owner)."""
    if not stat.S_ISREG(st.st_mode):
        return f"a {kind_of(st.st_mode)}"
    if st.st_uid not in owners:
        return f"a file of uid {st.st_uid}"
    return None


def parse_holder(text: str) -> Holder:
    """The lock file's content; half-written or foreign text (a producer's) is an unknown
    holder: a daemon writes a pid that is a whole number, a host and a time, all short."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nests too deep
        return Holder(None, "")
    if not isinstance(doc, dict):
        return Holder(None, "")
    pid, host, since = doc.get("pid"), doc.get("host"), doc.get("since")
    if isinstance(pid, str) and pid.isdigit() and len(pid) <= 10:
        pid = int(pid)
    if type(pid) is not int or not isinstance(host, str):
        return Holder(None, "")
    return Holder(pid, host[:255], since[:64] if isinstance(since, str) else None)


class DropLock:
    """The lock on one drop folder. `acquire` is non-blocking; the lock is held until `release`
    or the process ends (the kernel releases it, kill -9 included)."""

    def __init__(self, drop_dir: Path) -> None:
        self.path = drop_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Holder | None:
        """Take the lock: None when this process now holds it, else who holds it.

        OSError (a drop folder this user cannot write) goes to the caller: it is a folder
        problem, not a lock held by another."""
        if self._fd is not None:
            return None
        fd = self._open()
        adopt_open(fd, self.path.parent)  # made by root: the drop folder's owner and group
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return self.holder()
        self._fd = fd
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_iso(time.time())}
        with contextlib.suppress(OSError):  # a full disk: held all the same, just not named
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return None

    def _open(self) -> int:
        """The lock file, the daemon's own (0600, this user's): what a producer put at its name
        is removed first. Made by root, it goes to the drop folder's owner (the unit's user)."""
        owner = os.stat(self.path.parent).st_uid
        owners = {os.geteuid(), 0, owner}
        for _ in range(3):  # a producer racing the removal: the third time, give up
            try:
                fd = os.open(self.path, LOCK_FLAGS, 0o600)
                st = os.fstat(fd)
            except OSError as exc:
                if exc.errno not in LOOK_AGAIN:
                    raise
                st, fd = os.lstat(self.path), -1
                if planted(st, owners) is None:
                    raise  # a daemon's, this user cannot open: the operator's to fix
            why = planted(st, owners)
            if why is None:
                with contextlib.suppress(OSError):  # an older version made it 0660
                    os.fchmod(fd, 0o600)
                    if os.geteuid() == 0 and st.st_uid == 0:
                        os.fchown(fd, owner, -1)
                return fd
            if fd >= 0:
                os.close(fd)
            self._remove(st, why)
        raise OSError(errno.EAGAIN, "something keeps taking its name", str(self.path))

    def _remove(self, st: os.stat_result, why: str) -> None:
        """Clear the lock file's name (it is reserved) of what a producer put there."""
        try:
            how = clear_reserved(self.path, st)
        except FileNotFoundError:
            how = "gone meanwhile"
        reason = f"{self.path} was {why}, not this daemon's lock file: {how}"
        event(log, "lock_planted", reason, level=logging.WARNING, lock=str(self.path))

    def holder(self) -> Holder:
        """Who wrote the lock file last (read without locking: for messages only). Never
        called while holding the lock: on NFS, closing any other descriptor of the file would
        drop the holder's POSIX lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return Holder(None, "")
        try:  # a producer's FIFO is never waited on, nor a huge file read whole
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return Holder(None, "")
            return parse_holder(os.read(fd, HOLDER_BYTES).decode("utf-8", "replace"))
        except OSError:
            return Holder(None, "")
        finally:
            os.close(fd)

    def still_ours(self) -> bool:
        """Does the path still name the file we hold? (Producers may delete or replace it: a
        new file there could be locked by a second instance.)"""
        if self._fd is None:
            return False
        try:
            mine, there = os.fstat(self._fd), os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        """Unlock and close; the file stays (removing it would race a standby's open)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class Standby:
    """The wait of a second instance: on the main thread, before anything else starts."""

    def __init__(
        self,
        try_lock: Callable[[], Holder | None],
        notifier: Notifier,
        wait: Callable[[float], None],
        standing_by: threading.Event,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._try_lock = try_lock
        self._retry_seconds = retry_seconds
        self._notifier = notifier
        self._wait = wait
        self._standing_by = standing_by

    def hold(self, stopping: Callable[[], bool], status: Callable[[Holder], None]) -> bool:
        """Return True once the lock is ours, False when `stopping` says so first. Meanwhile:
        READY=1 with a STATUS naming the holder (so systemd does not time the start out), a
        `standby` line per holder, watchdog pings and `status` on every turn, a new try every
        `retry_seconds` (or every ping interval, when shorter)."""
        holder = self._try_lock()
        shown: Holder | None = None
        interval = self._notifier.watchdog_seconds
        while holder is not None:
            if holder != shown:
                shown = holder
                line = f"standby: the drop folder is held by {holder.describe()}"
                self._notifier.send("READY=1", f"STATUS={line}")
                event(log, "standby", line, holder_pid=holder.pid, holder_host=holder.host)
                self._standing_by.set()
            if interval is not None:
                self._notifier.send("WATCHDOG=1")  # alive, and waiting by design
            status(holder)
            self._wait(min(self._retry_seconds, interval or self._retry_seconds))
            if stopping():
                return False
            holder = self._try_lock()
        if shown is not None:
            self._standing_by.clear()
            event(log, "takeover", f"{shown.describe()} let go of the drop folder")
        return True


def active_holder(drop_dir: Path) -> Holder | None:
    """For `status` and `check`, from another process: who holds the drop folder, or None.

    Probes with a shared lock on a read-only descriptor (NFS maps it to a read lock, which a
    read-only descriptor allows), released at once; never creates the file."""
    path = drop_dir / LOCK_NAME
    try:  # O_NONBLOCK: a producer's FIFO at its name is not waited on
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no daemon ever ran here (or it cannot be read)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a producer's, not a daemon's lock
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return DropLock(drop_dir).holder()
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
