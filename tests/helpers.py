"""What several test modules share, in one place (test modules never import each other):
deadline waits, files, the daemon as a child process and its environment, the command line,
a stand-in for systemd's notify socket, receipts, a bounded call.

Fixtures live in conftest.py; running as `nobody` in tests/unprivileged.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.zygote import Forked, spawn
from watcher.daemon import statusfile
from watcher.daemon.timings import Timings
from watcher.disk.folders import LOCK_NAME
from watcher.items import Item, Snapshot, Spot
from watcher.remote.network import Network, ca_file
from watcher.sandbox.productiv import CLIENT_SECRET, ISSUED, Sandbox

ROOT = Path(__file__).resolve().parent.parent

# The daemon's fixed turns, short: a test sees the next look at the drop folder (or the next
# retention sweep, the next standby try) within a fraction of a second instead of 10 s.
QUICK = Timings(
    check_seconds=0.25, idle_wake_seconds=1.0, folder_check_seconds=0.2, standby_retry_seconds=0.2
)
# `python -m watcher` with QUICK timings: the command line's arguments follow, as after -m.
QUICK_WATCHER = (
    sys.executable,
    "-c",
    "import sys; from watcher.commands.cli import main; from watcher.daemon.timings import Timings; "
    f"sys.exit(main(timings={QUICK!r}))",
)
DIRECT = Network(None, {}, ca_file(None), None)  # no proxy, certifi's CAs


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll `condition` until it is truthy; fail the test at the deadline. A costly condition
    (a listing of thousands of files) is polled less often: at most a fifth of the time."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        value = condition()
        if value:
            return value
        now = time.monotonic()
        if now > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(max(0.02, 4 * (now - started)))


@dataclass
class Folders:
    root: Path
    drop: Path
    done: Path
    failed: Path

    def files(self, folder: Path) -> list[str]:
        """Relative paths of the regular files below `folder`, sidecars included (not the
        daemon's own lock file in the drop folder). By os.scandir: tests poll this over
        thousands of files, and pathlib's rglob took 4 times as long."""
        lock = str(self.drop / LOCK_NAME)
        found: list[str] = []
        pending = [str(folder)]
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False) and entry.path != lock:
                        found.append(os.path.relpath(entry.path, folder))
        return sorted(found)


FORBIDDEN = (CLIENT_SECRET, "Signature=", "X-Amz-Signature=", "AWSAccessKeyId=", 'access_token": "')


def leaks(text: str) -> list[str]:
    """Secret values and signed-query parts found in `text`: the test secret, every token any
    sandbox issued, and the parameters that only a signed URL's query carries."""
    found = [value for value in FORBIDDEN if value in text]
    return found + [token for token in list(ISSUED) if token in text]


def assert_no_secrets(text: str) -> None:
    assert not leaks(text), f"{leaks(text)!r} leaked into the output"


def clean_env() -> dict[str, str]:
    """This process's environment without any PRODUCTIV_ setting of the caller's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PRODUCTIV_")}


def daemon_env(sandbox: Sandbox, folders: Folders, **extra: str) -> dict[str, str]:
    """The settings of a daemon child on the sandbox and these folders, quick to settle and
    to retry; `extra` adds or overrides (NOTIFY_SOCKET, PRODUCTIV_...)."""
    return {
        **sandbox.env(),
        "PRODUCTIV_DROP_DIR": str(folders.drop),
        "PRODUCTIV_SETTLE_SECONDS": "0.3",
        "PRODUCTIV_RETRY_INITIAL_SECONDS": "0.05",
        **extra,
    }


def cli(
    *args: str, env: dict[str, str] | None = None, config: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`productiv-watcher ARGS [--config CONFIG]` to its end (forked by the zygote: see
    tests/zygote.py); no secret in what it printed."""
    argv = [*args, *(("--config", str(config)) if config is not None else ())]
    child = spawn(
        argv, {**clean_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = child.communicate(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        raise
    assert_no_secrets(out + err)
    return subprocess.CompletedProcess(argv, child.wait(), out, err)


class Child:
    """`productiv-watcher run` as a real child process; its stderr lines collected as they come."""

    def __init__(
        self,
        env: dict[str, str],
        *args: str,
        command: Sequence[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        """Forked by the zygote with QUICK timings (tests/zygote.py), or, given a `command`
        such as `as_nobody.argv`, started by it (it runs `python -m watcher`; cwd="/")."""
        self.proc: subprocess.Popen[str] | Forked
        if command is None:
            self.proc = spawn(
                ["run", *args],
                {**clean_env(), **env},
                cwd=cwd,
                timings=dataclasses.asdict(QUICK),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        else:
            self.proc = subprocess.Popen(
                [*command, "run", *args],
                env={**clean_env(), **env},
                stderr=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
                cwd=cwd,
            )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="child-stderr")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        status = self.proc.wait(timeout)
        self._reader.join(timeout)
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)
        assert_no_secrets(self.stderr)


class NotifySocket:
    """A Unix datagram socket standing in for systemd's; records (time, message) pairs."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-socket")
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def texts(self, prefix: str) -> list[str]:
        return [
            line for _, m in self.messages for line in m.splitlines() if line.startswith(prefix)
        ]

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.splitlines()]


def write(path: Path, data: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def done_soon(folders: Folders, *rels: str, timeout: float = 15) -> None:
    wait_for(lambda: all((folders.done / r).exists() for r in rels), timeout, f"{rels} in done/")


def receipts(folders: Folders) -> list[dict[str, Any]]:
    path = folders.root / "state" / "receipts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def item_for(path: Path) -> Item:
    return Item(Spot(path, path.name, path.name, None), Snapshot.of(os.stat(path)))


def finishes(call: Callable[[], Any], seconds: float) -> Any:
    """The call's result (or exception) when it ends within `seconds`; fails the test if not."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as exc:  # handed to the test
            result.append(exc)

    thread = threading.Thread(target=run, name="bounded-call", daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still reading the answer after {seconds} s"
    return result[0]


def inotify_masks() -> dict[int, int]:
    """inode -> event mask of every inotify watch this process holds (from /proc/self/fdinfo)."""
    masks = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        for line in info.splitlines():
            if line.startswith("inotify wd:"):
                fields = dict(part.split(":", 1) for part in line.split()[1:5])
                masks[int(fields["ino"], 16)] = int(fields["mask"], 16)
    return masks


def status_of(service: Any) -> dict[str, Any]:
    """The status file of an in-process daemon (`Service`)."""
    return statusfile.read(service.journal.folder) or {}


def waiting_for_marker(service: Any) -> list[str]:
    """The files its status file lists as waiting for their ready marker."""
    return [f["file"] for f in status_of(service).get("waiting_for_marker_files", [])]


def requested(sandbox: Sandbox) -> set[str]:
    """Every name the daemon asked the sandbox a signed URL for."""
    return {name for r in sandbox.requests if r.endpoint == "urls" for name in r.names}


def plant(path: Path, kind: str, elsewhere: Path) -> int | None:
    """What a producer can put at a reserved name (the lock's, the canary's); the descriptor of
    a file it holds a flock on (naming a made-up holder), else None. Only the locked file is
    another user's (uid 65534): the rest stay the caller's (see test_producers_field.py for a
    folder the service cannot empty)."""
    if kind == "symlink":
        path.symlink_to(elsewhere)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
        (path / "x.csv").write_bytes(b"x")
    else:
        path.write_text('{"pid": 1, "host": "ghost"}\n')
        os.chown(path, 65534, 65534)
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    return None
