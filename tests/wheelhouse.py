"""Wheels of what this venv has installed, for a pip that must not reach a package index.

The install test runs deploy/install.sh, whose pip installs the program and its dependencies.
Against an index, pip weighs every file of every version listed (22,000 links, 9 CPU-s here)
and the test leaves loopback. So it is handed these wheels instead (`--no-index
--find-links`): the very versions `make test` runs with, repacked from this venv as they were
installed (RECORD lists every file), bytecode left out as pip would, stored uncompressed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import sysconfig
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

# Only this venv's site-packages: a checkout on sys.path may hold a stale *.egg-info
SITE = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def installed(name: str) -> importlib.metadata.Distribution:
    return next(iter(importlib.metadata.distributions(name=name, path=SITE)))


def needed(name: str, extras: tuple[str, ...] = ()) -> set[str]:
    """`name` and everything it requires here (with these extras), as installed names."""
    found: set[str] = set()
    seen: set[tuple[str, str]] = set()  # (name, extra): an extra asked for later counts too
    todo = [(name, extras)]
    while todo:
        current, wanted = todo.pop()
        dist = installed(current)
        found.add(dist.metadata["Name"])
        for extra in ("", *wanted):
            if (dist.metadata["Name"], extra) in seen:
                continue
            seen.add((dist.metadata["Name"], extra))
            for text in dist.requires or []:
                req = Requirement(text)
                if req.marker is None or req.marker.evaluate({"extra": extra}):
                    todo.append((req.name, tuple(req.extras)))
    return found


def repack(name: str, folder: Path) -> Path:
    """The installed distribution `name` as a wheel in `folder`."""
    dist = installed(name)
    info = next(f for f in dist.files or () if f.name == "WHEEL").parent
    tag = next(
        line.split(":", 1)[1].strip()
        for line in dist.locate_file(info / "WHEEL").read_text().splitlines()
        if line.startswith("Tag:")
    )
    stem = f"{re.sub(r'[-_.]+', '_', dist.metadata['Name'])}-{dist.version}"
    wheel = folder / f"{stem}-{tag}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w") as out:
        for file in dist.files or ():
            path = file.as_posix()
            skipped = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
            if path.startswith("..") or file.suffix == ".pyc" or file.name in skipped:
                continue  # scripts (pip makes them again), bytecode, the installer's notes
            data = Path(dist.locate_file(file)).read_bytes()
            out.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path},sha256={digest.decode()},{len(data)}")
        record.append(f"{info.as_posix()}/RECORD,,")
        out.writestr(f"{info.as_posix()}/RECORD", "\n".join(record) + "\n")
    return wheel


def build(folder: Path) -> Path:
    """Every wheel `deploy/install.sh` needs (the program's with `metrics`, its build backend)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in needed("productiv-watcher", ("metrics",)) - {"productiv-watcher"} | {"flit_core"}:
        repack(name, folder)
    return folder
