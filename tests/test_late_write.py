"""Late writes: a file written to after its upload, in done/, is uploaded again, whole.

Real producers (a file kept open across its upload and move), the daemon in-process and as a
subprocess, the sandbox on loopback; the watch's own step driven by hand with a fabricated clock
for the bounds (uploads again per file, names kept, expiry).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tests.helpers import (
    QUICK_WATCHER,
    Child,
    Folders,
    cli,
    daemon_env,
    done_soon,
    inotify_masks,
    wait_for,
    write,
)
from watcher.heartbeats import Heartbeat
from watcher.items import Item, Snapshot, Spot
from watcher.pipeline import donewatch, latewrite
from watcher.pipeline.latelook import Look, baseline, compare
from watcher.pipeline.latewrite import MAX_AGAIN, LateWrites
from watcher.pipeline.receipts import NAME
from watcher.pipeline.workqueue import WorkQueue

UP = Snapshot(dev=1, ino=7, size=100, mtime_ns=1000, ctime_ns=2000)
MOVED = Snapshot(dev=1, ino=7, size=100, mtime_ns=1000, ctime_ns=3000)  # the rename's ctime


@pytest.mark.parametrize(
    ("moved", "expected"),
    [
        (MOVED, MOVED),  # the rename changed only the ctime: compare with the version in done/
        (Snapshot(1, 7, 150, 1000, 3000), UP),  # grew before the first look: differs at once
        (Snapshot(1, 7, 100, 1500, 3000), UP),  # rewritten in place before the first look
        (Snapshot(1, 8, 100, 1000, 3000), UP),  # another file under its name
    ],
)
def test_the_baseline_is_the_moved_version_only_when_its_content_is_the_uploaded_one(
    moved, expected
):
    assert baseline(UP, moved) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (MOVED, Look.SAME),
        (Snapshot(1, 7, 180, 1900, 3900), Look.CHANGED),  # appended through an open descriptor
        (Snapshot(1, 7, 100, 1000, 3900), Look.CHANGED),  # ctime only: touched, chmod-ed
        (Snapshot(1, 7, 100, 1900, 3000), Look.CHANGED),  # mtime only
        (None, Look.GONE),  # removed or moved out of done/
        (Snapshot(1, 9, 100, 1000, 3000), Look.GONE),  # replaced by another file
        (Snapshot(2, 7, 100, 1000, 3000), Look.GONE),
    ],
)
def test_a_recent_file_is_the_same_changed_or_gone(now, expected):
    assert compare(MOVED, now) is expected


def receipts(folders: Folders) -> list[dict]:
    path = folders.root / "state" / NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def slow_producer(folders: Folders, rel: str, first: bytes, rest: bytes) -> None:
    """Writes `first`, pauses (far longer than settle_seconds: until that half is uploaded and
    moved into done/), then writes `rest` through the same descriptor and closes."""
    path = folders.drop / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        out.write(first)
        out.flush()
        done_soon(folders, rel)
        out.write(rest)


def test_a_producer_that_pauses_mid_file_gets_the_whole_file_uploaded_again(
    daemon, folders, sandbox, logs_json
):
    first, rest = os.urandom(50_000), os.urandom(70_000)
    with daemon(settle_seconds=0.3):
        slow_producer(folders, "users/export.csv", first, rest)
        wait_for(lambda: len(receipts(folders)) == 2, what="the second receipt")
    assert sandbox.stored("export.csv", "users") == first + rest  # byte-identical
    assert (folders.done / "users" / "export.csv").read_bytes() == first + rest
    assert sandbox.count("put") == 2
    [late] = logs_json.events("late_write")
    assert late["level"] == "warning"
    assert (late["file"], late["bytes_uploaded"]) == ("users/export.csv", len(first))
    # the size when the change was seen: the rest may still be arriving, page by page
    assert len(first) < late["bytes_now"] <= len(first) + len(rest)
    one, two = receipts(folders)
    assert (one["bytes"], two["bytes"]) == (len(first), len(first) + len(rest))
    assert "late_write" not in one and two["late_write"] is True
    assert one["object"] == two["object"]  # the same object, overwritten whole
    assert two["file"] == "users/export.csv" and two["moved_to"] == "done/users/export.csv"
    uploaded = logs_json.events("uploaded")
    assert [u.get("late_write") for u in uploaded] == [None, True]


def test_a_late_write_to_a_renamed_file_in_done_goes_under_its_first_name_and_status_shows_both(
    sandbox, folders
):
    """done/ already holds a.csv: the new a.csv is moved to a.<stamp>.csv, and sent again under
    a.csv, its object's name. As a subprocess; `status FILE` then lists both uploads."""
    write(folders.done / "a.csv", b"an older a.csv")
    env = daemon_env(sandbox, folders)
    child = Child(env)
    try:
        wait_for(lambda: " ready " in child.stderr, what="READY")
        path = folders.drop / "a.csv"
        with path.open("wb") as out:
            out.write(b"first half;")
            out.flush()
            wait_for(lambda: not path.exists(), what="the first half uploaded and moved")
            out.write(b"second half")
        wait_for(lambda: len(receipts(folders)) == 2, what="the second receipt")
    finally:
        child.close()
    assert sandbox.stored("a.csv") == b"first half;second half"
    one, two = receipts(folders)
    assert one["moved_to"] == two["moved_to"] != "done/a.csv"
    status = cli("status", "a.csv", env=env).stdout.splitlines()
    assert len(status) == 2, status
    assert f"uploaded a.csv again from {two['moved_to']} (late write)" in status[0]
    assert f"uploaded a.csv -> {one['moved_to']}" in status[1]


