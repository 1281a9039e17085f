"""The command line as systemd and operators use it: real subprocesses, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_daemon
from tests.helpers import ROOT, assert_no_secrets, clean_env, cli, daemon_env, wait_for, write
from watcher import __version__
from watcher.disk.access import mount_of
from watcher.settings import Settings


@pytest.mark.parametrize("command", ["", "run", "check", "upload", "sandbox", "demo"])
def test_version_and_help_on_every_command(command):
    args = [command] if command else []
    assert __version__ in cli(*args, "--version").stdout
    assert "usage: productiv-watcher" in cli(*args, "--help").stdout


def test_invalid_settings_exit_78_naming_each_setting(folders):
    result = cli("run", env={"PRODUCTIV_BATCH_SIZE": "0", "PRODUCTIV_CLIENT_SECRET": "x"})
    assert result.returncode == 78
    assert "invalid setting app_id" in result.stderr
    assert "invalid setting batch_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_without_a_state_folder_says_what_to_set():
    result = cli("status", env={"PRODUCTIV_APP_ID": "a", "PRODUCTIV_ACCESS_TOKEN": "t"})
    assert result.returncode == 78, result.stderr
    assert "invalid setting state_dir: Field required (or set drop_dir)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("which", ["config", "credential"])
def test_a_config_or_credential_file_that_is_not_utf8_is_exit_78_naming_it(tmp_path, which):
    """It was exit 1 with a traceback: systemd restarted it every 10 s for ever (exit 78 is the
    unit's RestartPreventExitStatus)."""
    config, creds = tmp_path / "config.toml", tmp_path / "creds"
    creds.mkdir()
    config.write_bytes(b'app_id = "a"\naccess_token = "t"\n')
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    if which == "config":
        config.write_bytes(b'app_id = "a"\naccess_token = "t"\n# caf\xe9\n')
        path = config
    else:
        path = creds / "client_secret"
        path.write_bytes(b"s\xe9cret")
    result = cli("check", "--config", str(config), env=env)
    assert result.returncode == 78, result.stderr
    assert f"{which} file {path} is not UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_are_json_lines_in_json_mode(tmp_path):
    result = cli(
        "check", "--config", str(tmp_path / "missing.toml"), env={"PRODUCTIV_LOG_FORMAT": "json"}
    )
    assert result.returncode == 78
    [line] = result.stderr.splitlines()
    doc = json.loads(line)
    assert doc["event"] == "config_error" and doc["level"] == "error"
    assert "missing.toml does not exist" in doc["message"]


def test_a_missing_drop_folder_is_exit_78_and_is_never_created(sandbox, tmp_path):
    drop = tmp_path / "not-mounted"
    result = cli("run", env={**sandbox.env(), "PRODUCTIV_DROP_DIR": str(drop)})
    assert result.returncode == 78
    assert f"drop_dir {drop} does not exist" in result.stderr
    assert not drop.exists()


def test_done_on_another_filesystem_is_exit_78(sandbox, folders):
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == folders.drop.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to put done/ on")
    done = other / f"pw-done-{os.getpid()}"
    try:
        result = cli("run", env=daemon_env(sandbox, folders, PRODUCTIV_DONE_DIR=str(done)))
    finally:
        done.rmdir() if done.exists() else None
    assert result.returncode == 78
    assert "done_dir" in result.stderr and "filesystem" in result.stderr


@pytest.mark.parametrize("mounted", ["done", "drop"])
def test_a_bind_mount_of_the_same_filesystem_between_drop_and_done_is_exit_78(
    sandbox, folders, mounted
):
    """Same st_dev, so it passed: then every rename failed (EXDEV), no file was ever moved, and
    every restart uploaded them all again (attack pass)."""
    real = folders.root / f"real-{mounted}"
    real.mkdir()
    target = folders.done if mounted == "done" else folders.drop
    target.mkdir(exist_ok=True)
    bind = subprocess.run(
        ["mount", "--bind", str(real), str(target)], check=False, capture_output=True
    )
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    try:
        env = daemon_env(sandbox, folders)
        ran, checked = cli("run", env=env), cli("check", env=env)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert ran.returncode == 78, ran.stderr
    assert "is on another mount of the drop folder's filesystem (a bind mount)" in ran.stderr
    assert checked.returncode == 1 and "folders: FAIL done_dir" in checked.stdout, checked.stdout
    assert "Traceback" not in ran.stderr + checked.stderr


def test_a_mount_stacked_over_the_folders_is_judged_by_what_is_seen(sandbox, folders, tmp_path):
    """Something mounted at done/, then the whole tree bound over itself: done/ is the plain
    folder again, renames work, but the mount table's longest prefix still named the hidden
    mount, and run refused to start (review)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folders.done.mkdir(exist_ok=True)
    first = ["mount", "--bind", str(elsewhere), str(folders.done)]
    if subprocess.run(first, check=False, capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "--bind", str(folders.root), str(folders.root)], check=True)
        try:
            checked = cli("check", env=daemon_env(sandbox, folders))
        finally:
            subprocess.run(["umount", str(folders.root)], check=True)
    finally:
        subprocess.run(["umount", str(folders.done)], check=True)
    assert "folders: ok" in checked.stdout, checked.stdout


def test_the_mount_table_is_read_with_its_escapes(tmp_path):
    """The fallback before Linux 5.8 (no statx mount id): the longest mount point above."""
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n30 22 0:40 / /srv/drop\\040box rw - tmpfs tmpfs rw\n"
    )
    assert mount_of(Path("/srv/drop box/users"), str(table)) == "/srv/drop box"
    assert mount_of(Path("/srv/done"), str(table)) == "/"
    assert mount_of(Path("/srv"), str(tmp_path / "none")) is None


def test_check_reports_and_exits_0_when_all_is_well(sandbox, folders):
    result = cli("check", env=daemon_env(sandbox, folders))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "token: ok" in result.stdout and "all good" in result.stdout


def test_check_exits_1_on_wrong_credentials(sandbox, folders):
    result = cli("check", env=daemon_env(sandbox, folders, PRODUCTIV_CLIENT_SECRET="wrong-secret"))
    assert result.returncode == 1
    assert "folders: ok" in result.stdout  # done/ and failed/ are created at start
    assert "token: FAIL" in result.stdout and "invalid_client" in result.stdout
    assert "check client_id and client_secret" in result.stdout


def test_check_exits_1_when_the_drop_folder_is_missing(sandbox, folders):
    result = cli("check", env=daemon_env(sandbox, folders, PRODUCTIV_DROP_DIR="/nonexistent/drop"))
    assert result.returncode == 1
    assert "folders: FAIL drop_dir /nonexistent/drop does not exist" in result.stdout


def test_check_works_with_http_basic_client_auth(sandbox, folders):
    sandbox.client_secret = "p@ss:word+/=%"  # characters RFC 6749 2.3.1 form-encodes
    env = daemon_env(sandbox, folders, PRODUCTIV_CLIENT_AUTH="basic")
    env["PRODUCTIV_CLIENT_SECRET"] = sandbox.client_secret
    folders.done.mkdir()
    folders.failed.mkdir()
    assert cli("check", env=env).returncode == 0


def test_upload_sends_the_named_files_without_moving_them(sandbox, tmp_path):
    a = tmp_path / "a.csv"
    a.write_bytes(b"a")
    b = tmp_path / "b.csv"
    b.write_bytes(b"b")
    again = tmp_path / "sub" / ".." / "a.csv"  # the same file, spelled another way
    (tmp_path / "sub").mkdir()
    alias = tmp_path / "c.csv"  # another name for it: an object of its own
    alias.symlink_to(a)
    named = [str(a), str(b), str(a), str(again), str(alias)]
    result = cli("upload", "--type", "contracts", *named, env=sandbox.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert sandbox.stored("a.csv", "contracts") == b"a" and a.exists()
    assert sandbox.stored("c.csv", "contracts") == b"a"
    assert result.stdout.count("uploaded") == 3, result.stdout
    assert sandbox.count("put") == 3  # a file named twice is sent once (it was PUT twice)


def test_upload_exits_1_naming_the_reason(sandbox, tmp_path):
    sandbox.inject("urls", count=10, status=503)
    a = tmp_path / "a.csv"
    a.write_bytes(b"a")
    env = {
        **sandbox.env(),
        "PRODUCTIV_MAX_ATTEMPTS": "2",
        "PRODUCTIV_RETRY_INITIAL_SECONDS": "0.05",
    }
    result = cli("upload", str(a), str(tmp_path / "missing.csv"), env=env)
    assert result.returncode == 1
    assert "FAILED" in result.stdout and "503" in result.stdout
    assert "No such file" in result.stdout


def test_sandbox_command_prints_the_settings_that_point_at_it(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "sandbox", "--port", "0", "--store", str(tmp_path / "s")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("PRODUCTIV_API_URL=http://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_sigterm_mid_upload_finishes_the_put_and_loses_nothing(sandbox, folders):
    sandbox.inject("put", count=1, delay=1.5)
    for n in range(4):
        (folders.drop / f"f{n}.csv").write_bytes(f"file {n}".encode())
    env = daemon_env(sandbox, folders, PRODUCTIV_UPLOAD_CONCURRENCY="1", PRODUCTIV_BATCH_SIZE="1")
    with subprocess_daemon(env) as proc:
        wait_for(lambda: sandbox.arrived["put"] == 1, what="the first PUT")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        stderr = proc.stderr
    assert_no_secrets(stderr)
    done = folders.files(folders.done)
    assert len(done) == 1
    assert sorted(done + folders.files(folders.drop)) == [f"f{n}.csv" for n in range(4)]
    assert "stopping" in stderr and "stopped" in stderr


def test_a_second_signal_exits_at_once_and_still_loses_nothing(sandbox, folders):
    sandbox.inject("put", count=1, delay=20)
    (folders.drop / "a.csv").write_bytes(b"a")
    with subprocess_daemon(daemon_env(sandbox, folders)) as proc:
        wait_for(lambda: sandbox.arrived["put"] == 1, what="the PUT")
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    assert folders.files(folders.drop) == ["a.csv"]


def test_a_stop_abandons_a_put_that_outlasts_the_shutdown_timeout(sandbox, folders):
    sandbox.inject("put", count=1, delay=20)
    (folders.drop / "a.csv").write_bytes(b"a")
    env = daemon_env(sandbox, folders, PRODUCTIV_SHUTDOWN_TIMEOUT_SECONDS="0.5")
    with subprocess_daemon(env) as proc:
        wait_for(lambda: sandbox.arrived["put"] == 1, what="the PUT")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        stderr = proc.stderr
    assert "abandoned=1" in stderr
    assert folders.files(folders.drop) == ["a.csv"]


def test_json_logs_are_one_object_per_line(sandbox, folders):
    (folders.drop / "a.csv").write_bytes(b"a")
    with subprocess_daemon(daemon_env(sandbox, folders, PRODUCTIV_LOG_FORMAT="json")) as proc:
        wait_for(lambda: (folders.done / "a.csv").exists())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        lines = proc.lines
    docs = [json.loads(line) for line in lines]
    events = [d["event"] for d in docs]
    assert events[:2] == ["started", "ready"] and events[-1] == "stopped" and "stopping" in events
    [uploaded] = [d for d in docs if d["event"] == "uploaded"]
    assert uploaded["file"] == "a.csv" and uploaded["bytes"] == 1 and uploaded["level"] == "info"
    assert docs[0]["settings"]["client_secret"] == "***"


def test_the_first_text_line_is_readable_and_json_keeps_every_setting(sandbox, folders):
    first = {}
    for fmt in ("text", "json"):
        env = daemon_env(sandbox, folders, PRODUCTIV_LOG_FORMAT=fmt, PRODUCTIV_BATCH_SIZE="7")
        with subprocess_daemon(env) as proc:
            wait_for(lambda: len(proc.lines) >= 2, what="started and ready")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            first[fmt] = proc.lines[0]
    words = first["text"].split()
    assert words[1:3] == ["INFO", "started"] and "{" not in first["text"]
    for pair in (f"drop_dir={folders.drop}", f"api_url={sandbox.url}", "client_secret=***"):
        assert pair in words
    assert "batch_size=7" in words and "settle_seconds=0.3" in words  # differ from the defaults
    assert not [w for w in words if w.startswith(("upload_concurrency=", "ignore_patterns="))]
    settings = json.loads(first["json"])["settings"]
    assert set(settings) == set(Settings.model_fields)  # all of them, defaults included
    assert settings["client_secret"] == "***" and settings["batch_size"] == 7


def test_a_state_dir_that_cannot_be_written_is_exit_78(sandbox, folders, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = cli(
        "run", env=daemon_env(sandbox, folders, PRODUCTIV_STATE_DIR=str(blocker / "state"))
    )
    assert result.returncode == 78
    assert "state_dir" in result.stderr


def test_the_commands_that_import_on_use_start_in_a_fresh_interpreter(tmp_path, sandbox):
    """The other tests fork the command line from a zygote that has imported every module
    (tests/zygote.py): here the commands that import theirs only when run start from a real
    exec, so that a missing or circular import would show."""
    (tmp_path / "drop").mkdir()
    data = write(tmp_path / "a.csv", b"a,b\n")
    env = {**clean_env(), **sandbox.env(), "PRODUCTIV_DROP_DIR": str(tmp_path / "drop")}
    for args, expected in (
        (["check"], "all good"),
        (["status"], "not running"),
        (["upload", str(data)], "uploaded"),
        (["retry-failed"], "moved back"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "watcher", *args],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert expected in done.stdout and "Traceback" not in done.stderr, done.stderr
