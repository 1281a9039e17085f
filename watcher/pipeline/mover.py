"""The moves of stage 5: files leave the drop folder only by an atomic rename, never clobbering.

Renames never overwrite (disk/renames.py): a name already taken gets a UTC timestamp (and a
counter) before its suffix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..disk.access import MOVE, UNIT_GROUP, Seen, current_user, drop_group, fix, nearest, refusal
from ..disk.folders import CHECK_SECONDS, Folders
from ..disk.renames import rename_noreplace
from ..items import display, utc_iso
from ..logs import REDACT
from .fates import Blocked, blocked
from .receipts import write_whole

NAME_MAX_BYTES = 255
SIDECAR_SUFFIX = ".error.json"


def stamp(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def candidate_names(name: str, epoch: float, reserve: int = 0) -> Iterator[str]:
    """The names to try in order: the name itself, then `<stem>.<stamp>[-N]<suffix>`.

    Every name leaves `reserve` bytes free under NAME_MAX (failed/ adds `.error.json` beside
    it); the stem is shortened by whole characters when needed. A suffix too long to leave room
    for a stem (`Acme Inc. <a long description>`) is not kept apart: the stamp goes at the end.
    """
    limit = NAME_MAX_BYTES - reserve
    stem, dot, suffix = name.rpartition(".")
    longest = len(os.fsencode(f"{stem[:1]}.{stamp(epoch)}-999.{suffix}"))  # one character of stem
    if not stem or dot != "." or longest > limit:  # no suffix, ".profile", or no room
        stem, suffix = name, ""
    else:
        suffix = "." + suffix
    if len(os.fsencode(name)) <= limit:
        yield name
    for n in range(1, 1000):
        tail = f".{stamp(epoch)}{'' if n == 1 else f'-{n}'}{suffix}"
        yield _fit(stem, limit - len(os.fsencode(tail))) + tail


def _fit(text: str, limit: int) -> str:
    while text and len(os.fsencode(text)) > limit:
        text = text[:-1]
    return text


class Mover:
    """Moves files out of the drop folder; safe to call from several threads at once.

    Every rename is relative to descriptors of the source and target folders (`Folders`): a
    type folder in drop/ that is not a real folder is never followed, and one in done/ or
    failed/ that is not a folder is never made over (the move fails, naming it)."""

    def __init__(
        self,
        drop_dir: Path,
        done_dir: Path,
        failed_dir: Path,
        clock: Callable[[], float],
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self._drop = Folders(drop_dir, check_seconds=check_seconds)
        self._done = Folders(done_dir, create=True, check_seconds=check_seconds)
        self._failed = Folders(failed_dir, create=True, check_seconds=check_seconds)
        self._clock = clock
        self.user = current_user("the daemon's user")

    def relative(self, final: Path) -> str:
        """`done/users/a.csv`: where a file went, as receipts and `status` show it."""
        text = str(final)
        for root in (self._done.root, self._failed.root):
            prefix = f"{root}{os.sep}"
            if text.startswith(prefix):
                return display(f"{root.name}/{text[len(prefix) :]}")
        return display(text)

    def lstat(self, path: Path) -> os.stat_result:
        """The status of a file in the drop folder, through its folder's descriptor."""
        return self._drop.lstat(path)

    def destinations(self, path: Path) -> tuple[Path, Path]:
        """The folders this file would go to in done/ and in failed/ (its type subfolder kept)."""
        sub = path.parent.relative_to(self._drop.root)
        return self._done.root / sub, self._failed.root / sub

    def blocker(self, path: Path, seen: dict[str, FolderLook] | None = None) -> Blocked | None:
        """The first folder that would refuse this file's move, by its permissions, said for an
        operator: its own folder, then where it would go in done/ and in failed/ (or the nearest
        existing parent, where the subfolder would be made). None when the move should work; a
        folder that cannot be looked at is left to the move itself to report. `seen` keeps what
        was found for each folder across the files of one batch: the stats are per folder, and
        so is the verdict, unless the folder is sticky (its rule needs each file's owner)."""
        folder = os.path.dirname(path)  # as text: a Path's parent costs more than the rest
        look = None if seen is None else seen.get(folder)
        if look is None:
            look = FolderLook([_look(f) for f in (path.parent, *self.destinations(path))])
            if seen is not None:
                seen[folder] = look
        if look.judged:
            return look.verdict
        verdict = self._judge(path, look.looked)
        own = look.looked[0][1]
        if own is None or not own.st_mode & stat.S_ISVTX:  # the same for every file in it
            look.judged, look.verdict = True, verdict
        return verdict

    def _judge(self, path: Path, looked: list[Looked]) -> Blocked | None:
        for n, (folder, st) in enumerate(looked):
            if st is None:
                continue
            found = Seen.of(folder, st)
            if not stat.S_ISDIR(st.st_mode):  # done/users taken by a file: never made over
                what = "a file, not a folder: move it away"
                return blocked(folder, found, self.user, what, f"mv {folder} {folder}.moved")
            try:
                sticky = n == 0 and st.st_mode & stat.S_ISVTX
                reason = refusal(
                    found, self.user, MOVE, self.lstat(path).st_uid if sticky else None
                )
            except OSError:
                continue
            if reason is not None:
                return blocked(
                    folder, found, self.user, reason, fix(found, self.user, MOVE, self._group())
                )
        return None

    def _group(self) -> str:
        """The group a `chgrp` fix names (the drop folder's, when the daemon is in it)."""
        try:
            return drop_group(self._drop.root, self.user)
        except OSError:
            return UNIT_GROUP

    def undo(self, final: Path, path: Path) -> None:
        """Take a moved file back to its name in the drop folder (and drop its sidecar, if any):
        what was moved was not the version that was uploaded or refused. Descriptor-relative,
        like every move."""
        sub, name = self._drop.locate(path)
        for tree in (self._done, self._failed):
            moved_sub = tree.sub_of(final.parent)
            if moved_sub is None:
                continue
            with tree.folder(moved_sub) as src, self._drop.folder(sub) as dst:
                rename_noreplace(final.name, name, src, dst)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final.name + SIDECAR_SUFFIX, dir_fd=src)
            return
        raise FileNotFoundError(errno.ENOENT, "not in done/ or failed/", str(final))

    def sync(self, folders: Iterable[Path]) -> None:
        """Make the renames into and out of these folders durable (one fsync per folder). A
        folder removed meanwhile (an operator's `rm -r drop/`) has nothing left to sync."""
        for folder in folders:
            for tree in (self._drop, self._done, self._failed):
                sub = tree.sub_of(folder)
                if sub is not None:
                    with contextlib.suppress(FileNotFoundError), tree.folder(sub) as fd:
                        os.fsync(fd)
                    break

    def close(self) -> None:
        for tree in (self._drop, self._done, self._failed):
            tree.close()

    def to_done(self, path: Path) -> Path:
        return self._move(path, self._done, reserve=0)

    def to_failed(self, path: Path, sidecar: dict[str, Any]) -> Path:
        """Write `<final name>.error.json` (mode 0640), then move the file beside it.

        The sidecar comes first, so a file never sits in failed/ without its reason: if the
        sidecar cannot be written (a full disk), nothing moves and the file waits in drop/.
        """
        text = json.dumps(REDACT.doc({**sidecar, "failed_at": utc_iso(self._clock())}), indent=2)
        text += "\n"

        def claim(folder: int, name: str) -> str:
            sidecar_name = name + SIDECAR_SUFFIX
            try:
                write_new(sidecar_name, text, dir_fd=folder)
            except FileExistsError:
                if _present(name, folder):
                    raise  # the name is taken: the next one
                # A sidecar without its file: a stop (kill -9) came between the two. Its file
                # was left in drop/ and is this one, or went back with retry-failed: it is stale.
                os.unlink(sidecar_name, dir_fd=folder)
                write_new(sidecar_name, text, dir_fd=folder)
            return sidecar_name

        return self._move(path, self._failed, reserve=len(SIDECAR_SUFFIX), claim=claim)

    def _move(
        self,
        path: Path,
        target: Folders,
        reserve: int,
        claim: Callable[[int, str], str] | None = None,
    ) -> Path:
        """Keeps the type subfolder (drop/users/a.csv -> done/users/a.csv)."""
        sub, name = self._drop.locate(path)
        try:
            return self._move_once(sub, name, target, reserve, claim)
        except FileNotFoundError:
            if not self._drop.exists(sub, name):
                raise  # the file itself is gone
            target.recheck()  # someone removed done/ or failed/: made again
            return self._move_once(sub, name, target, reserve, claim)

    def _move_once(
        self,
        sub: str,
        name: str,
        target: Folders,
        reserve: int,
        claim: Callable[[int, str], str] | None,
    ) -> Path:
        with self._drop.folder(sub) as src, target.folder(sub, fresh=False) as dst:
            for final in candidate_names(name, self._clock(), reserve):
                try:
                    claimed = claim(dst, final) if claim is not None else None
                except FileExistsError:
                    continue
                try:
                    rename_noreplace(name, final, src, dst)
                except BaseException as exc:
                    if claimed is not None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(claimed, dir_fd=dst)
                    if isinstance(exc, FileExistsError):
                        continue
                    raise
                return target.root / sub / final
        raise FileExistsError(errno.EEXIST, "no free name left", str(target.root / sub / name))


Looked = tuple[Path, os.stat_result | None]  # a folder (or its nearest parent) and its status


@dataclass(slots=True)
class FolderLook:
    """What one batch found for a folder of files: the status of it and of the folders its files
    would go to, and, once judged and unless it is sticky, the verdict for all its files."""

    looked: list[Looked]
    judged: bool = False
    verdict: Blocked | None = None


def _look(folder: Path) -> Looked:
    try:
        return nearest(folder)
    except OSError:
        return folder, None


def _present(name: str, folder: int) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_new(path: Path | str, text: str, mode: int = 0o640, dir_fd: int | None = None) -> None:
    """Create a small file that must not exist yet, whole or not at all (fsynced)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode, dir_fd=dir_fd)
    try:
        write_whole(fd, text.encode("utf-8", "surrogateescape"))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=dir_fd)
        raise
    os.close(fd)
