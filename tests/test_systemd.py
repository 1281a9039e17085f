"""Running under systemd: the notify protocol on a real datagram socket, signals, reload,
fail-fast, the units' hardening score and the install script."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import wheelhouse
from tests.conftest import Captured, Daemon, make_settings, subprocess_daemon
from tests.helpers import ROOT, NotifySocket, daemon_env, wait_for
from watcher.sandbox.productiv import Sandbox


def test_ready_status_watchdog_and_stopping_reach_systemd(sandbox, folders, notify):
    for n in range(3):
        (folders.drop / f"f{n}.csv").write_bytes(b"x")
    env = daemon_env(
        sandbox, folders, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000"
    )  # a ping every 0.2 s
    with subprocess_daemon(env) as proc:
        wait_for(lambda: notify.texts("READY=1"))
        wait_for(lambda: any("3 uploaded" in s for s in notify.texts("STATUS=")))
        wait_for(lambda: len(notify.times("WATCHDOG=1")) >= 8)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    first = notify.messages[0][1]
    assert "READY=1" in first and "3 file(s) waiting" in first
    statuses = notify.texts("STATUS=")
    assert any("3 waiting" in s for s in statuses) and "STATUS=stopping" in statuses
    pings = notify.times("WATCHDOG=1")
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    # The median gap is about WATCHDOG_USEC / 2: not a ping per turn, and never as late as the
    # 0.4 s after which systemd would kill the service (as tight as that needs, no tighter).
    assert 0.1 <= gaps[len(gaps) // 2] < 0.4
    assert notify.texts("STOPPING=1")


def test_the_status_names_an_outage_and_its_error(sandbox, folders, notify):
    sandbox.inject("urls", count=100, status=503)
    (folders.drop / "a.csv").write_bytes(b"x")
    with subprocess_daemon(daemon_env(sandbox, folders, NOTIFY_SOCKET=notify.address)) as proc:
        wait_for(lambda: any("retrying" in s for s in notify.texts("STATUS=")))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    [status] = [s for s in notify.texts("STATUS=") if "retrying" in s][:1]
    assert "service unavailable since" in status and "HTTP 503" in status


def test_no_watchdog_ping_while_the_uploader_is_wedged(sandbox, folders, notify):
    sandbox.inject("put", count=1, delay=30)  # the storage accepts the body, then never answers
    env = daemon_env(
        sandbox,
        folders,
        NOTIFY_SOCKET=notify.address,
        WATCHDOG_USEC="400000",
        PRODUCTIV_REQUEST_TIMEOUT_SECONDS="60",
        PRODUCTIV_SHUTDOWN_TIMEOUT_SECONDS="0.5",
    )
    with subprocess_daemon(env) as proc:
        wait_for(lambda: len(notify.times("WATCHDOG=1")) >= 2)
        (folders.drop / "a.csv").write_bytes(b"x")
        wait_for(lambda: sandbox.arrived["put"] == 1)
        wedged = time.monotonic()
        time.sleep(1.5)  # the observation window: pings must have stopped within ~0.4 s
        late = [t for t in notify.times("WATCHDOG=1") if t > wedged + 0.6]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        stderr = proc.stderr
    assert late == []
    assert "stuck" in stderr and "put-1 has made no progress" in stderr


def test_an_abstract_notify_socket_works(sandbox, folders):
    sock = NotifySocket(f"@productiv-watcher-test-{os.getpid()}")
    try:
        with subprocess_daemon(daemon_env(sandbox, folders, NOTIFY_SOCKET=sock.address)) as proc:
            wait_for(lambda: sock.texts("READY=1"))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    finally:
        sock.close()


def test_watchdog_pings_only_for_the_pid_systemd_named(sandbox, folders, notify):
    env = daemon_env(
        sandbox, folders, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="200000", WATCHDOG_PID="1"
    )
    with subprocess_daemon(env) as proc:
        wait_for(lambda: notify.texts("READY=1"))
        wait_for(lambda: len(notify.texts("STATUS=")) >= 1)
        time.sleep(0.5)  # an observation window: several ping periods
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert notify.texts("WATCHDOG=1") == []


def test_a_dead_worker_thread_ends_the_process_with_status_1(sandbox, folders, logs_json: Captured):
    daemon = Daemon(make_settings(sandbox, folders))

    def broken(stop, beat):
        raise RuntimeError("a bug")

    daemon.service.uploader.put_step = broken  # type: ignore[method-assign]
    thread = threading.Thread(target=daemon._run, name="test-daemon")
    thread.start()
    thread.join(15)
    assert daemon.status == 1
    assert logs_json.events("crashed")


def test_sighup_applies_what_it_can_and_names_what_needs_a_restart(
    sandbox, folders, tmp_path, notify
):
    config = tmp_path / "config.toml"
    config.write_text(f'drop_dir = "{folders.drop}"\nsettle_seconds = 0.3\nbatch_size = 50\n')
    env = {
        k: v
        for k, v in daemon_env(sandbox, folders, NOTIFY_SOCKET=notify.address).items()
        if k not in ("PRODUCTIV_DROP_DIR", "PRODUCTIV_SETTLE_SECONDS")
    }
    with subprocess_daemon(env, "--config", str(config)) as proc:
        wait_for(lambda: notify.texts("READY=1"))
        config.write_text(
            f'drop_dir = "{tmp_path}"\nsettle_seconds = 0.2\nbatch_size = 7\n'
            'upload_concurrency = 2\nlog_level = "DEBUG"\n'
        )
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: " reloaded " in proc.stderr)
        config.write_text("batch_size = = broken")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in proc.stderr)
        (folders.drop / "still.csv").write_bytes(b"x")
        wait_for(lambda: (folders.done / "still.csv").exists())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        stderr = proc.stderr
    [reloaded] = [line for line in stderr.splitlines() if " reloaded " in line]
    assert "applied=settle_seconds,batch_size,upload_concurrency,log_level" in reloaded
    assert "restart_needed=drop_dir,done_dir,failed_dir" in reloaded
    assert "reload_failed" in stderr and "not valid TOML" in stderr
    assert " DEBUG " in stderr  # the new log level is live


# -- the units --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["productiv-watcher.service", "productiv-watcher@.service"])
def test_units_are_hardened_to_ok_or_better(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    path = tmp_path / unit.replace("@.", "@example.")
    shutil.copy(ROOT / "systemd" / unit, path)
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout).group(1))
    assert score <= 2.0, result.stdout


def test_the_unit_says_what_the_issue_asks():
    text = (ROOT / "systemd" / "productiv-watcher.service").read_text()
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "LoadCredential=client_secret:/etc/productiv-watcher/client_secret",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
    ]:
        assert line in text.splitlines()
    stop = int(re.search(r"TimeoutStopSec=(\d+)s", text).group(1))
    assert stop > 20  # above the default shutdown_timeout_seconds
    assert "Environment=" not in text  # never secrets in a world-readable unit


# -- the install script ---------------------------------------------------------------------


def readme_check(root: Path, exe: Path, sandbox: Sandbox) -> None:
    """The README's steps 2 and 3 on the fresh install, before any start: `check` passes."""
    config = root / "etc" / "productiv-watcher" / "config.toml"
    text = config.read_text().replace("your-app-id", sandbox.app_id)
    text = text.replace("your-client-id", sandbox.client_id)
    text = text.replace('"/srv/', f'"{root}/srv/').replace('"/var/', f'"{root}/var/')
    config.write_text(
        f'api_url = "{sandbox.url}"\ntoken_url = "{sandbox.url}/oauth2/token"\n{text}'
    )
    (config.parent / "client_secret").write_text(sandbox.client_secret + "\n")
    env = {"CREDENTIALS_DIRECTORY": str(config.parent), "PATH": os.environ["PATH"]}
    check = subprocess.run(
        [str(exe), "check", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"state_dir {root}/var/lib/productiv-watcher/state will be created" in check.stdout


def test_install_with_a_python_that_has_no_pip_gives_the_venv_its_own(tmp_path):
    """Where python3 has no pip (or one without --python), the venv gets its own (ensurepip)."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    root = tmp_path / "root"
    install = [str(ROOT / "deploy" / "install.sh"), "--root", str(root), "--dry-run"]
    dry = subprocess.run(
        [*install, "--python", str(bare / "bin" / "python")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    venv = root / "opt" / "productiv-watcher" / "venv"
    assert f"+ {bare}/bin/python -m venv --without-pip {venv}\n" in dry
    assert f"installing with the venv's own pip ({bare}/bin/python has no pip 22.3" in dry
    assert f"+ {venv}/bin/python -m ensurepip\n+ " in dry
    assert f"+ {venv}/bin/python -m pip install " in dry


@pytest.mark.long
@pytest.mark.timeout(120)  # a venv and a pip install: 30 s when the machine is busy
def test_install_is_idempotent_and_uninstall_keeps_the_files(tmp_path, sandbox):
    root = tmp_path / "root"
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    # The Python this venv was made from: the wheels below are for it
    python = Path(sys.base_prefix) / "bin" / "python3"
    install = [str(ROOT / "deploy" / "install.sh"), "--root", str(root), "--python", str(python)]

    dry = subprocess.run([*install, "--dry-run"], capture_output=True, text=True, check=True)
    assert "+ install -m 0644" in dry.stdout and not root.exists()

    # pip is handed the wheels this venv runs with: no package index, no network
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse.build(tmp_path / "wheels"))}
    first = subprocess.run(
        [*install, "--secret-file", str(secret)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **offline},
    ).stdout
    venv = root / "opt" / "productiv-watcher" / "venv"
    assert f"+ {python} -m venv --without-pip {venv}\n" in first
    probe = [str(python), "-m", "pip", "--python", str(python), "--version"]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        assert f"+ {python} -m pip --python {venv}/bin/python install " in first
    else:  # a Python without a pip that can install into another venv: the venv's own
        assert f"+ {venv}/bin/python -m ensurepip\n" in first
        assert f"+ {venv}/bin/python -m pip install " in first
    etc = root / "etc" / "productiv-watcher"
    assert oct((etc / "client_secret").stat().st_mode & 0o777) == "0o600"
    assert oct((etc / "config.toml").stat().st_mode & 0o777) == "0o640"
    assert oct((root / "srv" / "productiv" / "drop").stat().st_mode & 0o7777) == "0o2770"
    for name in ("users", "contracts", "other"):  # producers need not make them
        folder = root / "srv" / "productiv" / "drop" / name
        assert oct(folder.stat().st_mode & 0o7777) == "0o2770"
    assert (root / "var" / "lib" / "productiv-watcher").is_dir()  # what StateDirectory= makes
    assert (root / "etc" / "systemd" / "system" / "productiv-watcher@.service").exists()
    exe = root / "opt" / "productiv-watcher" / "venv" / "bin" / "productiv-watcher"
    assert (
        "productiv-watcher"
        in subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, check=True
        ).stdout
    )

    readme_check(root, exe, sandbox)

    (etc / "config.toml").write_text("app_id = 'mine'\n")
    (root / "srv" / "productiv" / "drop" / "waiting.csv").write_text("x")
    again = subprocess.run(
        [*install, "--secret-file", str(secret)], capture_output=True, text=True, check=True
    )
    assert (etc / "config.toml").read_text() == "app_id = 'mine'\n"  # never overwritten
    assert "already built from this checkout" in again.stdout  # the same sources: no rebuild
    assert "-m pip" not in again.stdout
    changed = tmp_path / "changed"  # an upgrade: another checkout, one source file edited
    for part in ("watcher", "deploy", "systemd"):
        shutil.copytree(ROOT / part, changed / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy(ROOT / part, changed / part)
    with (changed / "watcher" / "__init__.py").open("a") as init:
        init.write("# edited\n")
    upgrade = [str(changed / "deploy" / "install.sh"), *install[1:], "--dry-run"]
    rebuild = subprocess.run(upgrade, capture_output=True, text=True, check=True).stdout
    assert re.search(r"-m pip (--python \S+ )?install ", rebuild), rebuild
    assert "already built" not in rebuild

    units = root / "etc" / "systemd" / "system"
    wants = units / "multi-user.target.wants"
    wants.mkdir()  # as `systemctl enable productiv-watcher productiv-watcher@site-b` leave them
    enabled = {
        "productiv-watcher.service": "productiv-watcher.service",
        "productiv-watcher@site-b.service": "productiv-watcher@.service",
    }
    for unit, target in enabled.items():
        (wants / unit).symlink_to(units / target)
    subprocess.run([*install, "--uninstall"], capture_output=True, check=True)
    assert not (root / "opt" / "productiv-watcher").exists()
    assert not (root / "etc" / "systemd" / "system" / "productiv-watcher.service").exists()
    assert list(wants.iterdir()) == []  # the service's and the instance's enablement links too
    assert (etc / "config.toml").exists() and (etc / "client_secret").exists()
    assert (root / "srv" / "productiv" / "drop" / "waiting.csv").exists()
