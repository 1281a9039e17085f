"""Shared fixtures: real folders, the real sandbox on loopback, the daemon in-process or as a
subprocess, deadline-based waiting, and a guard against leaked threads and leaked secrets."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from pydantic import SecretStr

from tests.helpers import (
    QUICK,
    Child,
    Folders,
    NotifySocket,
    assert_no_secrets,
    leaks,
    wait_for,
)
from tests.unprivileged import Unavailable, Unprivileged, unprivileged
from watcher import logs
from watcher.daemon.service import Service
from watcher.daemon.timings import Timings
from watcher.sandbox.productiv import Sandbox
from watcher.settings import Settings

# The examples are cheap, but on 2 shared cores a busy neighbour can make drawing them look slow:
# no deadline, and no too_slow verdict, so a loaded machine cannot fail a fuzz test.
settings.register_profile(
    "shared-cores", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("shared-cores")


@pytest.fixture
def folders(tmp_path: Path) -> Iterator[Folders]:
    drop = tmp_path / "drop"
    drop.mkdir()
    folders = Folders(tmp_path, drop, tmp_path / "done", tmp_path / "failed")
    yield folders
    for sidecar in folders.failed.rglob("*.error.json") if folders.failed.exists() else []:
        assert_no_secrets(sidecar.read_text(errors="replace"))


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    with Sandbox(tmp_path / "store") as sb:
        yield sb


def make_settings(sandbox: Sandbox, folders: Folders | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "app_id": sandbox.app_id,
        "client_id": sandbox.client_id,
        "client_secret": SecretStr(sandbox.client_secret),
        "api_url": sandbox.url,
        "token_url": f"{sandbox.url}/oauth2/token",
        "settle_seconds": 0.3,
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "request_timeout_seconds": 5.0,
        "shutdown_timeout_seconds": 5.0,
    }
    if folders is not None:
        values["drop_dir"] = folders.drop
    values.update(overrides)
    return Settings(**values)


class Captured:
    """Every log line the daemon wrote, through the real formatter (JSON)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        docs = [json.loads(line) for line in self.text.splitlines() if line.strip()]
        return [d for d in docs if name is None or d.get("event") == name]


@pytest.fixture
def logs_json() -> Iterator[Captured]:
    """Route logging through watcher.logs (DEBUG, JSON) into a buffer for the test."""
    captured = Captured()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    logs.setup("DEBUG", "json", captured.stream)
    yield captured
    root.handlers[:], sys.excepthook, threading.excepthook = saved[0], saved[2], saved[3]
    root.setLevel(saved[1])
    assert_no_secrets(captured.text)


@pytest.fixture(scope="session", autouse=True)
def redacting_records() -> None:
    """As the daemon does at start: even pytest's own log capture sees only scrubbed records."""
    logs.install_redaction()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first (`@pytest.mark.long`): xdist hands tests out in this order, and a
    20-s test handed out last kept one worker busy 20 s after the others had ended."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Every output of every test (stdout, stderr, logs) is grepped for secrets: a leak fails it."""
    outcome = yield
    report = outcome.get_result()
    found = sorted({leak for _, text in report.sections for leak in leaks(text)})
    if found and report.passed:
        report.outcome = "failed"
        report.longrepr = f"secret or signed query leaked into the test's output: {found}"


class Daemon:
    """The service running in-process on a thread of the test."""

    def __init__(
        self,
        settings: Settings,
        reload: Callable[[], Settings] | None = None,
        timings: Timings = QUICK,
    ) -> None:
        """`reload` is what the daemon reads again on `service.request_reload()` (its SIGHUP);
        `timings` its fixed turns (short unless a test asks for the daemon's own)."""
        self.service = Service(settings, reload=reload, timings=timings)
        self.status: int | None = None
        self._thread = threading.Thread(target=self._run, name="test-daemon")

    def _run(self) -> None:
        self.status = self.service.run()

    def __enter__(self) -> Service:
        self._thread.start()
        wait_for(lambda: self.service.ready.is_set() or not self._thread.is_alive(), what="READY")
        return self.service

    def __exit__(self, *exc: object) -> None:
        self.service.request_stop()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the daemon did not stop"
        assert self.status == 0


@pytest.fixture
def daemon(sandbox: Sandbox, folders: Folders, logs_json: Captured) -> Callable[..., Daemon]:
    def start(timings: Timings = QUICK, **overrides: Any) -> Daemon:
        return Daemon(make_settings(sandbox, folders, **overrides), timings=timings)

    return start


@pytest.fixture
def daemon_factory(sandbox: Sandbox, logs_json: Captured) -> Callable[..., tuple[Daemon, Captured]]:
    """A daemon on folders of the test's choosing (a tmpfs, a shared folder...)."""

    def make(folders: Folders, **overrides: Any) -> tuple[Daemon, Captured]:
        return Daemon(make_settings(sandbox, folders, **overrides)), logs_json

    return make


@contextmanager
def subprocess_daemon(env: dict[str, str], *args: str) -> Iterator[Child]:
    child = Child(env, *args)
    try:
        yield child
    finally:
        child.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield

    def left() -> list[str]:
        return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]

    try:
        wait_for(lambda: not left(), timeout=10)
    except pytest.fail.Exception:
        frames = sys._current_frames()  # where each is stuck
        stacks = [
            "".join(traceback.format_stack(frames[t.ident]))
            for t in threading.enumerate()
            if t not in before and t.ident in frames
        ]
        pytest.fail(f"the test's threads did not end within 10 s: {left()}\n" + "\n".join(stacks))


def _nobody_site(config: pytest.Config) -> Path:
    """Where the copy for `nobody` lives: one per test run, shared by its xdist workers (each
    made its own: 1 CPU-s apiece), in /tmp because pytest's folders are private to root."""
    run = os.getppid() if hasattr(config, "workerinput") else os.getpid()
    started = Path(f"/proc/{run}/stat").read_text().rsplit(")", 1)[1].split()[19]  # no reuse
    return Path(tempfile.gettempdir(), f"pw-site-{run}-{started}")


@pytest.fixture(scope="session")
def as_nobody(request: pytest.FixtureRequest) -> Unprivileged:
    """How to run the daemon as `nobody` from a copy it can read (tests/unprivileged.py), or a skip
    that says what to do. Built on first use by the first worker to need it."""
    site = _nobody_site(request.config)
    lock = os.open(f"{site}.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait for the copy, then use it
        if not os.path.lexists(site):  # filled aside, then renamed: never half a copy here
            filling = Path(tempfile.mkdtemp(prefix=f"{site.name}.", dir=site.parent))
            unprivileged(filling)
            filling.rename(site)
        mine = os.lstat(site)  # a predictable name in /tmp: only our own folder is used
        if not stat.S_ISDIR(mine.st_mode) or mine.st_uid != os.geteuid():
            raise RuntimeError(f"{site} is not this run's copy: remove it")
        return unprivileged(site)
    except Unavailable as exc:
        pytest.skip(str(exc))
    finally:
        os.close(lock)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's copy for `nobody` goes with the run (removed by the controller, or by the one
    process of a run without xdist)."""
    if not hasattr(config, "workerinput"):
        site = _nobody_site(config)
        shutil.rmtree(site, ignore_errors=True)
        Path(f"{site}.lock").unlink(missing_ok=True)


@pytest.fixture
def nobody_tmp(as_nobody: Unprivileged) -> Iterator[Path]:
    """A fresh folder that `nobody` can traverse (pytest's tmp_path is private to its user)."""
    base = Path(tempfile.mkdtemp(prefix="pw-nobody-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)
