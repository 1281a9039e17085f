"""Renames that never clobber, and clearing a reserved name of what a producer put there.

`rename_noreplace` is `renameat2(RENAME_NOREPLACE)`, atomic and race-free; on filesystems
without it, a hard link then unlink (never clobbers; a crash in between leaves the file in both
places, so it is uploaded again: at-least-once, never lost).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from pathlib import Path

_RENAME_NOREPLACE = 1
AT_FDCWD = -100  # "relative to the working directory", for the *at() calls made through libc
LIBC = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(LIBC, "renameat2", None)


def rename_noreplace(
    src: Path | str, dst: Path | str, src_dir: int | None = None, dst_dir: int | None = None
) -> None:
    """Rename src to dst (each relative to its folder's descriptor, when given); FileExistsError
    when dst exists. Same filesystem only."""
    if _renameat2 is not None:
        if (
            _renameat2(
                AT_FDCWD if src_dir is None else src_dir,
                os.fsencode(src),
                AT_FDCWD if dst_dir is None else dst_dir,
                os.fsencode(dst),
                _RENAME_NOREPLACE,
            )
            == 0
        ):
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir)


def clear_reserved(path: Path, st: os.stat_result) -> str:
    """Clear a name the daemon reserves in the drop folder (its lock, its canary) of what a
    producer put there; how, in words for the log line. A folder is renamed aside in one step,
    to a name no producer can guess and take first: it may be one this user cannot empty, or
    nested too deep to walk, and its content stays the producer's. Anything else (a symlink,
    FIFO, file) is unlinked, never followed or opened. Something swapped in meanwhile (a folder
    for a file, or the other way round) is a FileNotFoundError: the caller looks again."""
    try:
        if not stat.S_ISDIR(st.st_mode):
            path.unlink()
            return "removed"
        aside = path.with_name(f"{path.name}.planted-{secrets.token_hex(8)}")
        os.rename(path, aside)  # a fresh random name: nothing of anyone's is replaced
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise FileNotFoundError(errno.ENOENT, "replaced meanwhile", str(path)) from exc
    return f"moved aside to {aside.name}"
