"""The operator's commands beside the daemon: `status [FILE]` and `retry-failed`.

Both work from the folders and the state folder alone (status file, receipts journal,
sidecars), so they answer whether or not the daemon runs, and need no credentials.
"""

from __future__ import annotations

import calendar
import errno
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..daemon import statusfile
from ..daemon.instance import Holder, active_holder, planted
from ..disk.folders import LOCK_NAME, Folders, kind_of
from ..disk.renames import rename_noreplace
from ..items import display, printable
from ..pipeline.mover import SIDECAR_SUFFIX, candidate_names
from ..pipeline.receipts import Journal
from ..settings import FILE_TYPES, ConfigError, Paths, Settings, require_state_dir

NOT_RUNNING = 3
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`90`, `30m`, `12h`, `7d`, `2w` as seconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 12h, 7d)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _journal(settings: Settings) -> Journal:
    return Journal(
        require_state_dir(settings), int(settings.receipts_max_bytes), settings.receipts_keep
    )


def status(settings: Settings, file: str | None, as_json: bool) -> int:
    """Print what the daemon is doing (exit 3 if it is not running), or one file's receipt."""
    journal = _journal(settings)
    if file is not None:
        return _file_status(settings, journal, file, as_json)
    doc = statusfile.read(journal.folder)
    alive = statusfile.running(doc, time.time())
    recent = [r for r, _ in zip(journal.newest_first(), range(5), strict=False)]
    holder = None if settings.drop_dir is None else active_holder(settings.drop_dir)
    stale = not alive and holder is not None and _a_daemon(holder, settings.drop_dir)
    if as_json:
        active = None if holder is None else {"pid": holder.pid, "host": holder.host}
        out = {"running": alive or stale, "active": active, "status": doc, "recent": recent}
        print(json.dumps({**out, "status_stale": stale}, indent=1))
    else:
        print(f"active instance: {holder.describe() if holder else 'none holds the drop folder'}")
        path = journal.folder / statusfile.NAME
        if stale:  # the lock says it runs; its status file cannot say what it does
            print(f"running, but {path} is not kept up to date: is its folder full or read-only?")
        else:
            try:
                print(_describe(doc, alive))
            except (KeyError, TypeError, ValueError):
                print(f"the status file {path} is damaged: not described")
        for receipt in recent:
            print("  " + _receipt_line(receipt))
    return 0 if alive or stale else NOT_RUNNING


def _a_daemon(holder: Holder, drop: Path | None) -> bool:
    """Is the lock's holder a daemon, not a producer's flock on a file it planted? The lock file
    is a regular file of this user, root or the drop folder's owner; on this host, its pid lives.
    (On another host, as in high availability, the lock is all there is to go by.)"""
    if drop is None or holder.pid is None:
        return False
    try:
        st, owner = os.lstat(drop / LOCK_NAME), os.stat(drop).st_uid
    except OSError:
        return False
    if planted(st, {os.geteuid(), 0, owner}) is not None:
        return False
    return holder.host != socket.gethostname() or statusfile.alive(holder.pid)


def _describe(doc: dict[str, Any] | None, alive: bool) -> str:
    if doc is None:
        return "not running (no status file yet)"
    if not alive:
        return f"not running (last status {doc.get('updated')}, state {doc.get('state')})"
    if doc["state"] == "standby":
        return (
            f"standby since {doc['started']} (pid {doc['pid']}, version {doc['version']}):"
            f" the drop folder {doc['drop_dir']} is held by {doc.get('active')}\nrecent:"
        )
    lines = [
        f"running since {doc['started']} (pid {doc['pid']}, version {doc['version']}),"
        f" watching {doc['drop_dir']}",
        f"  {doc['waiting']} waiting, {len(doc['uploading'])} uploading,"
        f" {doc['uploaded']} uploaded and {doc['failed']} failed since start;"
        f" last upload {doc['last_upload'] or 'none yet'}",
    ]
    for upload in doc["uploading"]:
        share = upload["bytes_sent"] / upload["bytes"] if upload["bytes"] else 1.0
        name = printable(str(upload["file"]))
        lines.append(f"  uploading {name}: {share:.0%} of {upload['bytes']} bytes")
    if doc.get("retrying_since"):
        error = printable(str(doc["last_error"]))
        lines.append(f"  service unavailable since {doc['retrying_since']}: {error}")
    lines += _marker_lines(doc)
    for text in doc.get("folders") or []:  # not an outage: a folder that holds files back
        lines.append(f"  FOLDER: files wait: {printable(str(text))}")
    if doc.get("watch") != "ok":
        lines.append(f"  WATCH: {printable(str(doc['watch']))}")
    lines.append("recent:")
    return "\n".join(lines)


def _marker_lines(doc: dict[str, Any]) -> list[str]:
    """Files held for their ready marker, with how long: a producer that never wrote it."""
    count = doc.get("waiting_for_marker") or 0
    if not count:
        return []
    files = doc.get("waiting_for_marker_files") or []
    lines = [f"  {count} waiting for their ready marker ({doc.get('ready_marker')}):"]
    lines += [f"    {printable(str(f['file']))}: waiting {_age(f['seconds'])}" for f in files[:5]]
    if count > 5:
        lines.append(f"    and {count - 5} more")
    return lines


def _age(seconds: int) -> str:
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02}m" if hours else f"{minutes}m {secs:02}s"


