"""Ready markers and late writes against unlucky operators and hostile producers.

Markers that are not files, the daemon's own files taken for markers, a late write the daemon
cannot send again (the API down until a stop, a file made unreadable): the daemon in-process
and as nobody, the sandbox on loopback, real files.
"""

from __future__ import annotations

import json
import os

from tests.helpers import done_soon, requested, status_of, wait_for, waiting_for_marker, write
from tests.unprivileged import field
from watcher.pipeline.receipts import NAME


def test_a_fifo_or_a_symlink_is_a_marker_never_opened_and_removed_after_the_move(
    daemon, folders, sandbox
):
    os.mkfifo(folders.drop / "a.csv.done")  # opening it would block the daemon
    os.symlink("/etc/passwd", folders.drop / "b.csv.done")
    write(folders.drop / "a.csv", b"a")
    write(folders.drop / "b.csv", b"b")
    with daemon(ready_marker=".done"):
        done_soon(folders, "a.csv", "b.csv")
        wait_for(lambda: folders.files(folders.drop) == [], what="both markers removed")
    assert os.path.exists("/etc/passwd")  # the link went, not what it points at
    assert requested(sandbox) == {"a.csv", "b.csv"}


def test_a_folder_is_no_marker(daemon, folders, sandbox, logs_json):
    """A folder `a.csv.done` cannot be consumed: taken as a marker, it would be a marker for
    every later a.csv, which would then go at once, before its producer says so."""
    (folders.drop / "a.csv.done").mkdir(parents=True)
    write(folders.drop / "a.csv", b"x")
    with daemon(ready_marker=".done", status_seconds=0.1) as service:
        wait_for(
            lambda: waiting_for_marker(service) == ["a.csv"], what="a.csv waits for its marker"
        )
        os.rmdir(folders.drop / "a.csv.done")
        write(folders.drop / "a.csv.done", b"")  # the real marker
        done_soon(folders, "a.csv")
    assert sandbox.count("put") == 1
    assert logs_json.events("marker_kept") == []


def test_the_daemons_own_lock_file_is_never_a_marker(daemon, folders, sandbox, logs_json):
    """ready_marker `.lock` with dot files not ignored: a file `.productiv-watcher` would take
    the drop folder's lock file for its marker, and the marker's removal would remove the lock
    (a second daemon could then lock a new one and work the same folder)."""
    settings = {"ready_marker": ".lock", "ignore_patterns": ("*.tmp",), "status_seconds": 0.1}
    with daemon(**settings) as service:
        lock = folders.drop / ".productiv-watcher.lock"
        inode = lock.stat().st_ino
        write(folders.drop / ".productiv-watcher", b"a producer's file")
        wait_for(lambda: waiting_for_marker(service) == [".productiv-watcher"], what="it waits")
        assert lock.stat().st_ino == inode
        assert status_of(service)["waiting_for_marker"] == 1
    assert sandbox.count("put") == 0
    assert logs_json.events("lock_restored") == []


def test_a_late_write_waits_out_an_api_outage_and_one_not_sent_at_a_stop_is_said(
    daemon, folders, sandbox, logs_json
):
    """The API is down when the late write has settled: the file waits (no `failed`, no
    attempt spent). The daemon then stops: a restart forgets the window, so Productiv keeps
    the first half for good, and that is said, naming the file and what to do."""
    with daemon() as service:
        path = folders.drop / "a.csv"
        with path.open("wb") as out:
            out.write(b"first half;")
            out.flush()
            done_soon(folders, "a.csv")
            sandbox.inject("urls", count=10**6, status=503)
            out.write(b"second half")
        wait_for(lambda: logs_json.events("late_write"), what="the late write")
        wait_for(lambda: sandbox.count("urls", 503) >= 3, what="the API asked again and again")
        assert logs_json.events("failed") == [] and len(service.late or ()) == 1
    assert sandbox.stored("a.csv") == b"first half;"
    [lost] = logs_json.events("late_write_abandoned")
    assert lost["level"] == "error" and lost["file"] == "a.csv"
    assert (lost["moved_to"], lost["bytes_uploaded"], lost["bytes_now"]) == ("done/a.csv", 11, 22)
    assert "drop the complete file again" in lost["reason"]


def test_a_late_written_file_made_unreadable_is_said_as_not_sent_again(sandbox, as_nobody):
    """The daemon as nobody; the producer keeps writing into the file in done/, then takes its
    read permission away: the file cannot be sent again. It stays in done/ (not failed/), and
    the line and the receipt say that Productiv holds the earlier version, and why."""
    with field(as_nobody) as f:
        f.start(sandbox)
        path = f.produce(f.folders.drop / "a.csv", b"")
        with path.open("ab") as out:
            out.write(b"first half;")
            out.flush()
            done_soon(f.folders, "a.csv")
            out.write(b"second half")
        (f.folders.done / "a.csv").chmod(0o000)
        wait_for(lambda: f.events("failed"), what="the verdict")
        f.stop()
        assert sandbox.stored("a.csv") == b"first half;"
        [line] = f.events("failed")
        assert line["late_write"] is True and "Permission denied" in line["reason"]
        assert "Productiv holds the earlier version" in line["reason"]
        assert (f.folders.done / "a.csv").exists() and not list(f.folders.failed.iterdir())
        receipt = json.loads((f.folders.root / "state" / NAME).read_text().splitlines()[-1])
        assert receipt["late_write"] is True and receipt["moved_to"] == "done/a.csv"
        assert receipt["reason"] == line["reason"]
