"""Running the daemon as an unprivileged user, from any checkout.

Root ignores file modes, so a permission test runs `python -m watcher` as `nobody`. What that
process needs is often out of nobody's reach: a checkout inside a private folder (mode 0700, what
`mktemp -d` makes and what root's home is), the editable install and the `.venv` inside it, and
an interpreter under /root (pyenv). So, once per test session, the package and its runtime
dependencies are copied into a temporary folder every user can read, and they run on a Python of
the same version (the compiled wheels need it) that nobody can execute by its own rights.

Use the fixtures in conftest.py: `as_nobody` (this module's `Unprivileged`, or a skip that says
what to do) and `nobody_tmp` (a fresh folder nobody can traverse; pytest's tmp_path is private).
`field` lays folders out as in the field (drop/ 2770 in a drop group) and runs the daemon as
their user, beside a producer with a user and group of its own.
"""

from __future__ import annotations

import compileall
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import ROOT, Child, Folders, wait_for, write
from watcher.sandbox.productiv import Sandbox

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
PROBE = (
    f"import os, sys; print(sys.version_info[:2] == {sys.version_info[:2]!r}"
    " and os.access(sys.executable, os.X_OK))"
)


class Unavailable(Exception):
    """This machine cannot run the daemon as nobody; the message says what to do instead."""


@dataclass(frozen=True)
class Unprivileged:
    """How to run `python -m watcher ...` as `user`, with none of the checkout's files.

    `argv` ends with `-m watcher`: append the command (`run`, `check`...). Merge `env` (which
    points PYTHONPATH at the copy) into the child's environment, start it with `cwd="/"` (the
    checkout may be unreadable), and hand it its folders with `own()`, under a `nobody_tmp`.
    With `tests.conftest.Child`: `Child({**env, **nobody.env}, command=nobody.argv, cwd=Path("/"))`.
    """

    user: str
    uid: int
    gid: int
    python: str
    site: Path
    prefix: tuple[str, ...]

    @property
    def argv(self) -> tuple[str, ...]:
        return (*self.prefix, self.python, "-m", "watcher")

    @property
    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1"}

    def own(self, *paths: Path) -> None:
        for path in paths:
            os.chown(path, self.uid, self.gid)


def privilege_drop(user: str = "nobody") -> tuple[str, ...]:
    """The command prefix that runs what follows as `user`, or Unavailable saying why not."""
    if os.geteuid() != 0:
        raise Unavailable(f"needs root to run the daemon as {user}: run `make test` as root")
    if not shutil.which("setpriv"):
        raise Unavailable("needs setpriv (util-linux) to run the daemon as another user")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise Unavailable(f"needs a user {user} to run the daemon as") from None
    return ("setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups")


def find_python(prefix: tuple[str, ...]) -> str:
    """A Python of this version that the user of `prefix` can run by its own rights.

    The one running the tests comes first. setpriv still holds root's capabilities when it
    execs, so an interpreter under a private folder may start anyway, but then loads another
    libpython and stdlib than its own: the probe asks for execute access as the user itself.
    """
    candidates = [Path(sys.base_prefix, "bin", f"python{VERSION}")]
    candidates += [Path(folder, f"python{VERSION}") for folder in ("/usr/local/bin", "/usr/bin")]
    for python in dict.fromkeys(str(c) for c in candidates if c.exists()):
        probe = subprocess.run(
            [*prefix, python, "-I", "-c", PROBE], capture_output=True, text=True, check=False
        )
        if probe.stdout.strip() == "True":
            return python
    raise Unavailable(
        f"nobody cannot run a Python {VERSION} (tried {', '.join(map(str, candidates))}): "
        f"install python{VERSION} for all users (apt-get install python{VERSION}) "
        "or let others reach this interpreter's folder"
    )


def runtime_files(
    name: str = "productiv-watcher", extras: tuple[str, ...] = ("metrics",)
) -> Iterator[tuple[Path, Path]]:
    """(where, name in site-packages) of every installed file of `name`'s dependencies."""
    seen: set[str] = set()
    wanted = [Requirement(r) for r in metadata.requires(name) or []]
    while wanted:
        requirement = wanted.pop()
        key = canonicalize_name(requirement.name)
        marker = requirement.marker
        if key in seen or (marker and not any(marker.evaluate({"extra": e}) for e in extras)):
            continue
        seen.add(key)
        dist = metadata.distribution(requirement.name)
        wanted += [Requirement(r) for r in dist.requires or []]
        base = Path(str(dist.locate_file("")))
        for file in dist.files or []:
            if not str(file).startswith(".."):  # console scripts in bin/ are not needed
                yield base / file, Path(file)


