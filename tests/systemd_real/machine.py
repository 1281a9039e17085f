"""A throw-away systemd machine: this host's own `/` under an overlay, booted by systemd-nspawn.

The host runs no systemd as PID 1, but has systemd installed; nspawn boots it as the init of a
container whose root is an overlay (lower layer `/`, an empty upper layer), so the test installs,
starts and breaks things on a real systemd and every change is thrown away with the upper layer.
The container shares the host's network (loopback included) and is driven with `nsenter`.

`Machine.close` (call it in a `finally`: after an error, Ctrl-C or SIGTERM too) kills the
container by pid, unmounts the overlay and removes the temporary folders, whatever was set up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO

LAYERS_SIZE = "4g"  # the most the container may write
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what sudo would give

# Units of this host that would start in the container and are no part of the test: consoles
# (nspawn's console is not read), timers, and servers that would take the shared network's ports.
MASKED = (
    "console-getty.service",
    "getty@.service",
    "container-getty@.service",
    "postgresql.service",
    "postgresql@.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
    "cron.service",
    "ssh.service",
    "systemd-networkd.service",
    "systemd-resolved.service",
    "systemd-timesyncd.service",
)


class Skip(Exception):
    """The test cannot run on this host; the message says why."""


class Broken(Exception):
    """A step the rest of the test depends on failed; the message says what and why."""


def preflight() -> None:
    """Raise Skip unless this host can boot the machine; install systemd-container if missing."""
    if os.geteuid() != 0:
        raise Skip("needs root (it mounts an overlay and boots systemd-nspawn)")
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise Skip("the kernel has no overlayfs")
    if not any(Path(p, "systemd/systemd").exists() for p in ("/usr/lib", "/lib")):
        raise Skip("systemd is not installed on this host")
    if shutil.which("systemd-nspawn") is None:
        if shutil.which("apt-get") is None:
            raise Skip("systemd-nspawn is missing and there is no apt-get to install it")
        print("installing systemd-container (systemd-nspawn) with apt-get", flush=True)
        apt = ["apt-get", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120"]
        done = subprocess.run(
            [*apt, "install", "systemd-container"],
            capture_output=True,
            text=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=False,
        )
        if done.returncode != 0 or shutil.which("systemd-nspawn") is None:
            raise Skip(f"cannot install systemd-container: {done.stderr.strip()[-400:]}")


def nspawn_environment() -> dict[str, str]:
    """On a cgroup v1 (or hybrid) host, nspawn must be told not to try the unified hierarchy."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return {"PATH": PATH}  # cgroup v2 only: nspawn's own choice is right
    return {"PATH": PATH, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "0"}


