"""The status file: what the running daemon is doing, for `productiv-watcher status`.

The main loop rewrites `status.json` in the state folder atomically every `status_seconds`;
`status` reads it. A file that says `stopped`, names a process that is gone, or has not been
rewritten for a while means the daemon is not running.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from ..disk.owners import adopt, make_folders
from ..items import utc_iso
from ..logs import REDACT

NAME = "status.json"


def write(folder: Path, doc: dict[str, Any]) -> None:
    """Whole or not at all: a temporary file in the same folder, then a rename. Scrubbed:
    `last_error` carries the API's own words, which may echo a credential."""
    make_folders(folder)
    tmp = folder / f".{NAME}.{os.getpid()}"
    text = json.dumps(REDACT.doc(doc), indent=1, ensure_ascii=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    adopt(tmp)
    os.replace(tmp, folder / NAME)


def read(folder: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((folder / NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def running(doc: dict[str, Any] | None, now: float) -> bool:
    """Does the status file describe a live daemon (active or standing by)? A process on
    another host (a state folder on a shared mount) counts as live while the file is fresh."""
    if not doc or doc.get("state") not in ("running", "standby"):
        return False
    try:
        stale_after = 3 * float(doc.get("every_seconds", 2.0)) + 5.0
        if now - float(doc.get("updated_epoch", 0)) > stale_after:
            return False
    except (TypeError, ValueError):
        return False  # not as a daemon writes it: describes no live one
    if doc.get("host", socket.gethostname()) != socket.gethostname():
        return True
    return alive(doc.get("pid"))


def alive(pid: Any) -> bool:
    """Is there a process with this pid (as the status file has it) on this host?"""
    try:
        number = int(pid)
        if number <= 0:  # 0 would be this process group: "alive" whatever the file says
            return False
        os.kill(number, 0)
    except (TypeError, ValueError, OverflowError, ProcessLookupError):
        return False  # no such process, or not a pid as a daemon writes it
    except PermissionError:
        pass  # another user's process (systemd runs it as its own user): alive
    return True


def iso(epoch: float | None) -> str | None:
    return None if epoch is None else utc_iso(epoch)
