"""Can the service's user work in these folders? `check`'s judgement, made for another user.

`check` runs as root or as an operator, but the daemon runs as the unit's user with the drop
group (`SupplementaryGroups=`); `os.access` answers only for the caller, and root passes every
test. So the judgement is a pure function of stat results and (uid, gids), the kernel's rule
without ACLs: the owner's bits if the user owns the folder, else the group's bits if the user
is in its group, else the others' bits.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .mover import overlaps
from .settings import FILE_TYPES, ConfigError, Settings, require_folders

UNIT_USER = "productiv-watcher"  # the units' User=
UNIT_GROUP = "productiv-drop"  # the units' SupplementaryGroups=: producers' group
WORK = "rwx"  # list (scan), create and remove entries (moves), reach them


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


def permits(seen: Seen, user: User, need: str) -> bool:
    """May `user` do `need` ("x", "rwx"...) on the folder? Root may do anything."""
    if user.uid == 0:
        return True
    if user.uid == seen.owner:
        shift = 6
    elif seen.group in user.gids:
        shift = 3
    else:
        shift = 0
    wanted = sum({"r": 4, "w": 2, "x": 1}[c] for c in need)
    return (seen.mode >> shift) & wanted == wanted


def blocker(chain: list[Seen], user: User, need: str = WORK) -> tuple[Seen, str] | None:
    """The first folder on the path that stops the user, with what it lacks: search (x) on
    every folder above the last one, `need` on the last one. None: the way is open."""
    for seen in chain[:-1]:
        if not permits(seen, user, "x"):
            return seen, "x"
    return None if permits(chain[-1], user, need) else (chain[-1], need)


def sticky_blocks(seen: Seen, user: User) -> bool:
    """A sticky folder lets only a file's owner or the folder's owner move the file out: the
    service could move none of the producers' files (rename(2), EPERM)."""
    return bool(seen.mode & stat.S_ISVTX) and user.uid not in (0, seen.owner)


def fix(seen: Seen, user: User, need: str, group_name: str) -> str:
    """The smallest command that gives `user` what it lacks on the folder."""
    if user.uid == seen.owner:
        return f"chmod u+{need} {seen.path}"
    if seen.group in user.gids:
        return f"chmod g+{need} {seen.path}"
    if need == "x":
        return f"chmod o+x {seen.path}"
    return f"chgrp {group_name} {seen.path} && chmod g+{need} {seen.path}"


# -- the thin layer: users, stats and sentences ------------------------------------------------


def service_user(as_user: str | None) -> User:
    """`--as-user NAME`; else, for root, the unit's user when it exists; else the caller."""
    if as_user is None and os.geteuid() == 0:
        try:
            return _named(UNIT_USER, "the unit's user (User=, SupplementaryGroups=)")
        except KeyError:
            pass
    if as_user is None:
        gids = frozenset([os.getegid(), *os.getgroups()])
        return User(_user_name(os.geteuid()), os.geteuid(), gids, "the current user")
    try:
        return _named(as_user, "--as-user")
    except KeyError:
        raise ConfigError(f"--as-user {as_user}: no such user") from None


def _named(name: str, why: str) -> User:
    entry = pwd.getpwnam(name)
    gids = set(os.getgrouplist(name, entry.pw_gid))
    if name == UNIT_USER:
        with contextlib.suppress(KeyError):
            gids.add(grp.getgrnam(UNIT_GROUP).gr_gid)  # what the unit adds at start
    return User(name, entry.pw_uid, frozenset(gids), why)


def describe_user(user: User) -> str:
    groups = ",".join(sorted(_group_name(g) for g in user.gids))
    return f"{user.name} (uid {user.uid}, groups {groups}), {user.why}"


def look(path: Path) -> Seen:
    st = os.stat(path)
    return Seen(path, st.st_mode, st.st_uid, st.st_gid)


