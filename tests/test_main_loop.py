"""The main loop under hostile and unlucky conditions: signal bursts, stops while the API hangs,
chores that meet I/O errors, reloads that cannot or must not be applied, bad settings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.conftest import Captured
from tests.helpers import Child, Folders, cli, daemon_env, wait_for, write
from watcher.commands.admin import matches, receipt_key
from watcher.daemon.wakeup import Wakeup
from watcher.pipeline.receipts import Journal
from watcher.sandbox.productiv import Sandbox
from watcher.settings import Settings, reloaded, unknown_variables


def status_stamp(folders: Folders) -> float:
    try:
        doc = json.loads((folders.root / "state" / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return 0.0
    return float(doc.get("updated_epoch", 0.0))


def started(sandbox: Sandbox, folders: Folders, **extra: str) -> Child:
    child = Child(daemon_env(sandbox, folders, PRODUCTIV_STATUS_SECONDS="0.2", **extra))
    wait_for(lambda: " ready " in child.stderr or child.proc.poll() is not None, what="READY")
    return child


def test_a_burst_of_sighups_leaves_the_daemon_answering_and_stoppable(sandbox, folders):
    child = started(sandbox, folders)
    try:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:  # as from a shell loop: kill -HUP as fast as it goes
            os.kill(child.proc.pid, signal.SIGHUP)
        stamp = status_stamp(folders)  # before the upload, which changes the status
        write(folders.drop / "after.csv", b"after the burst")
        wait_for(lambda: (folders.done / "after.csv").exists(), timeout=10, what="an upload")

        def turned() -> bool:
            """Quiet, the loop turns only every check_seconds (10 s), unless woken."""
            child.send_signal(signal.SIGHUP)
            return status_stamp(folders) > stamp

        wait_for(turned, timeout=10, what="the status file, written by the woken main loop")
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == 0
    finally:
        child.close()
    assert "Traceback" not in child.stderr


def test_two_sigterms_in_quick_succession_end_it(sandbox, folders):
    for _ in range(3):
        child = started(sandbox, folders)
        try:
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGTERM)
            assert child.wait(10) == 0
        finally:
            child.close()


def test_a_stop_does_not_wait_for_a_hanging_token_call(sandbox, folders):
    sandbox.inject("token", count=1, delay=30)
    child = started(sandbox, folders, PRODUCTIV_REQUEST_TIMEOUT_SECONDS="60")
    try:
        write(folders.drop / "a.csv", b"a")
        wait_for(lambda: sandbox.arrived["token"] == 1, what="the token call")
        begun = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
        assert time.monotonic() - begun < 10.0  # not the 20-s shutdown_timeout_seconds
    finally:
        child.close()
    assert folders.files(folders.drop) == ["a.csv"]


def config_child(sandbox: Sandbox, config: Path) -> Child:
    env = {
        "PRODUCTIV_CLIENT_SECRET": sandbox.client_secret,
        "PRODUCTIV_RETRY_INITIAL_SECONDS": "0.05",
    }
    child = Child(env, "--config", str(config))
    wait_for(lambda: " ready " in child.stderr or child.proc.poll() is not None, what="READY")
    return child


def settings_toml(sandbox: Sandbox, folders: Folders | None, extra: str = "") -> str:
    drop = f'drop_dir = "{folders.drop}"\n' if folders is not None else ""
    return (
        f'app_id = "{sandbox.app_id}"\nclient_id = "{sandbox.client_id}"\n'
        f'api_url = "{sandbox.url}"\ntoken_url = "{sandbox.url}/oauth2/token"\n'
        f"{drop}settle_seconds = 0.3\nstatus_seconds = 0.3\n{extra}"
    )


def test_a_reload_keeps_settings_that_need_a_restart_everywhere(sandbox, folders):
    """A new done_dir needs a restart: retention keeps sweeping the done_dir in use."""
    unused = folders.root / "other-done"
    write(unused / "not-ours.csv", b"keep me")
    write(folders.done / "ours.csv", b"old")
    config = folders.root / "config.toml"
    config.write_text(settings_toml(sandbox, folders, "done_retention_days = 1\n"))
    child = config_child(sandbox, config)
    try:
        config.write_text(
            settings_toml(
                sandbox, folders, f'done_dir = "{unused}"\ndone_retention_days = 2.3e-5\n'
            )  # two seconds: swept every half second
        )
        child.send_signal(signal.SIGHUP)
        wait_for(lambda: " reloaded " in child.stderr, what="the reload")
        wait_for(lambda: not (folders.done / "ours.csv").exists(), what="retention in done/")
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        child.close()
    [line] = [line for line in child.lines if " reloaded " in line]
    assert "applied=done_retention_days" in line and "restart_needed=done_dir" in line
    assert (unused / "not-ours.csv").read_bytes() == b"keep me"


def test_a_reload_without_drop_dir_is_refused_whole(sandbox, folders):
    config = folders.root / "config.toml"
    config.write_text(settings_toml(sandbox, folders, "done_retention_days = 2.3e-5\n"))
    child = config_child(sandbox, config)
    try:
        config.write_text(settings_toml(sandbox, None, 'log_level = "DEBUG"\n'))
        child.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in child.stderr, what="the refusal")
        write(folders.drop / "still.csv", b"x")
        wait_for(lambda: (folders.done / "still.csv").exists(), what="an upload")
        wait_for(lambda: " deleted " in child.stderr, what="a retention sweep")
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        child.close()
    [line] = [line for line in child.lines if "reload_failed" in line]
    assert "drop_dir" in line and "nothing changed" in line
    assert " reloaded " not in child.stderr and " DEBUG " not in child.stderr


def test_a_reload_of_a_config_that_is_not_utf8_is_refused_and_the_daemon_goes_on(sandbox, folders):
    """The UnicodeDecodeError escaped the reload: the running daemon crashed."""
    config = folders.root / "config.toml"
    config.write_text(settings_toml(sandbox, folders, ""))
    child = config_child(sandbox, config)
    try:
        config.write_bytes(settings_toml(sandbox, folders, "").encode() + b"# caf\xe9\n")
        child.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in child.stderr, what="the refusal")
        write(folders.drop / "still.csv", b"x")
        wait_for(lambda: (folders.done / "still.csv").exists(), what="an upload")
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        child.close()
    [line] = [line for line in child.lines if "reload_failed" in line]
    assert f"config file {config} is not UTF-8" in line and "nothing changed" in line
    assert "Traceback" not in child.stderr


@contextmanager
def tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)]
    mounted = subprocess.run(mount, capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with pytest.raises(OSError), filler.open("wb") as out:
        while True:
            out.write(b"\0" * 4096)
            out.flush()
    return filler


def journal(folders: Folders) -> list[dict]:
    path = folders.root / "state" / "receipts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_retention_on_a_read_only_state_folder_deletes_nothing_unrecorded(
    daemon, folders, logs_json: Captured
):
    with tmpfs(folders.root / "state") as state:
        write(folders.done / "old.csv", b"old")
        with daemon(done_retention_days=1 / 86400, status_seconds=0.1):  # swept every 0.25 s
            remount(state, "ro")
            wait_for(lambda: logs_json.events("retention_failed"), what="a refused sweep")
            assert (folders.done / "old.csv").exists()  # not deleted: it could not be receipted
            remount(state, "rw")
            wait_for(lambda: not (folders.done / "old.csv").exists(), what="the next sweep")
        assert [r["outcome"] for r in journal(folders) if r["file"] == "done/old.csv"] == [
            "deleted"
        ]
        [failed] = logs_json.events("retention_failed")[:1]
        assert (
            "Read-only file system" in failed["message"] and "nothing deleted" in failed["message"]
        )


def test_a_receipt_write_the_full_disk_cuts_short_leaves_no_torn_line(folders):
    """A nearly full disk took part of a batch without an error: the torn line swallowed the next
    receipt too, and a retention sweep deleted files it had not recorded (attack pass)."""
    with tmpfs(folders.root / "state", "64k") as state:
        journal = Journal(state, 10 * 1024 * 1024, 5)
        journal.append([{"file": "first.csv", "outcome": "uploaded"}])
        before = (state / "receipts.jsonl").read_bytes()
        filler = fill(state)
        with filler.open("r+b") as out:
            out.truncate(filler.stat().st_size - 4096)  # one page left: less than the batch
        batch = [
            {"file": f"burst-{n:03}-with-a-longish-name.csv", "outcome": "up"} for n in range(200)
        ]
        with pytest.raises(OSError):
            journal.append(batch)
        assert (state / "receipts.jsonl").read_bytes() == before  # none of it, not a torn part
        filler.unlink()
        journal.append([{"file": "after.csv", "outcome": "uploaded"}])
        lines = (state / "receipts.jsonl").read_text().splitlines()
        assert [json.loads(line)["file"] for line in lines] == ["first.csv", "after.csv"]


def test_a_line_a_crash_tore_costs_only_itself(tmp_path):
    """A torn last line (a crash mid-write) swallowed the next receipt: it was appended to it."""
    journal = Journal(tmp_path, 10 * 1024 * 1024, 5)
    journal.append([{"file": "first.csv", "outcome": "uploaded"}])
    with (tmp_path / "receipts.jsonl").open("a") as torn:
        torn.write('{"file": "torn.csv", "outc')
    journal.append([{"file": "after.csv", "outcome": "uploaded"}])
    assert [r["file"] for r in journal.newest_first()] == ["after.csv", "first.csv"]


def test_retention_of_a_name_that_is_not_utf8(daemon, folders, logs_json: Captured):
    folders.done.mkdir()
    name = os.fsencode(folders.done) + b"/bad-\xff.csv"
    with open(name, "wb") as out:
        out.write(b"x")
    with daemon(done_retention_days=1 / 86400):
        wait_for(lambda: not os.path.exists(name), what="retention")
    [deleted] = logs_json.events("deleted")
    assert deleted["file"] == "done/bad-\\xff.csv"
    assert journal(folders)[-1]["file"] == "done/bad-\\xff.csv"


def test_a_full_filesystem_for_metrics_textfile_is_logged_once(
    daemon, folders, logs_json: Captured
):
    with tmpfs(folders.root / "metrics", "256k") as mnt:
        fill(mnt)
        with daemon(metrics_textfile=mnt / "productiv.prom", status_seconds=0.1):
            write(folders.drop / "a.csv", b"a")
            wait_for(lambda: (folders.done / "a.csv").exists(), what="an upload")
            wait_for(lambda: logs_json.events("metrics"), what="the warning")
        [warning] = logs_json.events("metrics")  # one line, not one per turn nor at the stop
        assert "No space left" in warning["message"] and "metrics_textfile" in warning["message"]


def run_78(env: dict[str, str]) -> str:
    """`run` with these settings must exit 78 at once; its stderr."""
    result = cli("run", env=env, timeout=20)
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REQUEST_TIMEOUT_SECONDS", "inf"),
        ("REQUEST_TIMEOUT_SECONDS", "nan"),
        ("REQUEST_TIMEOUT_SECONDS", "1e300"),
        ("RETRY_MAX_SECONDS", "inf"),
        ("CONTENT_TYPE", "text/csv\r\nX-Injected: 1"),
        ("CONTENT_TYPE", "text/\x1bcsv"),
    ],
)
def test_settings_that_would_crash_at_run_time_are_exit_78(sandbox, folders, name, value):
    stderr = run_78(daemon_env(sandbox, folders, **{f"PRODUCTIV_{name}": value}))
    assert f"invalid setting {name.lower()}" in stderr


def test_an_unknown_productiv_variable_is_exit_78_naming_it(sandbox, folders):
    stderr = run_78(daemon_env(sandbox, folders, PRODUCTIV_SETLE_SECONDS="5"))
    assert "invalid setting PRODUCTIV_SETLE_SECONDS: no such setting" in stderr


def test_a_metrics_port_in_use_or_an_unusable_host_is_exit_78(sandbox, folders):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        stderr = run_78(daemon_env(sandbox, folders, PRODUCTIV_METRICS_PORT=port))
    assert "invalid setting metrics_port" in stderr and "Address already in use" in stderr
    stderr = run_78(
        daemon_env(
            sandbox, folders, PRODUCTIV_METRICS_PORT=port, PRODUCTIV_METRICS_HOST="no-such.invalid"
        )
    )
    assert "invalid setting metrics_host" in stderr


def test_status_finds_a_file_by_the_name_it_has_in_done(daemon, folders, sandbox):
    write(folders.done / "users" / "a.csv", b"an older a.csv")
    with daemon():
        write(folders.drop / "users" / "a.csv", b"new")
        wait_for(lambda: len(folders.files(folders.done)) == 2, what="the upload")
    [renamed] = [f for f in folders.files(folders.done) if f != "users/a.csv"]
    env = {"PRODUCTIV_DROP_DIR": str(folders.drop)}  # no app_id, no credentials: none needed
    for name in (f"done/{renamed}", renamed.split("/")[1], str(folders.done / renamed)):
        found = cli("status", name, env=env)
        assert found.returncode == 0, found.stdout + found.stderr
        assert f"uploaded users/a.csv -> done/{renamed}" in found.stdout
    assert cli("status", str(folders.done / "users" / "a.csv"), env=env).returncode == 1


def test_upload_of_a_name_that_is_not_utf8_says_why(sandbox, tmp_path):
    name = os.fsencode(tmp_path) + b"/bad-\xff.csv"
    with open(name, "wb") as out:
        out.write(b"x")
    result = cli("upload", os.fsdecode(name), env=sandbox.env())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "FAILED" in result.stdout and "bad-\\xff.csv: the file name is not valid UTF-8" in (
        result.stdout
    )


# -- the decisions, from tables ------------------------------------------------------------------


def test_a_woken_wait_returns_at_once_and_a_quiet_one_after_its_timeout():
    wakeup = Wakeup()
    try:
        for _ in range(100_000):  # far more than the pipe holds: a full pipe is still awake
            wakeup.set()
        begun = time.monotonic()
        wakeup.wait(5.0)
        assert time.monotonic() - begun < 1.0
        begun = time.monotonic()
        wakeup.wait(0.2)  # drained: this one sleeps
        assert time.monotonic() - begun >= 0.15
    finally:
        wakeup.close()


BASE = Settings(app_id="a", access_token=SecretStr("t"), drop_dir=Path("/srv/drop"))


@pytest.mark.parametrize(
    ("change", "applied", "restart"),
    [
        ({}, [], []),
        ({"batch_size": 7, "log_level": "DEBUG"}, ["batch_size", "log_level"], []),
        ({"done_dir": Path("/srv/elsewhere")}, [], ["done_dir"]),
        (
            {"done_dir": Path("/srv/elsewhere"), "done_retention_days": 3.0},
            ["done_retention_days"],
            ["done_dir"],
        ),
        ({"drop_dir": Path("/x/drop"), "settle_seconds": 1.0}, ["settle_seconds"], ["drop_dir"]),
    ],
)
def test_a_reload_takes_only_the_live_settings(change, applied, restart):
    new = BASE.model_copy(update=change)
    effective, got_applied, got_restart = reloaded(BASE, new)
    assert (got_applied, got_restart) == (applied, restart)
    for name in Settings.model_fields:
        source = new if name in applied else BASE
        assert getattr(effective, name) == getattr(source, name), name


@pytest.mark.parametrize(
    ("environ", "unknown"),
    [
        ({"PRODUCTIV_SETTLE_SECONDS": "1", "PRODUCTIV_CONFIG": "/etc/x.toml"}, []),
        ({"PRODUCTIV_SETLE_SECONDS": "1"}, ["PRODUCTIV_SETLE_SECONDS"]),
        ({"productiv_log_level": "debug", "productiv_nope": ""}, ["productiv_nope"]),
        ({"PRODUCTIVE_THING": "x", "HOME": "/root"}, []),
    ],
)
def test_unknown_productiv_variables(environ, unknown):
    assert unknown_variables(environ) == unknown


@pytest.mark.parametrize(
    ("file", "key"),
    [
        ("a.csv", "a.csv"),
        ("done/users/a.20261129T101010Z.csv", "done/users/a.20261129T101010Z.csv"),
        ("/srv/drop/users/a.csv", "users/a.csv"),
        ("/srv/done/users/a.20261129T101010Z.csv", "done/users/a.20261129T101010Z.csv"),
        ("/srv/failed/b.csv", "failed/b.csv"),
        ("/elsewhere/a.csv", "/elsewhere/a.csv"),
        (os.fsdecode(b"bad-\xff.csv"), "bad-\\xff.csv"),
    ],
)
def test_status_file_is_looked_up_as_receipts_spell_it(file, key):
    assert receipt_key(BASE, file) == key


RECEIPT = {"file": "users/a.csv", "moved_to": "done/users/a.20261129T101010Z.csv"}


@pytest.mark.parametrize(
    ("wanted", "found"),
    [
        ("users/a.csv", True),
        ("a.csv", True),
        ("done/users/a.20261129T101010Z.csv", True),
        ("a.20261129T101010Z.csv", True),
        ("sa.csv", False),
        ("", False),
        ("done/users/a.csv", False),
    ],
)
def test_a_receipt_matches_its_file_and_where_it_went(wanted, found):
    assert matches(RECEIPT, wanted) is found
    assert matches({"file": "done/old.csv", "outcome": "deleted"}, "") is False
