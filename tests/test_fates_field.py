"""A file's fate where the daemon runs as its own user (issue 10): folders it cannot write, a
done/ that turns read-only, and a storage outage that must back off.

The folder cases run the daemon as `nobody` (root ignores permissions) over folders laid out as
in the field: drop/ 2770 owned by the service user and a drop group; a producer's subfolder
made with umask 0027 (drwxr-s---, owned by the producer) that the service can read but not
write. The sandbox records every request, so a second PUT of any object shows.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import Child, Folders, wait_for
from tests.helpers import Unprivileged
from tests.test_pipeline import done_soon, write
from tests.test_systemd import NotifySocket
from watcher.sandbox import Sandbox


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
    import grp

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


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PRODUCTIV_")}


def puts_per_object(sandbox: Sandbox) -> Counter[str]:
    return Counter(r.path for r in list(sandbox.requests) if r.endpoint == "put")


def test_files_in_a_folder_the_service_cannot_write_wait_unsent_until_it_is_fixed(
    sandbox, as_nobody
):
    notify = NotifySocket(f"@pw-fates-{secrets.token_hex(4)}")  # abstract: nobody may send
    try:
        with field(as_nobody) as f:
            users = f.folders.drop / "users"  # made by the producer with umask 0027
            users.mkdir()
            os.chown(users, f.producer, f.drop_gid)
            users.chmod(0o2750)
            names = [f"u{n}.csv" for n in range(5)]
            for name in names:
                f.produce(users / name, name.encode())
            f.produce(f.folders.drop / "top.csv", b"top")
            f.start(sandbox, NOTIFY_SOCKET=notify.address)
            done_soon(f.folders, "top.csv")
            wait_for(lambda: f.status().get("folders") and f.status()["waiting"] == 5)
            wait_for(lambda: any("files wait" in s for s in notify.texts("STATUS=")))
            puts = puts_per_object(sandbox)
            assert [path.rsplit("/", 1)[-1] for path in puts] == ["top.csv"] and sandbox.count(
                "put"
            ) == 1
            asked = {name for r in sandbox.requests if r.endpoint == "urls" for name in r.names}
            assert asked == {"top.csv"}  # not even a URL for a file that could not be moved
            [problem] = f.events("folder_not_writable")
            assert problem["level"] == "error" and problem["folder"] == str(users)
            assert problem["user"] == f"nobody (uid {f.service})"
            assert problem["owner"] == f"{f.producer}:{f.drop_gid}"
            assert problem["mode"] == "drwxr-s---"
            assert problem["fix"].startswith(f"chmod g+wx {users}")
            status = f.status()
            assert str(users) in status["folders"][0] and status["last_error"] is None
            [line] = [s for s in notify.texts("STATUS=") if "files wait" in s][:1]
            assert str(users) in line and "service unavailable" not in line
            shown = subprocess.run(
                [sys.executable, "-m", "watcher", "status"],
                env={**child_env(), **sandbox.env(), "PRODUCTIV_DROP_DIR": str(f.folders.drop)},
                capture_output=True,
                text=True,
                check=False,
            )
            assert f"FOLDER: files wait: {users} is not writable by nobody" in shown.stdout

            users.chmod(0o2770)  # fixed: every file goes, without a restart or a rescan
            done_soon(f.folders, *(f"users/{name}" for name in names), timeout=20)
            f.stop()
        puts = puts_per_object(sandbox)
        assert len(puts) == 6 and set(puts.values()) == {1}  # each object PUT exactly once
        assert len(f.events("folder_not_writable")) == 1
        assert len(f.events("folder_writable")) == 1
        assert not f.events("retrying")
    finally:
        notify.close()


def test_a_done_folder_that_turns_read_only_during_the_put_retries_the_move_not_the_put(
    sandbox, as_nobody
):
    with field(as_nobody) as f:
        sandbox.inject("put", count=2, delay=1.0)  # done/ turns read-only while these are sent
        names = ["a.csv", "b.csv"]
        for name in names:
            f.produce(f.folders.drop / name, name.encode())
        f.start(sandbox)
        wait_for(lambda: sandbox.count("urls") >= 1)  # checked movable, then asked for the URL
        f.folders.done.chmod(0o555)
        wait_for(lambda: [e for e in f.events("retrying") if e["attempt"] >= 4], timeout=30)
        assert sandbox.count("put") == 2 and not list(f.folders.done.iterdir())
        f.folders.done.chmod(0o755)
        done_soon(f.folders, *names, timeout=20)
        f.stop()
    assert set(puts_per_object(sandbox).values()) == {1}  # no second PUT, however many moves
    moves = [e for e in f.events("retrying") if e["what"] == "move"]
    assert moves and moves == f.events("retrying")  # the API and the storage were fine
    assert [e["attempt"] for e in moves] == list(range(1, len(moves) + 1))
    assert all("Permission denied" in e["reason"] for e in moves)
    assert [e["seconds"] for e in moves] == sorted(e["seconds"] for e in moves)
    [problem] = f.events("folder_not_writable")
    assert problem["folder"] == str(f.folders.done) and problem["fix"].startswith("chmod u+wx")
    assert len(f.events("uploaded")) == 2 and not f.events("recovered")


def test_a_storage_outage_backs_off_further_at_each_step_while_the_api_answers(
    daemon, folders, sandbox, logs_json
):
    for n in range(3):
        write(folders.drop / f"f{n}.csv", b"x" * n)
    sandbox.inject("put", count=10**6, status=503)
    with daemon(retry_initial_seconds=0.1, retry_max_seconds=1.5):
        wait_for(lambda: len(logs_json.events("retrying")) >= 8, timeout=30)
        assert not logs_json.events("recovered")
        sandbox.clear()
        done_soon(folders, *(f"f{n}.csv" for n in range(3)))
    retrying = logs_json.events("retrying")
    assert {e["what"] for e in retrying} == {"storage"}
    assert [e["attempt"] for e in retrying] == list(range(1, len(retrying) + 1))
    assert retrying[-1]["seconds"] > 0.5  # grew well past the first step's 0.05-0.1 s
    [recovered] = logs_json.events("recovered")
    assert recovered["what"] == "storage"
    assert sandbox.count("urls") >= len(retrying)  # the API answered all along