def problem(name: str, wanted: Path, user: User, group: str, moves_out: bool = False) -> str | None:
    """One sentence, with its fix, when `user` cannot work in `wanted` (or, when it does not
    exist yet, create it in its nearest existing folder); None when it can. `moves_out`: a
    folder of the drop side, whose files (the producers') the user must move out."""
    existing = _nearest(wanted)
    chain = [look(p) for p in [*reversed(existing.parents), existing]]
    found = blocker(chain, user)
    if found is None and moves_out and existing == wanted and sticky_blocks(chain[-1], user):
        seen = chain[-1]
        return (
            f"{name} {wanted}: {user.name} cannot move other users' files out of it"
            f" ({_describe(seen)}: the sticky bit); fix: chmod -t {wanted}"
        )
    if found is None:
        return None
    seen, need = found
    text = _describe(seen)
    where = text if seen.path == existing else f"{seen.path} is {text}"
    what = "work in it" if existing == wanted else "create it"
    return (
        f"{name} {wanted}: {user.name} cannot {what} ({where}, no {need} for {user.name});"
        f" fix: {fix(seen, user, need, group)}"
    )


def _describe(seen: Seen) -> str:
    return f"{_user_name(seen.owner)}:{_group_name(seen.group)} {stat.filemode(seen.mode)}"


def type_folder_problems(roots: list[tuple[str, Path]], user: User, group_name: str) -> list[str]:
    """The type folders (users/, contracts/, other/) of drop, done and failed that exist and
    that `user` cannot work in: producers make them with their umask."""
    found = []
    for name, root in roots:
        for file_type in FILE_TYPES:
            folder = root / file_type
            if folder.is_dir() and not folder.is_symlink():
                text = problem(f"{name}/{file_type}", folder, user, group_name, name == "drop_dir")
                found += [text] if text else []
    return found


def drop_group(drop: Path, user: User) -> str:
    """The group to give a folder: the drop folder's when the user is in it, else the unit's."""
    gid = look(drop).group
    return _group_name(gid) if gid in user.gids else UNIT_GROUP


def folder_report(settings: Settings, user: User) -> tuple[list[str], list[str]]:
    """(problems, notes) about the folders, judged for `user`; nothing is created.

    A folder that does not exist yet is fine when the user can create it where it belongs:
    the daemon creates done/, failed/ and the state folder at start (a note says so)."""
    drop, done, failed = require_folders(settings)
    if not drop.is_dir():
        return [f"drop_dir {drop} does not exist or is not a folder (it is never created)"], []
    assert settings.state_dir is not None  # derived from drop_dir when not set
    roots = [("drop_dir", drop), ("done_dir", done), ("failed_dir", failed)]
    overlapping = overlaps([*roots, ("state_dir", settings.state_dir)])
    if overlapping:
        return overlapping, []  # the rest would judge the wrong folders
    group = drop_group(drop, user)
    problems: list[str] = []
    notes: list[str] = []
    for name, wanted in [*roots, ("state_dir", settings.state_dir)]:
        text = problem(name, wanted, user, group, name == "drop_dir")
        if text is not None:
            problems.append(text)
            continue
        if not wanted.exists():
            notes.append(f"{name} {wanted} will be created at start")
        elif not wanted.is_dir():
            problems.append(f"{name} {wanted} is not a folder")
        if (
            name in ("done_dir", "failed_dir")
            and _nearest(wanted).stat().st_dev != drop.stat().st_dev
        ):
            problems.append(
                f"{name} {wanted} is not on the drop folder's filesystem (files move by rename)"
            )
    return problems + type_folder_problems(roots, user, group), notes


def _nearest(path: Path) -> Path:
    """The path itself, or the nearest folder above it that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _lookup(func: Callable[[int], str], number: int) -> str:
    try:
        return func(number)
    except KeyError:
        return str(number)


def _user_name(uid: int) -> str:
    return _lookup(lambda n: pwd.getpwuid(n).pw_name, uid)


def _group_name(gid: int) -> str:
    return _lookup(lambda n: grp.getgrgid(n).gr_name, gid)
