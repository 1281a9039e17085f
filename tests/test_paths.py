"""Paths (issue 11, items 2, 3, 9 and 11): the drop folder's type folders are never followed
out of it, a type folder's name is never a file, folders may not overlap under any name, and
the watch says when it cannot hear."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import Captured
from tests.helpers import Child, Folders, cli, daemon_env, done_soon, inotify_masks, wait_for, write
from watcher.disk.folders import Folders as Descriptors
from watcher.disk.overlap import Place, overlapping
from watcher.pipeline.mover import Mover

# -- item 2: a type folder that is a symlink ---------------------------------------------------


def asked(sandbox) -> set[str]:
    return {name for r in sandbox.requests for name in r.names}


def test_a_symlinked_type_folder_is_refused_once_and_never_followed(
    daemon, folders, sandbox, logs_json: Captured, tmp_path
):
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "private.csv", b"not for upload")
    os.symlink(elsewhere, folders.drop / "users")
    write(folders.drop / "marker.csv", b"x")
    with daemon() as service:
        done_soon(folders, "marker.csv")
        for _ in range(3):  # every scan refuses it; the line is said once
            service.watcher.scan()
        write(folders.drop / "marker2.csv", b"x")
        done_soon(folders, "marker2.csv")
    assert asked(sandbox) == {"marker.csv", "marker2.csv"}
    assert (elsewhere / "private.csv").read_bytes() == b"not for upload"
    assert not (folders.done / "users").exists()
    [skipped] = logs_json.events("skipped")
    assert skipped["file"] == "users" and "a symlink, not a folder" in skipped["reason"]


def swap_for_a_symlink(folders: Folders, tmp_path: Path) -> Path:
    """The real users/ moved out of the drop folder, a symlink to it left in its place: the
    same file, same inode, now reached only through the link."""
    moved = tmp_path / "elsewhere" / "users"
    moved.parent.mkdir(exist_ok=True)
    os.rename(folders.drop / "users", moved)
    os.symlink(moved, folders.drop / "users")
    return moved


def test_a_type_folder_swapped_for_a_symlink_before_the_put_is_not_followed(
    daemon, folders, sandbox, logs_json: Captured, tmp_path
):
    write(folders.drop / "users" / "a.csv", b"fine")
    sandbox.inject("urls", count=1, delay=1.0)  # the file settled; its URL is on its way
    with daemon() as service:
        wait_for(lambda: sandbox.arrived["urls"] == 1 and len(service.stabiliser) == 0)
        moved = swap_for_a_symlink(folders, tmp_path)
        wait_for(lambda: logs_json.events("vanished"), what="the file given up")
    assert sandbox.count("put") == 0
    assert (moved / "a.csv").read_bytes() == b"fine" and folders.files(folders.done) == []
    assert [e["file"] for e in logs_json.events("skipped")] == ["users"]


def test_a_type_folder_swapped_for_a_symlink_during_the_put_is_not_moved_from(
    daemon, folders, sandbox, logs_json: Captured, tmp_path
):
    write(folders.drop / "users" / "a.csv", b"fine")
    sandbox.inject("put", count=1, delay=1.0)
    with daemon() as service:
        wait_for(lambda: sandbox.arrived["put"] == 1 and service.uploader.sending == 1)
        moved = swap_for_a_symlink(folders, tmp_path)
        wait_for(lambda: logs_json.events("vanished"), what="the move given up")
    assert (moved / "a.csv").read_bytes() == b"fine"
    assert folders.files(folders.done) == [] and logs_json.events("uploaded") == []


# -- item 3: a file that takes a type folder's name --------------------------------------------


def test_a_file_named_like_a_type_folder_is_never_uploaded_and_said_soon(
    daemon, folders, sandbox, logs_json: Captured
):
    with daemon():  # the default 60-s rescan: the file's own event brings the line
        write(folders.drop / "users", b"meant for drop/users/")
        wait_for(lambda: logs_json.events("skipped"), 10, "the skipped line")
        write(folders.drop / "marker.csv", b"x")
        done_soon(folders, "marker.csv")
    assert asked(sandbox) == {"marker.csv"}
    assert (folders.drop / "users").read_bytes() == b"meant for drop/users/"
    [skipped] = logs_json.events("skipped")
    assert skipped["file"] == "users" and "rename it" in skipped["reason"]


def test_a_file_in_done_named_like_a_type_folder_is_never_made_over(tmp_path):
    """The old bug left done/users as a file; the move fails naming it, and nothing is lost."""
    write(tmp_path / "drop" / "users" / "a.csv", b"a")
    write(tmp_path / "done" / "users", b"an old upload")
    mover = Mover(tmp_path / "drop", tmp_path / "done", tmp_path / "failed", lambda: 0.0)
    try:
        with pytest.raises(NotADirectoryError, match="done/users is a file, not a folder"):
            mover.to_done(tmp_path / "drop" / "users" / "a.csv")
    finally:
        mover.close()
    assert (tmp_path / "done" / "users").read_bytes() == b"an old upload"
    assert (tmp_path / "drop" / "users" / "a.csv").read_bytes() == b"a"


# -- item 9: overlapping folders ---------------------------------------------------------------

A, B, C = (1, 10), (1, 20), (1, 30)  # (dev, inode) of /x, /x/drop, /x/done


@pytest.mark.parametrize(
    ("places", "expected"),
    [
        ({"drop": Place(Path("/x/drop"), (B, A), True), "done": Place(Path("/x/done"), (C, A), True)}, []),
        # one folder under two names (a bind mount): same (dev, inode)
        (
            {"drop": Place(Path("/x/drop"), (B, A), True), "done": Place(Path("/m/d"), (B, (2, 1)), True)},
            [("done", "drop", True)],
        ),
        # not created yet, but its path lies inside the drop folder
        (
            {"drop": Place(Path("/x/drop"), (B, A), True), "state": Place(Path("/x/drop/s"), (B, A), False)},
            [("state", "drop", False)],
        ),
        # the drop folder inside done/ (through a bind mount of done/)
        (
            {"drop": Place(Path("/m/drop"), (B, C, (2, 1)), True), "done": Place(Path("/x/done"), (C, A), True)},
            [("drop", "done", False)],
        ),
        ({"a": Place(Path("/x/done"), (C,), True), "b": Place(Path("/x/done2"), (B,), True)}, []),
    ],
)  # fmt: skip
def test_overlapping(places, expected):
    assert overlapping(places) == expected


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("PRODUCTIV_DONE_DIR", "{root}/sub/../drop", "is the same folder as drop_dir"),
        ("PRODUCTIV_STATE_DIR", "{root}/drop/state", "state_dir {root}/drop/state is inside"),
        ("PRODUCTIV_FAILED_DIR", "{root}/alias", "(= {root}/drop) is the same folder as"),
        ("PRODUCTIV_DONE_DIR", "{root}", "drop_dir {root}/drop is inside done_dir"),
    ],
)
def test_overlapping_folders_fail_check_and_refuse_to_start(
    sandbox, folders, setting, value, words
):
    (folders.root / "sub").mkdir()
    os.symlink(folders.drop, folders.root / "alias")
    env = daemon_env(sandbox, folders, **{setting: value.format(root=folders.root)})
    checked = cli("check", env=env)
    assert checked.returncode == 1 and "folders: FAIL " in checked.stdout
    assert words.format(root=folders.root) in checked.stdout
    started = cli("run", env=env)
    assert started.returncode == 78 and words.format(root=folders.root) in started.stderr
    assert not (folders.drop / "state").exists()  # refused before anything was created


# -- item 11: a watch that cannot hear ---------------------------------------------------------


def test_a_drop_dir_given_as_a_symlink_is_resolved_and_heard(sandbox, tmp_path, daemon_factory):
    real = Folders(tmp_path, tmp_path / "real-drop", tmp_path / "done", tmp_path / "failed")
    real.drop.mkdir()
    link = Folders(tmp_path, tmp_path / "drop-link", real.done, real.failed)
    os.symlink(real.drop, link.drop)
    daemon, logs = daemon_factory(link)  # rescans only every 60 s: events must do it
    with daemon:
        write(real.drop / "a.csv", b"x")
        done_soon(real, "a.csv", timeout=10)
    [resolved] = logs.events("drop_dir_resolved")
    assert resolved["resolved"] == str(real.drop)


def test_only_the_drop_folder_and_its_type_folders_are_watched(daemon, folders):
    for deeper in ("users/deeper/deepest", "misc", "contracts"):
        (folders.drop / deeper).mkdir(parents=True)
    with daemon():
        (folders.drop / "other").mkdir()  # made later: watched from its creation
        (folders.drop / "later").mkdir()
        inode = {name: (folders.drop / name).stat().st_ino for name in ("other", "later")}
        wait_for(lambda: inode["other"] in inotify_masks(), 5, "the watch on other/")
        watched = set(inotify_masks())
    tree = {p.stat().st_ino for p in [folders.drop, *folders.drop.rglob("*")]}
    expected = {folders.drop.stat().st_ino} | {
        (folders.drop / t).stat().st_ino for t in ("users", "contracts", "other")
    }
    assert watched & tree == expected


def test_an_inotify_queue_overflow_is_rescanned_at_once(daemon, folders, logs_json: Captured):
    """A real overflow of the kernel's queue, on this test's own inotify instance: its reader
    thread is held (watchdog's lock) while 20,000 events are queued, more than the kernel keeps
    (fs.inotify.max_queued_events, 16,384 by default), so a.csv's own events are lost."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 50_000:
        pytest.skip(f"max_queued_events is {limit}: too many events to overflow it quickly")
    with daemon() as service:  # the regular rescan is a minute away
        reader = service.watcher._observer._inotify_fd
        with reader._lock:
            noise = folders.drop / ".noise"  # an ignored name: created, closed, removed
            for _ in range(limit // 2 + 2100):
                os.close(os.open(noise, os.O_WRONLY | os.O_CREAT))
                noise.unlink()
            write(folders.drop / "a.csv", b"x")
        done_soon(folders, "a.csv", timeout=10)
    assert "overflowed" in logs_json.events("rescan")[0]["reason"]


def test_a_type_folder_that_cannot_be_watched_is_said_and_still_rescanned(sandbox, folders):
    """In a user namespace of its own the daemon gets a budget of one inotify watch (the drop
    folder's), whatever the host allows: users/, made later, cannot be watched."""
    budget = 'echo 1 > /proc/sys/user/max_inotify_watches && exec "$@"'
    prefix = ["unshare", "--user", "--map-root-user", "sh", "-c", budget, "sh"]
    if os.system("unshare --user --map-root-user true 2>/dev/null") != 0:
        pytest.skip("no user namespaces here")
    env = daemon_env(sandbox, folders, PRODUCTIV_RESCAN_SECONDS="1")
    child = Child(env, command=[*prefix, sys.executable, "-m", "watcher"])
    try:
        wait_for(lambda: "ready" in child.stderr, what="READY")
        write(folders.drop / "users" / "a.csv", b"x")
        wait_for(lambda: "watch_failed" in child.stderr, 10, "the watch_failed line")
        done_soon(folders, "users/a.csv", timeout=10)
    finally:
        child.close()
    line = next(line for line in child.lines if "watch_failed" in line)
    assert "users" in line and "max_user_watches" in line


def test_a_replaced_type_folder_is_reopened_and_its_old_descriptor_closed(tmp_path):
    """The descriptor cache follows a folder replaced by a new one (rm -r; mkdir) at once, keeps
    a descriptor open while a thread still uses it, and leaks none."""
    drop = tmp_path / "drop"
    write(drop / "users" / "first.csv", b"1")
    before = len(os.listdir("/proc/self/fd"))
    folders = Descriptors(drop)
    with folders.folder("users") as held:
        for n in range(20):
            shutil.rmtree(drop / "users")
            write(drop / "users" / f"{n}.csv", b"x")
            assert folders.lstat(drop / "users" / f"{n}.csv").st_size == 1
            os.close(folders.open(drop / "users" / f"{n}.csv", os.O_RDONLY))
        os.fstat(held)  # the first folder's descriptor, still open while it is held
    folders.close()
    assert len(os.listdir("/proc/self/fd")) == before  # the cache's own closed too
