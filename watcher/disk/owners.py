"""What the daemon makes belongs to the owner of the folder it is made in, when it runs as root.

The service runs as its own user, but an operator may run `productiv-watcher run` (or
`retry-failed`) by hand as root, and a root instance standing by takes the drop folder over
when the service stops or restarts. Whatever it made would be root's (`done/users` as
`drwxr-sr-x root`, `receipts.jsonl` as `root 0640`), and the service, back in charge, could
move no file into that folder and write no receipt. So, as root, each new folder or file gets
the owner and group of the folder it was made in (the service's own, as install.sh made them).
Any other user cannot give files away and needs nothing: it owns what it makes. Best effort:
a filesystem that refuses (NFS with root_squash) keeps root's ownership, as before.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def adopt(name: str | Path, dir_fd: int | None = None) -> None:
    """Give `name` (relative to `dir_fd`, or a path) its folder's owner and group, as root."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        folder = os.fstat(dir_fd) if dir_fd is not None else os.stat(Path(name).parent)
        os.chown(name, folder.st_uid, folder.st_gid, dir_fd=dir_fd, follow_symlinks=False)


def adopt_open(fd: int, folder: Path) -> None:
    """The same for a file open on `fd` in `folder` (one this process created, or one an
    earlier root run left behind: given back too)."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        owner, mine = os.stat(folder), os.fstat(fd)
        if (mine.st_uid, mine.st_gid) != (owner.st_uid, owner.st_gid):
            os.fchown(fd, owner.st_uid, owner.st_gid)


def make_folders(path: Path) -> None:
    """`mkdir -p`, each folder it makes adopted by its parent's owner."""
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            adopt(folder)
