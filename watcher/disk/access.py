"""Can a user work in these folders? One judgement for `check` and for the daemon's moves.

`check` runs as root or as an operator, but the daemon runs as the unit's user with the drop
group (`SupplementaryGroups=`); `os.access` answers only for the caller, and root passes every
test. So the judgement is a pure function of stat results and (uid, gids), the kernel's rule
without ACLs (path_resolution(7), rename(2)): the owner's bits if the user owns the folder, else
the group's bits if the user is in its group, else the others' bits (a class that applies is
never topped up by the next); with the sticky bit, moving a file out also takes owning the file
or the folder. The daemon asks it before each PUT (can the file be moved afterwards?), `check`
for the service's user; both say the same reason and the same fix.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import grp
import os
import pwd
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from ..settings import FILE_TYPES, ConfigError, Paths, Settings
from .overlap import overlaps
from .owners import make_folders
from .renames import AT_FDCWD, LIBC

_STATX_MNT_ID = 0x1000
_statx = getattr(LIBC, "statx", None)

UNIT_USER = "productiv-watcher"  # the units' User=
UNIT_GROUP = "productiv-drop"  # the units' SupplementaryGroups=: producers' group
WORK = "rwx"  # list (scan), create and remove entries (moves), reach them
MOVE = "wx"  # rename a file out of or into a folder
STICKY = "the sticky bit: only the file's owner or the folder's owner may move the file"
_BITS = {"r": 4, "w": 2, "x": 1}
_WORDS = {"r": "read", "w": "write", "x": "search"}


@dataclass(frozen=True, slots=True)
class User:
    """Whom the folders are judged for, and why that user."""

    name: str
    uid: int
    gids: frozenset[int]
    why: str


@dataclass(frozen=True, slots=True)
class Seen:
    """What a stat of a folder showed (owner and group as numbers)."""

    path: Path
    mode: int
    owner: int
    group: int

    @classmethod
    def of(cls, path: Path, st: os.stat_result) -> Seen:
        return cls(path, st.st_mode, st.st_uid, st.st_gid)


def _class(seen: Seen, user: User) -> tuple[int, str, str]:
    """(shift of the bits, who, chmod's letter) of the one class of bits that applies."""
    if user.uid == seen.owner:
        return 6, "its owner", "u"
    if seen.group in user.gids:
        return 3, "its group", "g"
    return 0, "others", "o"


def lacks(seen: Seen, user: User, need: str) -> str:
    """The letters of `need` ("x", "wx", "rwx") that `user` does not have on the folder, in
    that order; "" when it has them all. Root has them all."""
    if user.uid == 0:
        return ""
    bits = seen.mode >> _class(seen, user)[0]
    return "".join(c for c in need if not bits & _BITS[c])


def permits(seen: Seen, user: User, need: str) -> bool:
    """May `user` do `need` on the folder? Root may do anything."""
    return not lacks(seen, user, need)


def refusal(seen: Seen, user: User, need: str, file_owner: int | None = None) -> str | None:
    """Why `user` cannot do `need` on the folder, or None. With `file_owner` (a file to be
    moved out of it), the sticky bit's rule too. ACLs, read-only mounts and security modules
    are not seen here: the move itself reports what they refuse."""
    missing = [_WORDS[c] for c in lacks(seen, user, need)]
    if missing:
        words = " and ".join(missing) if len(missing) < 3 else "read, write and search"
        return f"no {words} permission for {_class(seen, user)[1]}"
    sticky = seen.mode & stat.S_ISVTX and file_owner is not None
    if sticky and user.uid not in (0, file_owner, seen.owner):
        return STICKY
    return None


def blocker(chain: list[Seen], user: User, need: str = WORK) -> tuple[Seen, str] | None:
    """The first folder on the path that stops the user, with what it lacks: search (x) on
    every folder above the last one, `need` on the last one. None: the way is open."""
    for seen in chain[:-1]:
        if not permits(seen, user, "x"):
            return seen, "x"
    return None if permits(chain[-1], user, need) else (chain[-1], need)


def fix(seen: Seen, user: User, need: str, group_name: str) -> str:
    """The smallest command that gives `user` what `refusal` said it lacks on the folder (a
    folder whose bits allow it refused for its sticky bit)."""
    if permits(seen, user, need):
        return f"chmod -t {seen.path}"
    letter = _class(seen, user)[2]
    if letter != "o" or need == "x":
        return f"chmod {letter}+{need} {seen.path}"
    return f"chgrp {group_name} {seen.path} && chmod g+{need} {seen.path}"


# -- the thin layer: users, stats and sentences ------------------------------------------------

ANOTHER_USER = -1  # the owner of a producer's file, as the sticky bit's rule sees it


def service_user(as_user: str | None) -> User:
    """`--as-user NAME`; else, for root, the unit's user when it exists; else the caller."""
    if as_user is None and os.geteuid() == 0:
        try:
            return _named(UNIT_USER, "the unit's user (User=, SupplementaryGroups=)")
        except KeyError:
            pass
    if as_user is None:
        return current_user("the current user")
    try:
        return _named(as_user, "--as-user")
    except KeyError:
        raise ConfigError(f"--as-user {as_user}: no such user") from None


def current_user(why: str) -> User:
    """The user this process runs as, with its groups."""
    uid, gids = os.geteuid(), frozenset([os.getegid(), *os.getgroups()])
    return User(user_name(uid), uid, gids, why)


def _named(name: str, why: str) -> User:
    entry = pwd.getpwnam(name)
    gids = set(os.getgrouplist(name, entry.pw_gid))
    if name == UNIT_USER:
        with contextlib.suppress(KeyError):
            gids.add(grp.getgrnam(UNIT_GROUP).gr_gid)  # what the unit adds at start
    return User(name, entry.pw_uid, frozenset(gids), why)


def describe_user(user: User) -> str:
    groups = ",".join(sorted(group_name(g) for g in user.gids))
    return f"{user.name} (uid {user.uid}, groups {groups}), {user.why}"


def owners(seen: Seen) -> str:
    """`alice:productiv-drop`, numbers where they have no name."""
    return f"{user_name(seen.owner)}:{group_name(seen.group)}"


def look(path: Path) -> Seen:
    return Seen.of(path, os.stat(path))


def nearest(folder: Path) -> tuple[Path, os.stat_result]:
    """The folder, or its nearest existing parent (where it would be created), with its status."""
    while True:
        try:
            return folder, os.stat(folder)
        except FileNotFoundError:
            if folder.parent == folder:
                raise
            folder = folder.parent


def problem(name: str, wanted: Path, user: User, group: str, moved_out: bool = False) -> str | None:
    """One sentence, with its fix, when `user` cannot work in `wanted` (or, when it does not
    exist yet, create it in its nearest existing folder); None when it can. `moved_out`: the
    producers' files are moved out of it (the sticky bit's rule)."""
    existing = nearest(wanted)[0]
    chain = [look(p) for p in [*reversed(existing.parents), existing]]
    seen, need = blocker(chain, user) or (chain[-1], WORK)
    sticky = moved_out and seen.path == wanted  # a producer's file leaves it
    reason = refusal(seen, user, need, ANOTHER_USER if sticky else None)
    if reason is None:
        return None
    where = f"{owners(seen)} {stat.filemode(seen.mode)}"
    where = where if seen.path == existing else f"{seen.path} is {where}"
    what = "work in it" if existing == wanted else "create it"
    if reason == STICKY:
        what = "move other users' files out of it"
    return (
        f"{name} {wanted}: {user.name} cannot {what} ({where}: {reason});"
        f" fix: {fix(seen, user, need, group)}"
    )


def type_folder_problems(roots: list[tuple[str, Path]], user: User, group_name: str) -> list[str]:
    """The type folders (users/, contracts/, other/) of drop, done and failed that exist and
    that `user` cannot work in: producers make them with their umask."""
    found = []
    for name, root in roots:
        for file_type in FILE_TYPES:
            folder = root / file_type
            if folder.is_dir() and not folder.is_symlink():
                text = problem(
                    f"{name}/{file_type}", folder, user, group_name, moved_out=name == "drop_dir"
                )
                found += [text] if text else []
    return found


def drop_group(drop: Path, user: User) -> str:
    """The group to give a folder: the drop folder's when the user is in it, else the unit's."""
    gid = look(drop).group
    return group_name(gid) if gid in user.gids else UNIT_GROUP


def _basics(settings: Settings) -> tuple[list[tuple[str, Path]], list[str]]:
    """The four folders by setting name, and what is wrong before any is looked into: a drop
    folder that is not there, or folders that overlap (the rest would judge the wrong ones)."""
    paths = Paths.of(settings)
    drop = paths.drop
    folders = [
        ("drop_dir", drop),
        ("done_dir", paths.done),
        ("failed_dir", paths.failed),
        ("state_dir", paths.state),
    ]
    if not drop.is_dir():
        return folders, [f"drop_dir {drop} does not exist or is not a folder (it is never created)"]
    return folders, overlaps(folders)


def _apart(name: str, wanted: Path, drop: Path) -> list[str]:
    """done/ and failed/ must be on the drop folder's filesystem, and on its mount: files move
    by rename, which cannot cross either (EXDEV), not even a bind mount of the same filesystem."""
    if name not in ("done_dir", "failed_dir"):
        return []
    where = nearest(wanted)[0]
    if os.stat(where).st_dev != drop.stat().st_dev:
        return [f"{name} {wanted} is not on the drop folder's filesystem (files move by rename)"]
    if not same_mount(where, drop):
        return [
            f"{name} {wanted} is on another mount of the drop folder's filesystem (a bind"
            f" mount): files move by rename, which cannot cross mounts; use folders under one"
            f" mount ({mount_of(drop) or '?'})"
        ]
    return []


def same_mount(one: Path, other: Path) -> bool:
    """Are both on one mount (a rename between them can work)? By the mount's id (statx), else,
    on a kernel before 5.8, by the mount table's longest mount point above each."""
    ids = mount_id(one), mount_id(other)
    if None not in ids:
        return ids[0] == ids[1]
    return mount_of(one) == mount_of(other)


def mount_id(path: Path) -> int | None:
    """The id of the mount `path` is on (statx's STATX_MNT_ID, Linux 5.8+), or None."""
    buf = ctypes.create_string_buffer(256)  # struct statx
    if _statx is None or _statx(AT_FDCWD, os.fsencode(path), 0, _STATX_MNT_ID, buf) != 0:
        return None
    if not int.from_bytes(buf.raw[0:4], sys.byteorder) & _STATX_MNT_ID:  # stx_mask
        return None
    return int.from_bytes(buf.raw[0x90:0x98], sys.byteorder)  # stx_mnt_id


def mount_of(path: Path, table: str = "/proc/self/mountinfo") -> str | None:
    """The mount point of the mount that holds `path` (its real path), from the mount table;
    None when there is no table to read."""
    try:
        with open(table, encoding="utf-8", errors="surrogateescape") as lines:
            points = [_unescape(line.split()[4]) for line in lines]
    except (OSError, IndexError):
        return None
    real = os.path.realpath(path)
    best = None  # the longest mount point above it; the last of equals (mounted over) wins
    for point in points:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best)):
            best = point
    return best


