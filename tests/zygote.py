"""`productiv-watcher` in the tests, forked from a Python that has already imported the package.

Starting `python -m watcher` costs about 0.45 CPU-s here (interpreter, pydantic, requests,
pycurl: most of it imports), and the suite runs about 150 of them on 2 cores. A zygote is one
process per test worker that imports every module of the package once, then forks a child per
command. The child is a real process: its own pid, environment, working folder, umask, stdio,
signal handlers and exit status; it runs the same `main()` as `python -m watcher` and ends the
way that interpreter would (threads joined, atexit run, streams flushed). What only a fresh
interpreter shows is tested by real `exec`s elsewhere: the installed console script
(test_systemd), `python -m watcher` as nobody (tests/unprivileged.py), and the commands that
import their modules only when run (test_cli).

Protocol, over a Unix SOCK_SEQPACKET socket (one connection per command): the request (JSON)
with the child's stdin, stdout and stderr attached (SCM_RIGHTS); the answer is two messages,
the child's pid, then its exit code as Popen reports it (-N: killed by signal N).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import pkgutil
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


# --- in the zygote --------------------------------------------------------------------------


def serve(path: str) -> dict[str, Any]:
    """Import the package, then fork a child per request; returns only in a child, with its
    request. Ends when the test worker that started it closes its stdin (or dies)."""
    import watcher

    for module in pkgutil.walk_packages(watcher.__path__, "watcher."):
        if module.name != "watcher.__main__":  # that one runs the command
            importlib.import_module(module.name)
    # What is imported now lives as long as any child: kept out of the children's collections,
    # whose every pass touched each object (a page copied per page of the zygote's heap). A
    # `status` child: 139 -> 54 ms of CPU. The objects a child makes are collected as ever,
    # though its full collections come sooner (the frozen ones do not count as long-lived).
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([listener, wake_r, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            os.unlink(path)  # and its folder, made for it alone (Zygote.address)
            os.rmdir(os.path.dirname(path))
            sys.exit(0)
        if wake_r in ready:
            os.read(wake_r, 512)
        if listener in ready:
            conn, _ = listener.accept()
            conn.settimeout(10)  # a client that connected and never asked must not stop the rest
            try:
                data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            except OSError:
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                os.close(wake_r)
                os.close(wake_w)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                for fd in fds:
                    if fd > 2:
                        os.close(fd)
                request: dict[str, Any] = json.loads(data)
                return request
            for fd in fds:
                os.close(fd)
            pidfd = os.pidfd_open(pid)  # the client signals through it: never another process
            with contextlib.suppress(OSError):
                socket.send_fds(conn, [str(pid).encode()], [pidfd])
            os.close(pidfd)
            waiting[pid] = conn
        _reap(waiting)


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is None:
            continue
        with contextlib.suppress(OSError):  # nobody waits for it any more
            conn.send(str(os.waitstatus_to_exitcode(status)).encode())
        conn.close()


def run(request: dict[str, Any]) -> None:
    """What `python -m watcher ARGS` does, in the forked child."""
    from watcher.commands.cli import main
    from watcher.daemon.timings import DEFAULT, Timings

    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["productiv-watcher", *request["args"]]
    timings = Timings(**request["timings"]) if request["timings"] else DEFAULT
    sys.exit(main(request["args"], timings=timings))


# --- in the test worker ---------------------------------------------------------------------


class Forked:
    """A forked command, with what the tests use of `subprocess.Popen`."""

    def __init__(self, conn: socket.socket, stdout: IO[str] | None, stderr: IO[str] | None):
        self._conn: socket.socket | None = conn
        conn.settimeout(30)
        pid, fds, _, _ = socket.recv_fds(conn, 64, 1)
        conn.settimeout(None)
        self.pid = int(pid)
        self._pidfd = fds[0]
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self._ended(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(f"productiv-watcher (pid {self.pid})", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def _ended(self, timeout: float | None) -> bool:
        """Whether it has ended (waiting up to `timeout`): its exit code from the zygote, or,
        if the zygote went first, the end of the process itself (its code then lost: -9)."""
        if self.returncode is not None:
            return True
        watched = self._pidfd if self._conn is None else self._conn
        if not select.select([watched], [], [], timeout)[0]:
            return False
        if self._conn is not None:
            answer = self._conn.recv(64)
            self._conn.close()
            self._conn = None
            if not answer:
                return self._ended(timeout)
            self.returncode = int(answer)
        else:
            self.returncode = -signal.SIGKILL
        os.close(self._pidfd)
        return True

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                signal.pidfd_send_signal(self._pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both outputs to their ends, then the exit."""
        texts = {"out": "", "err": ""}

        def read(name: str, stream: IO[str] | None) -> None:
            if stream is not None:
                texts[name] = stream.read()
                stream.close()

        readers = [
            threading.Thread(target=read, args=("out", self.stdout)),
            threading.Thread(target=read, args=("err", self.stderr)),
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout)
        self.wait(timeout)
        return texts["out"], texts["err"]


class Zygote:
    """The zygote of this test worker, started on first use."""

    _lock = threading.Lock()
    _path: str | None = None
    _proc: subprocess.Popen[str] | None = None

    @classmethod
    def address(cls) -> str:
        with cls._lock:
            if cls._proc is None or cls._proc.poll() is not None:
                folder = tempfile.mkdtemp(prefix="zygote-")
                cls._path = os.path.join(folder, "socket")
                env = {k: v for k, v in os.environ.items() if not k.startswith("PRODUCTIV_")}
                cls._proc = subprocess.Popen(
                    [sys.executable, "-c", _MAIN, cls._path],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                    env=env,
                )
                assert cls._proc.stdout is not None
                if cls._proc.stdout.readline() != "ready\n":
                    raise RuntimeError("the test zygote did not start")
            assert cls._path is not None
            return cls._path


_MAIN = "import sys; from tests.zygote import serve, run; run(serve(sys.argv[1]))"


def spawn(
    args: list[str],
    env: dict[str, str],
    *,
    cwd: Path = ROOT,
    timings: dict[str, float] | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> Forked:
    """`productiv-watcher ARGS` as a forked child; `stdout`/`stderr` take subprocess.PIPE or
    DEVNULL (None: this process's own), stdin is /dev/null."""
    ours: list[int] = []  # the ends this process keeps
    theirs: list[int] = []  # the ends the child gets
    streams: list[IO[str] | None] = []
    devnull = os.open(os.devnull, os.O_RDWR)
    theirs.append(devnull)
    for choice, own in ((stdout, 1), (stderr, 2)):
        if choice == subprocess.PIPE:
            read_end, write_end = os.pipe()
            theirs.append(write_end)
            ours.append(read_end)
            streams.append(open(read_end, encoding="utf-8", errors="replace"))  # noqa: SIM115
        else:
            theirs.append(devnull if choice == subprocess.DEVNULL else own)
            streams.append(None)
    umask = int(Path("/proc/self/status").read_text().split("Umask:")[1].split()[0], 8)
    request = {"args": args, "env": env, "cwd": str(cwd), "umask": umask, "timings": timings}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(Zygote.address())
        socket.send_fds(conn, [json.dumps(request).encode()], theirs)
        return Forked(conn, streams[0], streams[1])
    finally:
        os.close(devnull)
        for fd in theirs[1:]:
            if fd not in (1, 2, devnull):
                os.close(fd)
