"""One daemon per drop folder: the lock, the standby, the takeover after a kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.helpers import Child, Folders, cli, daemon_env, plant, wait_for
from watcher.daemon.instance import DropLock, Holder, active_holder, parse_holder
from watcher.daemon.service import Service
from watcher.disk.folders import LOCK_NAME
from watcher.disk.renames import clear_reserved
from watcher.pipeline.deafness import CANARY_NAME
from watcher.pipeline.watching import locate
from watcher.sandbox.productiv import Sandbox

HOST = socket.gethostname()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"pid": 12, "host": "a", "since": "2026-01-01T00:00:00Z"}', (12, "a")),
        ('{"pid": "12", "host": "a"}', (12, "a")),
        ("", (None, "")),  # the new holder has not written it yet
        ('{"pid": 12', (None, "")),  # half written
        ('{"host": "a"}', (None, "")),
        ("[1, 2]", (None, "")),
        ('{"pid": 1e400, "host": "h"}', (None, "")),  # infinity: int() raised OverflowError
        ("[" * 4096, (None, "")),  # RecursionError: a traceback from status and check
        ('{"pid": true, "host": "h"}', (None, "")),
        ('{"pid": 12, "host": ["h"]}', (None, "")),
    ],
)
def test_the_lock_file_names_its_holder(text, expected):
    holder = parse_holder(text)
    assert (holder.pid, holder.host) == expected


def test_holder_descriptions():
    assert Holder(12, "a").describe() == "pid 12 on a"
    assert Holder(None, "").describe() == "another instance"


@pytest.mark.parametrize("name", [LOCK_NAME, CANARY_NAME])
def test_the_lock_and_canary_files_are_never_uploaded_whatever_the_patterns(name):
    assert locate(f"/d/{name}", "/d", None, ()) is None
    assert locate(f"/d/users/{name}", "/d", None, ()) is not None  # only ours, at the top


def test_one_holder_at_a_time_and_others_see_who(tmp_path):
    first, second = DropLock(tmp_path), DropLock(tmp_path)
    assert active_holder(tmp_path) is None  # no lock file yet: nothing created by looking
    assert not (tmp_path / LOCK_NAME).exists()
    assert first.acquire() is None and first.held
    assert oct((tmp_path / LOCK_NAME).stat().st_mode & 0o777) == "0o600"  # no producer opens it
    assert second.acquire() == Holder(os.getpid(), HOST, first.holder().since)
    assert active_holder(tmp_path) == first.holder()
    first.release()
    assert active_holder(tmp_path) is None
    assert second.acquire() is None
    second.release()


def test_a_removed_lock_file_is_taken_back_or_lost(sandbox: Sandbox, folders: Folders):
    service = Service(make_settings(sandbox, folders))
    try:
        assert service.lock.acquire() is None
        assert service._keep_lock()
        (folders.drop / LOCK_NAME).unlink()  # a producer cleaning up hidden files
        assert service._keep_lock() and service.lock.still_ours()  # took a new one
        (folders.drop / LOCK_NAME).unlink()
        other = DropLock(folders.drop)
        assert other.acquire() is None  # a standby locked the new file first
        assert not service._keep_lock()  # the main loop ends with status 1
        other.release()
    finally:
        service.lock.release()
        service.api.close()


def test_an_instance_that_ran_without_the_lock_says_so_when_another_has_it(
    sandbox: Sandbox, folders: Folders, logs_json
):
    """A full disk at start: it ran without the lock file; once another made and took it, it
    said the file "was removed or replaced", which nobody had done (attack pass)."""
    service = Service(make_settings(sandbox, folders))
    other = DropLock(folders.drop)
    try:
        service._lock_deferred = True  # as _try_lock leaves it when the file cannot be made
        assert other.acquire() is None
        assert not service._keep_lock()
    finally:
        other.release()
        service.api.close()
    [lost] = logs_json.events("lock_lost")
    assert "which this one could not" in lost["message"] and "removed" not in lost["message"]


NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to give a file to another user: run `make test` as root"
)


@pytest.mark.parametrize(
    "kind",
    ["symlink", "fifo", "folder", pytest.param("locked file of another user", marks=NEEDS_ROOT)],
)
def test_what_a_producer_puts_at_the_lock_files_name_is_removed_not_obeyed(
    tmp_path, kind, logs_json
):
    drop = tmp_path / "drop"
    drop.mkdir()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep")
    fd = plant(drop / LOCK_NAME, kind, elsewhere)
    lock = DropLock(drop)
    try:
        assert lock.acquire() is None  # not a standby behind a producer, not exit 78
        st = (drop / LOCK_NAME).lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        assert st.st_mode & 0o777 == 0o600 and lock.still_ours()
        assert active_holder(drop) == Holder(os.getpid(), HOST, lock.holder().since)
    finally:
        lock.release()
        if fd is not None:
            os.close(fd)
    assert elsewhere.read_text() == "keep"
    assert [e["lock"] for e in logs_json.events("lock_planted")] == [str(drop / LOCK_NAME)]


@NEEDS_ROOT
def test_a_running_daemon_takes_its_lock_back_from_a_producers_replacement(
    sandbox: Sandbox, folders: Folders
):
    service = Service(make_settings(sandbox, folders))
    path = folders.drop / LOCK_NAME
    try:
        assert service.lock.acquire() is None
        path.unlink()
        fd = plant(path, "locked file of another user", path)
        assert fd is not None
        assert service._keep_lock() and service.lock.still_ours()  # lock_restored, not lost
        os.close(fd)
    finally:
        service.lock.release()
        service.api.close()


def test_a_standby_tells_systemd_pings_and_stops_cleanly(sandbox, folders, notify):
    holder = DropLock(folders.drop)
    assert holder.acquire() is None  # the "first instance" is this test process
    (folders.drop / "a.csv").write_bytes(b"x")
    child = Child(
        daemon_env(sandbox, folders, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000")
    )
    try:
        want = f"STATUS=standby: the drop folder is held by pid {os.getpid()} on {HOST}"
        wait_for(lambda: notify.texts("READY=1"), what="READY=1")
        assert notify.messages[0][1].splitlines() == ["READY=1", want]
        wait_for(lambda: len(notify.times("WATCHDOG=1")) >= 4, what="pings while standing by")
        child.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert child.wait(15) == 0
        assert time.monotonic() - started < 10  # well inside the units' TimeoutStopSec (40 s)
    finally:
        child.close()
        holder.release()
    assert notify.texts("STOPPING=1")
    assert (folders.drop / "a.csv").exists() and sandbox.count("put") == 0
    assert "standby" in child.stderr and "Traceback" not in child.stderr


def events(child: Child, name: str) -> list[dict[str, object]]:
    docs = [json.loads(line) for line in list(child.lines) if line.startswith("{")]
    return [d for d in docs if d.get("event") == name]


def status(env: dict[str, str]) -> dict[str, object]:
    result = cli("status", "--json", env=env)
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


@pytest.mark.long
def test_two_daemons_on_one_folder_one_uploads_the_other_takes_over_after_kill_9(
    sandbox: Sandbox, folders: Folders, tmp_path: Path
):
    names = [f"users/f{n:03d}.csv" for n in range(60)]
    (folders.drop / "users").mkdir()
    env = {
        **sandbox.env(),
        "PRODUCTIV_DROP_DIR": str(folders.drop),
        "PRODUCTIV_SETTLE_SECONDS": "0.3",
        "PRODUCTIV_UPLOAD_CONCURRENCY": "2",
        "PRODUCTIV_STATUS_SECONDS": "0.3",
        "PRODUCTIV_LOG_FORMAT": "json",
        "PRODUCTIV_LOG_LEVEL": "DEBUG",
    }
    sandbox.inject("put", count=len(names), delay=0.15)  # a burst that takes a few seconds
    first = Child(env)
    second: Child | None = None
    try:
        wait_for(lambda: events(first, "ready"), what="the first to be ready")
        second = Child(env)
        wait_for(lambda: events(second, "standby"), what="the second to stand by")
        assert status(env)["active"] == {"pid": first.proc.pid, "host": HOST}
        for name in names:
            (folders.drop / name).write_bytes(name.encode())
        wait_for(lambda: len(folders.files(folders.done)) >= 15, what="the first uploading")
        assert [d["event"] for d in events(second, "standby")] == ["standby"]
        for busy in ("queued", "uploaded", "failed", "retrying", "ready"):
            assert events(second, busy) == [], f"the standby logged {busy}"
        first.proc.kill()  # kill -9, mid-burst
        killed = time.monotonic()
        wait_for(lambda: events(second, "takeover"), timeout=10, what="the takeover")
        took = time.monotonic() - killed
        wait_for(
            lambda: len(folders.files(folders.done)) == len(names), timeout=60, what="all done"
        )
        assert status(env)["active"] == {"pid": second.proc.pid, "host": HOST}
        print(f"takeover {took:.2f} s after kill -9; {sandbox.count('put')} PUTs")
    finally:
        first.close()
        if second is not None:
            second.send_signal(signal.SIGTERM)
            assert second.wait(15) == 0
            second.close()
    assert folders.files(folders.done) == names  # each once: a second move would add a stamp
    assert folders.files(folders.drop) == []
    for name in names:
        assert sandbox.stored(name.split("/")[1], "users") == name.encode()


def test_clearing_a_reserved_name_sets_a_folder_aside_under_a_name_none_can_take_first(tmp_path):
    """The aside names were .planted-1 to -99: a producer who made them all first had every start
    end with exit 78. A folder swapped in for a file meanwhile was EISDIR, exit 78 too."""
    for n in range(1, 100):
        (tmp_path / f"{LOCK_NAME}.planted-{n}").touch()
    path = tmp_path / LOCK_NAME
    path.mkdir()
    (path / "x.csv").write_text("theirs")
    how = clear_reserved(path, path.lstat())
    assert how.startswith(f"moved aside to {LOCK_NAME}.planted-") and not path.exists()
    assert (tmp_path / how.removeprefix("moved aside to ") / "x.csv").read_text() == "theirs"
    (tmp_path / "plain").touch()
    file_seen = (tmp_path / "plain").lstat()
    path.mkdir()  # a folder where a file was seen
    with pytest.raises(FileNotFoundError):
        clear_reserved(path, file_seen)
