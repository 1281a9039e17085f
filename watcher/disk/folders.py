"""Folders by descriptor: a root (drop/, done/ or failed/) and its type folders.

`O_NOFOLLOW` and `lstat` guard only the last component of a path: with `drop/users` a symlink,
every path-based scan, open and rename would go wherever it points. So every file operation in
these folders works relative to a descriptor of the file's folder: the root opened once, each
type folder opened relative to it with `O_DIRECTORY|O_NOFOLLOW`. A type folder that is not a real
folder (a symlink, a file named `users`) is refused, never followed.

The descriptors are cached, since the burst throughput is a measured target. Before a use that
reads or moves a file (`fresh`: the PUT's open, the move's source, the scan) one `fstatat` checks
that the name still means that folder (dev, inode); the stabiliser's looks and the move's target
(done/, failed/: producers cannot write there) check at most once a second, and again at once when
a name is not found. A replaced folder is re-opened; the old descriptor is closed once no thread
uses it any more.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ..items import Identity
from ..logs import event
from ..settings import FILE_TYPES
from .owners import adopt, make_folders

log = logging.getLogger(__name__)

ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # readable: scandir and fsync need it
SUB_FLAGS = ROOT_FLAGS | os.O_NOFOLLOW
CHECK_SECONDS = 1.0
# The daemon's own lock in the drop folder (daemon/instance.py), here so that the watch, which
# never uploads it, need not reach up into the daemon's modules for its name.
LOCK_NAME = ".productiv-watcher.lock"


def kind_of(mode: int) -> str:
    """What a directory entry is, in the words the `skipped` log line uses."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def refusal(kind: str, sub: str) -> str:
    """Why a type folder of the drop folder is not used, and what to do about it."""
    if kind == "symlink":
        return (
            f"a symlink, not a folder: it is never followed; files of type {sub} go in a "
            f"real folder {sub}/ (replace the link with a folder)"
        )
    return (
        f"a {kind}, not a folder: the name {sub} belongs to the type folder {sub}/; rename "
        f"it (files go directly in the drop folder or in a folder {sub}/)"
    )


class FolderRefused(FileNotFoundError):
    """A type folder of the drop folder that is not a real folder: its files are not ours."""


@dataclass(eq=False)
class _Open:
    fd: int
    identity: Identity
    checked: float  # monotonic: when its name last meant this folder
    leases: int = 0
    retired: bool = False