def test_late_write_seconds_0_turns_the_watch_off(daemon, folders, sandbox, logs_json):
    with daemon(late_write_seconds=0) as service:
        assert service.late is None
        assert "late_writes" not in {t.name for t in threading.enumerate()}
        with (folders.drop / "half.csv").open("wb") as out:
            out.write(b"first half;")
            out.flush()
            done_soon(folders, "half.csv")
            # once the move is over (receipted): a write during the move is no late write, and
            # the finisher sends that version again from drop/, watch or no watch
            wait_for(lambda: receipts(folders), what="the receipt")
            out.write(b"second half")
        write(folders.drop / "after.csv", b"x")  # a file after it: the daemon has moved on
        done_soon(folders, "after.csv")
    assert sandbox.stored("half.csv") == b"first half;"  # what the setting's 0 means
    assert sandbox.count("put") == 2
    assert logs_json.events("late_write") == []


def test_the_daemons_own_moves_and_renames_and_a_removal_from_done_are_no_late_write(
    daemon, folders, sandbox, logs_json
):
    write(folders.done / "users" / "f00.csv", b"taken: the new f00.csv gets a stamped name")
    for n in range(30):
        write(folders.drop / "users" / f"f{n:02}.csv", f"file {n}".encode())
    with daemon(rescan_seconds=0.3) as service:  # the safety-net stat of done/ every 0.3 s
        wait_for(lambda: len(receipts(folders)) == 30, what="30 receipts")
        (folders.done / "users" / "f05.csv").unlink()  # removed in the window: forgotten
        os.rename(folders.done / "users" / "f06.csv", folders.root / "f06.csv")  # moved out
        assert service.late is not None
        wait_for(lambda: len(service.late) == 28, what="the removed and moved out forgotten")
    assert sandbox.count("put") == 30
    assert logs_json.events("late_write") == []


# -- the watch's own bounds, its step driven by hand ----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def watch(tmp_path: Path):
    done = tmp_path / "done"
    done.mkdir()
    clock = Clock()
    work = WorkQueue(clock, lambda spots: None)
    # a real second, not the 30-s idle wake: a turn with no event waits this long for one
    late = LateWrites(done, 600.0, 1.0, 60.0, work, clock, idle_wake_seconds=1.0)
    yield late, work, clock, done
    late.close()


