"""Ready markers: with `ready_marker`, a file goes only once `NAME<suffix>` exists beside it.

Real files and producers, the daemon in-process and as a subprocess across a restart, inotify and
the polling observer, the sandbox on loopback; the rule's decisions from tables.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import make_settings
from tests.helpers import (
    Child,
    cli,
    daemon_env,
    done_soon,
    item_for,
    requested,
    status_of,
    wait_for,
    waiting_for_marker,
    write,
)
from watcher.disk.folders import Folders
from watcher.heartbeats import Counts, status_line
from watcher.pipeline.markers import (
    ORPHAN_REASON,
    counts_as_marker,
    from_settings,
    marked_name,
    orphan_due,
)
from watcher.pipeline.receipts import NAME
from watcher.pipeline.stability import Candidate, Stabiliser
from watcher.pipeline.workqueue import WorkQueue


@pytest.mark.parametrize(
    ("name", "suffix", "expected"),
    [
        ("a.csv.done", ".done", "a.csv"),
        ("a.csv", ".done", None),  # a file, not a marker
        (".done", ".done", None),  # nothing before the suffix
        ("a.csv.done.done", ".done", "a.csv.done"),  # a marker's marker: stands for a marker
        ("report.ok", ".ok", "report"),
        ("report_READY", "_READY", "report"),
        ("a.csv.DONE", ".done", None),  # case-sensitive, as names are
        ("a.csv.done", "", None),  # markers off
    ],
)
def test_which_names_are_markers_and_for_which_file(name, suffix, expected):
    assert marked_name(name, suffix) == expected


@pytest.mark.parametrize(
    ("since", "now", "rescan", "due"),
    [
        (0.0, 599.0, 60.0, False),
        (0.0, 600.0, 60.0, True),  # rescan_seconds x 10
        (100.0, 101.9, 0.2, False),
        (100.0, 102.0, 0.2, True),
    ],
)
def test_a_lone_marker_is_said_after_ten_rescan_periods(since, now, rescan, due):
    assert orphan_due(since, now, rescan) is due


def test_a_marker_suffix_that_ignore_patterns_hide_is_refused(sandbox, folders):
    with pytest.raises(ValidationError, match=r"ready_marker \.part: names ending in it match"):
        make_settings(sandbox, folders, ready_marker=".part")
    with pytest.raises(ValidationError, match="ready_marker"):
        make_settings(sandbox, folders, ready_marker="x/.done")
    assert make_settings(sandbox, folders, ready_marker=".done").ready_marker == ".done"


def test_the_status_line_counts_the_files_waiting_for_their_marker():
    line = status_line(Counts(waiting=0, uploading=0, uploaded=3, failed=0, unmarked=2))
    assert line.endswith(", 2 waiting for their ready marker")


def test_with_a_marker_a_producer_that_pauses_mid_file_is_uploaded_once_whole(
    daemon, folders, sandbox, logs_json
):
    first, rest = os.urandom(40_000), os.urandom(60_000)
    metrics = folders.root / "metrics.prom"
    with daemon(ready_marker=".done", status_seconds=0.1, metrics_textfile=metrics) as service:
        path = folders.drop / "export.csv"
        with path.open("wb") as out:
            out.write(first)
            out.flush()
            # the pause: far past settle_seconds, until status shows it waiting for its marker
            wait_for(
                lambda: waiting_for_marker(service) == ["export.csv"], what="waiting in status"
            )
            # the metrics file is written just after the status file, on the same turn
            wait_for(lambda: "productiv_watcher_waiting_for_marker 1.0" in metrics.read_text())
            out.write(rest)
        write(folders.drop / "export.csv.done", b"")
        done_soon(folders, "export.csv")
        wait_for(lambda: not (folders.drop / "export.csv.done").exists(), what="marker removed")
        wait_for(lambda: status_of(service).get("waiting_for_marker") == 0, what="none waiting")
    assert sandbox.stored("export.csv") == first + rest
    assert sandbox.count("put") == 1
    assert requested(sandbox) == {"export.csv"}  # the marker is never uploaded
    assert logs_json.events("late_write") == []
    assert folders.files(folders.drop) == []


def test_markers_in_type_folders_and_files_waiting_at_start(daemon, folders, sandbox):
    write(folders.drop / "users" / "people.csv", b"people")
    write(folders.drop / "users" / "people.csv.ok", b"")
    write(folders.drop / "contracts" / "deal.pdf", b"%PDF")  # its marker comes later
    with daemon(ready_marker=".ok", status_seconds=0.1) as service:
        done_soon(folders, "users/people.csv")
        wait_for(
            lambda: waiting_for_marker(service) == ["contracts/deal.pdf"], what="deal.pdf waits"
        )
        assert (folders.drop / "contracts" / "deal.pdf").exists()
        write(folders.drop / "contracts" / "deal.pdf.ok", b"")
        done_soon(folders, "contracts/deal.pdf")
        wait_for(lambda: folders.files(folders.drop) == [], what="both markers removed")
    assert sandbox.stored("people.csv", "users") == b"people"
    assert sandbox.stored("deal.pdf", "contracts") == b"%PDF"
    assert requested(sandbox) == {"people.csv", "deal.pdf"}


def test_a_marker_that_arrives_before_its_file_waits_for_it(daemon, folders, sandbox, logs_json):
    with daemon(ready_marker=".done", rescan_seconds=0.2):
        write(folders.drop / "early.csv.done", b"")
        time.sleep(0.5)  # the marker alone for a while (a lone marker is said after 2 s here)
        with (folders.drop / "early.csv").open("wb") as out:
            for n in range(5):  # written slowly, each write within settle_seconds
                out.write(f"line {n}\n".encode())
                out.flush()
                time.sleep(0.1)
        done_soon(folders, "early.csv")
        wait_for(lambda: not (folders.drop / "early.csv.done").exists(), what="marker removed")
    assert sandbox.stored("early.csv") == b"".join(f"line {n}\n".encode() for n in range(5))
    assert sandbox.count("put") == 1
    assert logs_json.events("skipped") == []


def test_a_marker_without_its_file_is_said_once_and_never_uploaded(
    daemon, folders, sandbox, logs_json
):
    write(folders.drop / "users" / "ghost.csv.done", b"")
    with daemon(ready_marker=".done", rescan_seconds=0.2):  # said after 2 s
        wait_for(lambda: logs_json.events("skipped"), what="the lone marker said")
        write(folders.drop / "other.csv", b"x")
        write(folders.drop / "other.csv.done", b"")
        done_soon(folders, "other.csv")
        time.sleep(1.0)  # five more rescans: still said once
    [skipped] = logs_json.events("skipped")
    assert skipped["file"] == "users/ghost.csv.done" and skipped["reason"] == ORPHAN_REASON
    assert (folders.drop / "users" / "ghost.csv.done").exists()  # the producer's, left alone
    assert requested(sandbox) == {"other.csv"}


def test_the_polling_observer_sees_a_marker_for_a_held_file(daemon, folders, sandbox):
    with daemon(
        ready_marker=".ready", polling=True, poll_interval_seconds=0.2, status_seconds=0.1
    ) as service:
        write(folders.drop / "nfs.csv", b"from a network mount")
        wait_for(lambda: waiting_for_marker(service) == ["nfs.csv"], what="nfs.csv waits")
        write(folders.drop / "nfs.csv.ready", b"")
        done_soon(folders, "nfs.csv")
    assert sandbox.stored("nfs.csv") == b"from a network mount"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.long
def test_a_file_without_its_marker_waits_across_a_restart(sandbox, folders):
    """As a subprocess: `status` shows the file waiting, with its age; a held file costs no
    CPU (no loop of looks); a restart finds it waiting again; the marker then lets it go."""
    env = daemon_env(
        sandbox,
        folders,
        PRODUCTIV_READY_MARKER=".done",
        PRODUCTIV_STATUS_SECONDS="0.2",
        PRODUCTIV_RESCAN_SECONDS="0.5",
    )
    write(folders.drop / "users" / "held.csv", b"complete, but not said so")
    for run in (1, 2):
        child = Child(env)
        try:
            # each `status` is a new Python process, and the daemon starts anew in each run:
            # seconds each on a loaded machine (a 15-s deadline was missed once in make test)
            wait_for(
                lambda: "waiting for their ready marker" in cli("status", env=env).stdout,
                timeout=45,
            )
            shown = cli("status", env=env).stdout
            assert "1 waiting for their ready marker (.done):" in shown
            assert "users/held.csv: waiting 0m" in shown
            doc = json.loads(cli("status", "--json", env=env).stdout)["status"]
            assert doc["waiting"] == 0  # not settling, not queued: its producer's to finish
            if run == 1:
                before = cpu_seconds(child.proc.pid)
                time.sleep(2.0)  # four rescans of a held file
                used = cpu_seconds(child.proc.pid) - before
                assert used < 0.5, f"{used:.2f} CPU-s for a held file over 2 s"
                child.send_signal(signal.SIGTERM)
                assert child.wait(15) == 0
                continue
            assert sandbox.count("put") == 0
            write(folders.drop / "users" / "held.csv.done", b"")
            done_soon(folders, "users/held.csv", timeout=45)
            wait_for(
                lambda: folders.files(folders.drop) == [], timeout=45, what="the marker removed"
            )
            child.send_signal(signal.SIGTERM)
            assert child.wait(15) == 0
        finally:
            child.close()
    receipts = (folders.root / "state" / NAME).read_text().splitlines()
    assert [json.loads(r)["file"] for r in receipts] == ["users/held.csv"]


def test_a_marker_is_removed_also_after_a_move_to_failed(daemon, folders, sandbox):
    sandbox.inject("put", count=1, status=403)
    with daemon(ready_marker=".done", max_attempts=1):
        write(folders.drop / "refused.csv", b"x")
        write(folders.drop / "refused.csv.done", b"")
        wait_for(lambda: (folders.failed / "refused.csv").exists(), what="moved to failed/")
        wait_for(lambda: folders.files(folders.drop) == [], what="the marker removed")
    assert requested(sandbox) == {"refused.csv"}  # the marker itself never goes
    assert folders.files(folders.done) == []


@pytest.mark.parametrize(
    ("name", "mode", "counts"),
    [
        ("a.csv.done", stat.S_IFREG | 0o644, True),
        ("a.csv.done", stat.S_IFLNK | 0o777, True),  # removed, never followed
        ("a.csv.done", stat.S_IFIFO | 0o644, True),  # never opened
        ("a.csv.done", stat.S_IFDIR | 0o755, False),  # could never be removed
        (".productiv-watcher.lock", stat.S_IFREG | 0o600, False),  # the drop folder's lock
        (".productiv-watcher-canary", stat.S_IFREG | 0o600, False),
    ],
)
def test_what_counts_as_a_marker(name, mode, counts):
    assert counts_as_marker(name, mode) is counts


def test_a_reload_with_a_shorter_rescan_looks_at_held_files_now(sandbox, folders):
    """Not after the old period has run out (an hour, say): the new one starts at the reload."""
    settings = make_settings(sandbox, folders, ready_marker=".done", rescan_seconds=3600)
    markers = from_settings(settings, Folders(folders.drop))
    assert markers is not None
    path = write(folders.drop / "held.csv", b"x")
    item = item_for(path)
    markers.hold(Candidate(item.spot, item.snapshot, 100.0), now=100.0)
    assert markers.next_look(100.0) == 3600
    markers.reconfigure(settings.model_copy(update={"rescan_seconds": 5.0}))
    assert markers.next_look(100.0) == 0


def test_a_held_file_looked_at_again_is_counted_as_waiting_for_its_marker_throughout(
    sandbox, folders
):
    """Every rescan looks at a held file again. It was let go first and held anew after its
    look: a status written meanwhile counted it as settling, not as waiting for its marker."""
    settings = make_settings(sandbox, folders, ready_marker=".done", rescan_seconds=1.0)
    markers = from_settings(settings, Folders(folders.drop))
    counted = []

    def lstat(path: Path) -> os.stat_result:  # the status's view, in the middle of each look
        counted.append((len(stabiliser), len(markers or ())))
        return os.lstat(path)

    work = WorkQueue(lambda: 0.0, lambda spots: None)
    stabiliser = Stabiliser(0.3, work, lambda: 0.0, lstat=lstat, markers=markers)
    item = item_for(write(folders.drop / "held.csv", b"x"))
    stabiliser.notice([item.spot])
    for now in (0.0, 0.5, 1.5, 2.5, 3.5, 4.5):  # noticed, stable and held, then rescans
        stabiliser.step(now)
    assert counted[:2] == [(1, 0), (1, 0)]  # settling, then held by the second look
    assert len(counted) >= 4 and set(counted[2:]) == {(0, 1)}  # the rescans' looks: held
    assert (len(stabiliser), len(markers or ())) == (0, 1) and work.counts()[0] == 0
    write(folders.drop / "held.csv.done", b"")
    stabiliser.notice([item_for(folders.drop / "held.csv.done").spot])
    stabiliser.step(5.0)
    assert len(markers or ()) == 0 and work.counts()[0] == 1  # the marker let it go