def _unescape(field: str) -> str:
    """A mount table's field: space, tab, newline and backslash are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def folder_report(settings: Settings, user: User) -> tuple[list[str], list[str]]:
    """(problems, notes) about the folders, judged for `user`; nothing is created (`check`).

    A folder that does not exist yet is fine when the user can create it where it belongs:
    the daemon creates done/, failed/ and the state folder at start (a note says so)."""
    folders, problems = _basics(settings)
    if problems:
        return problems, []
    drop = folders[0][1]
    group = drop_group(drop, user)
    notes: list[str] = []
    for name, wanted in folders:
        text = problem(name, wanted, user, group, moved_out=name == "drop_dir")
        if text is not None:
            problems.append(text)
            continue
        if not wanted.exists():
            notes.append(f"{name} {wanted} will be created at start")
        elif not wanted.is_dir():
            problems.append(f"{name} {wanted} is not a folder")
        problems += _apart(name, wanted, drop)
    return problems + type_folder_problems(folders[:3], user, group), notes


def prepare_folders(settings: Settings) -> list[str]:
    """The daemon's start: creates done/, failed/ and the state folder when missing; problems
    with the folders, one sentence each (this process's own access, ACLs included)."""
    folders, problems = _basics(settings)
    if problems:
        return problems  # before creating anything inside another folder
    drop = folders[0][1]
    for name, wanted in folders:
        if not wanted.exists():
            try:
                make_folders(wanted)  # as root, given to the owner of the folder above
            except OSError as exc:
                problems.append(f"{name} {wanted} cannot be created: {exc.strerror}")
                continue
        if not wanted.is_dir():
            problems.append(f"{name} {wanted} does not exist")
        elif not os.access(wanted, os.W_OK | os.X_OK):
            problems.append(f"{name} {wanted} is not writable by this user")
        else:
            problems += _apart(name, wanted, drop)
    return problems


@functools.lru_cache(maxsize=64)  # each held file is described: the passwd file is read once
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=64)
def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