def moved(late: LateWrites, done: Path, name: str, data: bytes) -> tuple[Item, Path]:
    """As the finisher hands over a file it moved into done/ after its upload."""
    final = write(done / name, data)
    st = os.lstat(final)
    item = Item(Spot(Path("/drop") / name, name, name, None), Snapshot.of(st))
    late.placed([(item, final, True)])
    return item, final


def turn(late: LateWrites, clock: Clock, seconds: float = 0.0) -> None:
    clock.now += seconds
    late.step(threading.Event(), Heartbeat("late_writes", clock))


def test_a_file_that_keeps_changing_is_sent_again_at_most_max_again_times(watch, logs_json):
    late, work, clock, done = watch
    _, final = moved(late, done, "grows.csv", b"0")
    turn(late, clock)
    for n in range(1, MAX_AGAIN + 2):
        with final.open("ab") as out:
            out.write(b"+")  # a close-write event in done/
        turn(late, clock)
        turn(late, clock, 1.5)  # settled
        taken = work.take_batch(10, timeout=0)
        if n > MAX_AGAIN:
            assert taken == []
            break
        [item] = taken
        assert item.late and item.spot.name == "grows.csv" and item.snapshot.size == 1 + n
        work.release(item.path)
        late.placed([(item, final, True)])  # as the finisher does after the upload again
        turn(late, clock)
    assert len(logs_json.events("late_write")) == MAX_AGAIN
    [given_up] = logs_json.events("late_write_given_up")
    assert given_up["level"] == "error" and given_up["file"] == "grows.csv"
    assert len(late) == 0


def test_a_file_still_being_written_is_sent_again_only_once_it_settles(watch, logs_json):
    late, work, clock, done = watch
    _, final = moved(late, done, "slow.csv", b"0")
    turn(late, clock)
    for _ in range(5):  # a write every 0.5 s, settle_seconds 1
        with final.open("ab") as out:
            out.write(b"+")
        turn(late, clock, 0.5)
        assert work.take_batch(10, timeout=0) == []
    turn(late, clock, 1.0)
    [item] = work.take_batch(10, timeout=0)
    assert item.snapshot.size == 6
    assert len(logs_json.events("late_write")) == 1


def test_the_window_expires_and_holds_at_most_max_recent_names(watch, monkeypatch, logs_json):
    late, _, clock, done = watch
    monkeypatch.setattr(latewrite, "MAX_RECENT", 3)
    for n in range(5):
        moved(late, done, f"f{n}.csv", b"x")
    turn(late, clock)
    assert len(late) == 3
    assert len(logs_json.events("late_write_window_full")) == 1
    with (done / "f0.csv").open("ab") as out:  # the oldest left the watch early
        out.write(b"late")
    turn(late, clock, 2.0)
    assert logs_json.events("late_write") == []
    turn(late, clock, 600.0)  # the window is over
    assert len(late) == 0


def test_a_change_missed_by_inotify_is_found_by_the_periodic_stat(watch, logs_json):
    """As on a network mount, where other clients' writes send no event: the change is made
    with the watch not yet reading, then only the sweep (every 60 s here) can see it."""
    late, _, clock, done = watch
    _, final = moved(late, done, "nfs.csv", b"0")
    turn(late, clock)
    late._events.close()  # deaf from now on: no events, only the sweep
    late._events = type(late._events)()
    with final.open("ab") as out:
        out.write(b"+")
    turn(late, clock, 30.0)
    assert logs_json.events("late_write") == []
    turn(late, clock, 31.0)
    assert len(logs_json.events("late_write")) == 1


def test_a_late_write_to_a_file_in_a_type_folder_keeps_its_type(daemon, folders, sandbox):
    with daemon():
        slow_producer(folders, "contracts/deal.pdf", b"%PDF-1 first", b" and the rest")
        wait_for(lambda: len(receipts(folders)) == 2, what="the second receipt")
    assert sandbox.stored("deal.pdf", "contracts") == b"%PDF-1 first and the rest"
    late_urls = [r for r in sandbox.requests if r.endpoint == "urls"]
    assert [r.names for r in late_urls] == [["deal.pdf"], ["deal.pdf"]]