class Folders:
    """One root and its type folders; safe to use from several threads at once.

    `create` (done/ and failed/): missing folders are made, and a type folder that is not a
    folder is a NotADirectoryError naming it. Without it (drop/): nothing is made, and such a type
    folder is a FolderRefused (a FileNotFoundError: the file is no longer in the drop folder),
    said once in a `skipped` line.
    """

    def __init__(
        self, root: Path, create: bool = False, check_seconds: float = CHECK_SECONDS
    ) -> None:
        self.root = root
        self._check_seconds = check_seconds
        self._root_text = str(root)
        self._create = create
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}  # "" is the root
        self._refused: dict[str, Identity] = {}  # the non-folders already said, by type folder

    def locate(self, path: Path) -> tuple[str, str]:
        """(type folder, or "" for the root; name) of a file directly in either. Text, not
        pathlib: this runs several times per file."""
        head, _, name = os.fspath(path).rpartition(os.sep)
        if head == self._root_text:
            return "", name
        top, _, sub = head.rpartition(os.sep)
        if top == self._root_text and sub in FILE_TYPES:
            return sub, name
        raise FileNotFoundError(errno.ENOENT, "not in a folder this daemon serves", str(path))

    def sub_of(self, folder: Path) -> str | None:
        """The type folder (or "") that `folder` names, None when it is not one of ours."""
        if folder == self.root:
            return ""
        if folder.parent == self.root and folder.name in FILE_TYPES:
            return folder.name
        return None

    @contextmanager
    def folder(self, sub: str, fresh: bool = True) -> Iterator[int]:
        """A descriptor of the root ("") or of a type folder, valid inside the `with`."""
        entry = self._lease(sub, fresh)
        try:
            yield entry.fd
        finally:
            self._release(entry)

    def lstat(self, path: Path) -> os.stat_result:
        """The stabiliser's look: through a descriptor checked within the last second, or at
        once when the name is not there (its folder may have been replaced meanwhile)."""
        sub, name = self.locate(path)
        try:
            return self._stat(sub, name, fresh=False)
        except FolderRefused:
            raise
        except FileNotFoundError:
            return self._stat(sub, name, fresh=True)

    def _stat(self, sub: str, name: str, fresh: bool) -> os.stat_result:
        entry = self._lease(sub, fresh)  # not `folder`: a generator per call shows in the burst
        try:
            return os.stat(name, dir_fd=entry.fd, follow_symlinks=False)
        finally:
            self._release(entry)

    def open(self, path: Path, flags: int) -> int:
        sub, name = self.locate(path)
        entry = self._lease(sub, fresh=True)
        try:
            return os.open(name, flags, dir_fd=entry.fd)
        finally:
            self._release(entry)

    def exists(self, sub: str, name: str) -> bool:
        try:
            with self.folder(sub) as fd:
                os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def scandir(self, sub: str) -> list[str]:
        """The names in a folder, read through a descriptor of its own: the cached one's
        directory offset is shared by its copies, so two scans on it would miss entries."""
        with self.folder(sub) as folder:
            fd = os.open(".", ROOT_FLAGS, dir_fd=folder)
        try:
            with os.scandir(fd) as entries:
                return [entry.name for entry in entries]
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for sub in list(self._open):
                self._retire(sub)

    def recheck(self) -> None:
        """Check every folder at its next use (a rename found its target gone)."""
        with self._lock:
            for entry in self._open.values():
                entry.checked = float("-inf")

    def _lease(self, sub: str, fresh: bool) -> _Open:
        with self._lock:
            entry = self._acquire(sub, fresh)
            entry.leases += 1
            return entry

    def _release(self, entry: _Open) -> None:
        with self._lock:
            entry.leases -= 1
            if entry.retired and entry.leases == 0:
                os.close(entry.fd)

    # -- under the lock ----------------------------------------------------------------------

    def _acquire(self, sub: str, fresh: bool) -> _Open:
        try:
            return self._acquire_once(sub, fresh)
        except FileNotFoundError:
            if not self._create:
                raise
            root = self._open.get("")  # the root itself went: made again
            if root is not None:
                root.checked = float("-inf")
            return self._acquire_once(sub, fresh)

    def _acquire_once(self, sub: str, fresh: bool) -> _Open:
        now = time.monotonic()
        root = self._root(now)
        if not sub:
            return root
        entry = self._open.get(sub)
        if entry is not None and not fresh and now - entry.checked < self._check_seconds:
            return entry
        try:
            st = os.stat(sub, dir_fd=root.fd, follow_symlinks=False)
        except FileNotFoundError:
            if not self._create:
                self._retire(sub)
                raise
            with suppress(FileExistsError):  # FileNotFoundError: the root went
                os.mkdir(sub, dir_fd=root.fd)
                adopt(sub, root.fd)
            st = os.stat(sub, dir_fd=root.fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            self._retire(sub)
            raise self._refuse(sub, st)
        self._refused.pop(sub, None)
        if entry is None or entry.identity != (st.st_dev, st.st_ino):
            self._retire(sub)
            entry = self._opened(sub, os.open(sub, SUB_FLAGS, dir_fd=root.fd), now)
        entry.checked = now
        return entry

    def _root(self, now: float) -> _Open:
        """The root, whose parent producers cannot write: checked at most once a second."""
        entry = self._open.get("")
        if entry is not None and now - entry.checked < self._check_seconds:
            return entry
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            if not self._create:
                raise
            make_folders(self.root)
            st = os.stat(self.root)
        if entry is None or entry.identity != (st.st_dev, st.st_ino):
            for sub in list(self._open):  # the type folders' names were relative to the old root
                self._retire(sub)
            entry = self._opened("", os.open(self.root, ROOT_FLAGS), now)
        entry.checked = now
        return entry

    def _opened(self, sub: str, fd: int, now: float) -> _Open:
        st = os.fstat(fd)
        entry = _Open(fd, (st.st_dev, st.st_ino), now)
        self._open[sub] = entry
        return entry

    def _retire(self, sub: str) -> None:
        entry = self._open.pop(sub, None)
        if entry is not None:
            entry.retired = True
            if entry.leases == 0:
                os.close(entry.fd)

    def _refuse(self, sub: str, st: os.stat_result) -> OSError:
        kind = kind_of(st.st_mode)
        if self._create:
            text = f"{self.root.name}/{sub} is a {kind}, not a folder: move it away"
            return NotADirectoryError(errno.ENOTDIR, text, str(self.root / sub))
        if self._refused.get(sub) != (st.st_dev, st.st_ino):
            self._refused[sub] = (st.st_dev, st.st_ino)
            event(log, "skipped", file=sub, reason=refusal(kind, sub))
        return FolderRefused(errno.ENOENT, f"{sub} is not a folder", str(self.root / sub))


def resolve(drop_dir: Path) -> Path:
    """The drop folder as it really is, resolved once at start: inotify does not follow a
    symlink (a watch on the link would hear nothing) and neither do the folders' descriptors.
    Re-pointing the link later takes a restart."""
    real = Path(os.path.realpath(drop_dir))
    if real != drop_dir:
        event(log, "drop_dir_resolved", drop_dir=str(drop_dir), resolved=str(real))
    return real