def _receipt_line(r: dict[str, Any]) -> str:
    """One receipt as one line: every text in it is the journal's, names and reasons included."""
    where = f" -> {r['moved_to']}" if r.get("moved_to") else ""
    if r.get("late_write"):
        where = f" again from {r['moved_to']} (late write)"
    detail = f" sha256 {r['sha256']}" if r.get("sha256") else ""
    reason = f": {r['reason']}" if r.get("reason") else ""
    return printable(f"{r.get('time')} {r.get('outcome')} {r.get('file')}{where}{detail}{reason}")


def _file_status(settings: Settings, journal: Journal, file: str, as_json: bool) -> int:
    """Was this file uploaded, when, under which name, with which checksum? 1 if unknown."""
    wanted = receipt_key(settings, file)
    found = [r for r in journal.newest_first() if matches(r, wanted)]
    if as_json:
        print(json.dumps(found, indent=1))
    elif not found:
        print(f"no receipt for {printable(file)}")
    for receipt in [] if as_json else found:
        print(_receipt_line(receipt))
    return 0 if found else 1


def receipt_key(settings: Settings, file: str) -> str:
    """FILE as receipts spell it: relative to the drop folder, `done/...` or `failed/...` for
    a path in those (the name it was moved to), bytes that are not UTF-8 escaped."""
    path, drop = Path(file), settings.drop_dir
    if not path.is_absolute():
        return display(file)
    if drop is not None and path.is_relative_to(drop):
        return display(str(path.relative_to(drop)))
    for root in (settings.done_dir, settings.failed_dir):
        if root is not None and path.is_relative_to(root):
            return display(f"{root.name}/{path.relative_to(root)}")
    return display(file)


def matches(receipt: dict[str, Any], wanted: str) -> bool:
    """The file a receipt is about, or the name it was moved to, is `wanted` or ends in it."""
    names = [str(receipt.get("file") or ""), str(receipt.get("moved_to") or "")]
    return any(name and (name == wanted or name.endswith("/" + wanted)) for name in names)


def failed_files(failed_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(file, its sidecar or {}) for every file in failed/ and its type subfolders."""
    for folder in [failed_dir, *(failed_dir / t for t in FILE_TYPES)]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.endswith(SIDECAR_SUFFIX) or not path.is_file() or path.is_symlink():
                continue
            sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
            try:
                doc = json.loads(sidecar.read_text(encoding="utf-8", errors="replace"))
            except (FileNotFoundError, ValueError):
                doc = {}
            yield path, doc if isinstance(doc, dict) else {}


def retry_failed(
    settings: Settings, reason: str | None, older_than: str | None, dry_run: bool
) -> int:
    """Move failed files back into the drop folder (their type subfolder), sidecars removed.

    The moves go through the drop folder's descriptors, as the daemon's do: a type folder a
    producer replaced with a symlink is refused, never followed out of the tree."""
    paths = Paths.of(settings)
    drop, failed = paths.drop, paths.failed
    try:
        age = parse_duration(older_than) if older_than else None
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from None
    now = time.time()
    drops = Folders(drop, create=True)  # used only to move: a dry run makes nothing
    moved = refused = 0
    for path, sidecar in failed_files(failed):
        if reason and reason.lower() not in str(sidecar.get("reason", "")).lower():
            continue
        if age is not None and now - _failed_at(path, sidecar) < age:
            continue
        sub = "" if path.parent == failed else path.parent.name
        source = f"{failed.name}/{path.relative_to(failed)}"
        try:
            name = _move_back(path, drops, sub, now, dry_run)
        except OSError as exc:
            refused += 1
            print(printable(f"not moved: {source}: {exc.strerror or exc}"))
            continue
        moved += 1
        verb = "would move" if dry_run else "moved"
        print(printable(f"{verb} {source} -> {drop.name}/{os.path.join(sub, name)}"))
    drops.close()
    print(f"{moved} file(s) {'would be ' if dry_run else ''}moved back to {drop}")
    return 1 if refused else 0


def _move_back(path: Path, drops: Folders, sub: str, now: float, dry_run: bool) -> str:
    """Rename a failed file into drop/ (its type folder), under the first free name; the name.
    OSError naming the type folder when it is not a real folder (a dry run says the same)."""
    if dry_run:
        return _free_name(path.name, drops.root, sub, now)
    for name in candidate_names(path.name, now):
        try:
            with drops.folder(sub) as folder:
                rename_noreplace(path, name, dst_dir=folder)
        except FileExistsError:
            continue
        path.with_name(path.name + SIDECAR_SUFFIX).unlink(missing_ok=True)
        return name
    raise FileExistsError(errno.EEXIST, "no free name in the drop folder")


def _free_name(name: str, drop: Path, sub: str, now: float) -> str:
    """The name a move back would take, found without making or moving anything."""
    folder = drop / sub
    try:
        st = os.stat(folder) if not sub else os.lstat(folder)  # drop_dir itself may be a link
    except FileNotFoundError:
        return name  # the type folder would be made: every name is free
    if not stat.S_ISDIR(st.st_mode):
        text = f"{drop.name}/{sub} is a {kind_of(st.st_mode)}, not a folder: move it away"
        raise NotADirectoryError(errno.ENOTDIR, text)
    for candidate in candidate_names(name, now):
        if not os.path.lexists(folder / candidate):
            return candidate
    raise FileExistsError(errno.EEXIST, "no free name in the drop folder")


def _failed_at(path: Path, sidecar: dict[str, Any]) -> float:
    stamp = sidecar.get("failed_at")
    if isinstance(stamp, str):
        try:
            return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            pass
    return path.stat().st_ctime
