"""A file's fate where the daemon runs as its own user (issue 10): folders it cannot write, a
done/ that turns read-only, and a storage outage that must back off.

The folder cases run the daemon as `nobody` (root ignores permissions) over folders laid out as
in the field: drop/ 2770 owned by the service user and a drop group; a producer's subfolder
made with umask 0027 (drwxr-s---, owned by the producer) that the service can read but not
write. The sandbox records every request, so a second PUT of any object shows.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter

import pytest

from tests.helpers import NotifySocket, cli, done_soon, wait_for, write
from tests.unprivileged import field
from watcher.sandbox.productiv import Sandbox


def puts_per_object(sandbox: Sandbox) -> Counter[str]:
    return Counter(r.path for r in list(sandbox.requests) if r.endpoint == "put")


@pytest.mark.long
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
            shown = cli("status", env={**sandbox.env(), "PRODUCTIV_DROP_DIR": str(f.folders.drop)})
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


@pytest.mark.long
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


@pytest.mark.long
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