def install_copy(site: Path) -> None:
    """The package and its runtime dependencies copied into `site` (readable by all), compiled."""
    for source, relative in runtime_files():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, site / relative)
    shutil.copytree(
        ROOT / "watcher", site / "watcher", ignore=shutil.ignore_patterns("__pycache__")
    )
    compileall.compile_dir(site / "watcher", quiet=1)  # nobody cannot write its own caches
    for folder, _, files in os.walk(site):  # whatever the umask was when they were installed
        os.chmod(folder, 0o755)
        for name in files:
            path = Path(folder, name)
            path.chmod(path.stat().st_mode | 0o444)


def unprivileged(site: Path, user: str = "nobody") -> Unprivileged:
    """Fill `site` and return how to run the daemon as `user` from it (see the module docstring).
    A `site` already filled (by another test worker of the same run) is used as it is."""
    prefix = privilege_drop(user)
    python = find_python(prefix)
    entry = pwd.getpwnam(user)  # privilege_drop checked it exists
    nobody = Unprivileged(user, entry.pw_uid, entry.pw_gid, python, site, prefix)
    filled = site / ".filled"
    if filled.exists():
        return nobody
    install_copy(site)
    check = subprocess.run(
        [*prefix, python, "-c", "import watcher.commands.cli, watcher.daemon.service"],
        env={**os.environ, **nobody.env},
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
    )
    if check.returncode != 0:
        raise RuntimeError(f"the copy in {site} does not import as {user}:\n{check.stderr}")
    filled.touch()
    return nobody


# -- the field: folders laid out as install.sh makes them, the daemon as their user ----------


def unused_id(known: Any, start: int) -> int:
    """A user or group id nothing on this host has (the producer, the drop group)."""
    for number in range(start, start + 1000):
        try:
            known(number)
        except KeyError:
            return number
    raise AssertionError("no free id")


@dataclass
class Field:
    folders: Folders
    service: int  # nobody's uid
    producer: int
    drop_gid: int
    runner: Unprivileged
    child: Child | None = None

    def produce(self, path: Path, data: bytes) -> Path:
        """A file as the producer writes it (umask 0027): theirs, the drop group's, 0640."""
        write(path, data)
        os.chown(path, self.producer, self.drop_gid)
        path.chmod(0o640)
        return path

    def start(self, sandbox: Sandbox, **env: str) -> Child:
        """The daemon as nobody, in the drop group only (as the unit's user would be)."""
        settings = {
            **sandbox.env(),
            "PRODUCTIV_DROP_DIR": str(self.folders.drop),
            "PRODUCTIV_SETTLE_SECONDS": "0.2",
            "PRODUCTIV_RETRY_INITIAL_SECONDS": "0.2",
            "PRODUCTIV_RETRY_MAX_SECONDS": "3",
            "PRODUCTIV_STATUS_SECONDS": "0.2",
            "PRODUCTIV_LOG_FORMAT": "json",
            **self.runner.env,
            **env,
        }
        setpriv = [
            "setpriv",
            f"--reuid={self.service}",
            "--regid=nogroup",
            f"--groups={self.drop_gid}",
        ]
        command = [*setpriv, self.runner.python, "-m", "watcher"]
        self.child = Child(settings, command=command, cwd=Path("/"))
        wait_for(lambda: self.events("ready") or self.child.proc.poll() is not None, what="ready")
        return self.child

    def stop(self) -> None:
        assert self.child is not None
        self.child.send_signal(signal.SIGTERM)
        assert self.child.wait(15) == 0

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = list(self.child.lines) if self.child else []
        docs = [json.loads(line) for line in lines if line.startswith("{")]
        return [doc for doc in docs if doc.get("event") == name]

    def status(self) -> dict[str, Any]:
        path = self.folders.root / "state" / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}


@contextmanager
def field(runner: Unprivileged) -> Iterator[Field]:
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="pw-field-"))  # pytest's tmp_path is private to root
    setup = Field(
        Folders(base, base / "drop", base / "done", base / "failed"),
        nobody.pw_uid,
        unused_id(pwd.getpwuid, 42000),
        unused_id(grp.getgrgid, 42000),
        runner,
    )
    try:
        base.chmod(0o755)
        setup.folders.drop.mkdir()
        os.chown(setup.folders.drop, nobody.pw_uid, setup.drop_gid)
        setup.folders.drop.chmod(0o2770)
        for folder in (setup.folders.done, setup.folders.failed, base / "state"):
            folder.mkdir()
            os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        yield setup
    finally:
        if setup.child is not None:
            setup.child.close()
        shutil.rmtree(base)


def installed_layout(f: Field) -> None:
    """drop, done and failed 2770 owned by the service and the drop group, drop/users made."""
    for folder in (f.folders.done, f.folders.failed, f.folders.drop / "users"):
        folder.mkdir(exist_ok=True)
    for folder in (f.folders.drop, f.folders.done, f.folders.failed, f.folders.drop / "users"):
        os.chown(folder, f.service, f.drop_gid)
        folder.chmod(0o2770)