class Machine:
    """The booted container; `run` executes a command in it, `path` maps its paths to the host."""

    def __init__(self, source: Path, mount_at: str) -> None:
        self.source = source  # bound read-only at `mount_at` inside
        self.mount_at = mount_at
        self.base = Path(tempfile.mkdtemp(prefix="productiv-systemd-test.", dir="/var/tmp"))
        self.layers = self.base / "layers"  # a tmpfs holding the upper layer and its workdir
        self.merged = self.base / "merged"
        self.name = f"productiv-test-{uuid.uuid4().hex[:8]}"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def boot(self) -> None:
        """Mount the overlay and boot it; `close` undoes whatever part of this was done."""
        self.layers.mkdir()
        self.merged.mkdir()
        # The upper layer lives in memory: quick to write (the venv) and gone at its unmount.
        _mount("tmpfs", f"size={LAYERS_SIZE},mode=0700", self.layers)
        for name in ("upper", "work"):
            (self.layers / name).mkdir()
        self._prepare_upper(self.layers / "upper")
        layers = f"lowerdir=/,upperdir={self.layers}/upper,workdir={self.layers}/work"
        _mount("overlay", layers, self.merged)
        self._start_nspawn()

    def _prepare_upper(self, upper: Path) -> None:
        """Before the mount: a machine id of its own, and the units the test does not need masked."""
        (upper / "etc/systemd/system").mkdir(parents=True)
        (upper / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        for unit in MASKED:
            (upper / "etc/systemd/system" / unit).symlink_to("/dev/null")

    def _start_nspawn(self) -> None:
        with (self.base / "console.log").open("wb") as log:
            self.nspawn = self._nspawn(log)
        self.init_pid = self._find_init()
        # `--wait` returns once the boot is over: "running", or "degraded" (some unit failed).
        state = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            done = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
            state = done.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.2)  # its manager is not listening yet
        if state not in ("running", "degraded"):
            raise Broken(f"the container did not finish booting: {state!r}\n{self.console()}")

    def _nspawn(self, log: BinaryIO) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                "systemd-nspawn",
                f"--directory={self.merged}",
                f"--machine={self.name}",
                "--register=no",
                "--keep-unit",
                "--console=read-only",
                f"--bind-ro={self.source}:{self.mount_at}",
                "--boot",
            ],
            env=nspawn_environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches us, not nspawn: we tear it down in order
        )

    def _find_init(self) -> int:
        """The container's systemd: nspawn's child, as the host sees its pid."""
        assert self.nspawn is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise Broken(
                    f"systemd-nspawn exited with {self.nspawn.returncode}\n{self.console()}"
                )
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                parent = int(stat[stat.rindex(")") + 2 :].split()[1])
                if comm == "systemd" and parent == self.nspawn.pid:
                    return int(entry.name)
            time.sleep(0.1)
        raise Broken(f"no systemd appeared under systemd-nspawn\n{self.console()}")

    def console(self) -> str:
        """The last lines nspawn and the container's boot printed."""
        log = self.base / "console.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return "\n".join(lines[-30:])

    def close(self) -> None:
        """Kill the container by pid, unmount, remove: every step tried, whatever failed before.

        A second Ctrl-C (or SIGTERM, or the alarm) waits until this is done."""
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM}
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            self._tear_down()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)

    def _tear_down(self) -> None:
        if self.init_pid is not None:
            # SIGKILL to a pid namespace's init ends every process in that namespace.
            _signal(self.init_pid, signal.SIGKILL)
        if self.nspawn is not None and self.nspawn.poll() is None:
            try:
                self.nspawn.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=15)
        for mount in (self.merged, self.layers):
            if os.path.ismount(mount) and not _run("umount", str(mount)):
                _run("umount", "--lazy", str(mount))
        if os.path.ismount(self.merged) or os.path.ismount(self.layers):
            print(f"left {self.base} in place: it still has a mount", flush=True)
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- driving -----------------------------------------------------------------------------

    def run(
        self,
        *argv: str,
        user: str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the container, as root with sudo's clean environment, or as `user` (with
        that user's groups); stdout and stderr are captured as text."""
        if user is not None:
            argv = ("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv)
        try:
            done = subprocess.run(
                self._command(argv, env),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Broken(f"`{' '.join(argv)}` did not finish within {timeout} s") from None
        if check and done.returncode != 0:
            raise Broken(
                f"`{' '.join(argv)}` exited with {done.returncode}\n{done.stdout}{done.stderr}"
            )
        return done

    def start(self, *argv: str, env: dict[str, str], output: Path) -> subprocess.Popen[bytes]:
        """Start `argv` as root in the container, in the background, its output going to `output`.

        `sh` writes the command's pid (as the container sees it) to /run/background.pid first.
        """
        script = 'echo $$ > /run/background.pid; exec "$@"'
        command = self._command(("sh", "-c", script, "sh", *argv), env)
        with output.open("wb") as out:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def _command(self, argv: tuple[str, ...], env: dict[str, str] | None) -> list[str]:
        """nsenter into every namespace of the container's init, its root and working folder."""
        assert self.init_pid is not None
        clean = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        return [
            "nsenter", f"--target={self.init_pid}", "--all", "--root", "--wd",
            "env", "-i", *(f"{k}={v}" for k, v in clean.items()), *argv,
        ]  # fmt: skip

    def sh(self, script: str, user: str | None = None, check: bool = True) -> str:
        """A shell script in the container; its stdout."""
        return self.run("sh", "-ec", script, user=user, check=check).stdout

    def path(self, inside: str) -> Path:
        """Where a path of the container is seen from the host, through the overlay: not for the
        container's own mounts (/run, /tmp, /dev are its tmpfs)."""
        return self.merged / inside.lstrip("/")

    def cursor(self) -> str:
        """The journal's current end, to read only what comes after it."""
        out = self.run("journalctl", "--lines=0", "--show-cursor", "--no-pager", "--quiet").stdout
        return out.strip().rpartition("-- cursor: ")[2]

    def journal(self, unit: str, after: str = "") -> list[str]:
        """The messages of `unit` logged after the cursor (all of them without one)."""
        since = [f"--after-cursor={after}"] if after else []
        out = self.run("journalctl", f"--unit={unit}", *since, "--output=cat", "--no-pager")
        return out.stdout.splitlines()


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _mount(kind: str, options: str, target: Path) -> None:
    mounted = subprocess.run(
        ["mount", "-t", kind, "-o", options, kind, str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        raise Skip(f"cannot mount {kind} here: {mounted.stderr.strip()}")


def _run(*argv: str) -> bool:
    return subprocess.run(argv, check=False).returncode == 0