def test_a_write_between_the_move_and_the_watch_is_seen_at_once(watch, logs_json):
    """The producer wrote on before the late-write thread took the file in (no event can tell
    of it then): the first look finds it, not the sweep a rescan period later."""
    late, work, clock, done = watch
    _, final = moved(late, done, "quick.csv", b"first")
    with final.open("ab") as out:
        out.write(b" and more")
    turn(late, clock)
    [late_write] = logs_json.events("late_write")
    assert (late_write["bytes_uploaded"], late_write["bytes_now"]) == (5, 14)
    turn(late, clock, 1.5)
    [item] = work.take_batch(10, timeout=0)
    assert item.snapshot.size == 14


def test_done_is_asked_for_writes_and_removals_only_and_its_watch_ends_with_the_watch(watch):
    """Not IN_MOVED_TO nor IN_CREATE: the daemon's own moves into done/ cost no event. The watch
    is watchdog's inotify reader; closing it removes the watch and ends its thread."""
    late, _, clock, done = watch
    moved(late, done, "a.csv", b"x")
    turn(late, clock)
    wanted = 0x002 | 0x004 | 0x008 | 0x040 | 0x200  # MODIFY ATTRIB CLOSE_WRITE MOVED_FROM DELETE
    assert inotify_masks()[done.stat().st_ino] & 0xFFFF == wanted
    assert donewatch.THREAD in {t.name for t in threading.enumerate()}
    late.close()
    assert done.stat().st_ino not in inotify_masks()
    assert donewatch.THREAD not in {t.name for t in threading.enumerate()}


def test_done_that_cannot_be_watched_names_the_limit_and_the_stat_finds_late_writes(
    sandbox, folders
):
    """In a user namespace of its own the daemon gets one inotify watch (the drop folder's):
    done/ cannot be watched, which is said naming the setting, and the periodic stat (every
    rescan_seconds) is then the whole watch."""
    budget = 'echo 1 > /proc/sys/user/max_inotify_watches && exec "$@"'
    prefix = ["unshare", "--user", "--map-root-user", "sh", "-c", budget, "sh"]
    if os.system("unshare --user --map-root-user true 2>/dev/null") != 0:
        pytest.skip("no user namespaces here")
    env = daemon_env(sandbox, folders, PRODUCTIV_RESCAN_SECONDS="1")
    child = Child(env, command=[*prefix, *QUICK_WATCHER])
    try:
        wait_for(lambda: " ready " in child.stderr, what="READY")
        slow_producer(folders, "a.csv", b"first half;", b"second half")
        wait_for(lambda: len(receipts(folders)) == 2, what="the second receipt")
    finally:
        child.close()
    assert sandbox.stored("a.csv") == b"first half;second half"
    line = next(line for line in child.lines if "watch_failed" in line)
    assert "folder=done " in line and "max_user_watches" in line, line


def test_a_file_written_to_before_a_stop_s_last_move_is_said_as_not_sent_again(tmp_path, logs_json):
    """The finisher's last moves, during a stop, come after the late-write thread has ended: a
    file already written to since its upload is still said, never kept without a word."""
    done = tmp_path / "done"
    done.mkdir()
    clock = Clock()
    late = LateWrites(done, 600.0, 1.0, 60.0, WorkQueue(clock, lambda spots: None), clock)
    _, final = moved(late, done, "grown.csv", b"first half;")
    with final.open("ab") as out:
        out.write(b"second half")
    moved(late, done, "same.csv", b"as uploaded")
    late.close()
    [lost] = logs_json.events("late_write_abandoned")
    assert (lost["file"], lost["bytes_uploaded"], lost["bytes_now"]) == ("grown.csv", 11, 22)
