"""A file's fate, decided by pure functions (tables) and carried out by the finisher on real
files: which gate backs off, when a folder refuses a move, what a failed move does next, and a
file replaced while it is being moved."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from tests.conftest import Captured
from tests.helpers import wait_for, write
from watcher.heartbeats import Counts, Heartbeat, status_line
from watcher.items import Item, Snapshot, Spot
from watcher.metrics import Metrics
from watcher.pipeline.fates import (
    FolderTrouble,
    MoveRetries,
    Next,
    Stuck,
    decide,
    fix_for_error,
    moved_intact,
)
from watcher.pipeline.finisher import Finisher
from watcher.pipeline.mover import Mover
from watcher.pipeline.receipts import Journal
from watcher.pipeline.workqueue import WorkQueue
from watcher.remote.breakers import Gates, gate_for
from watcher.remote.faults import Fault, Kind
from watcher.remote.transfer import Sent
from watcher.settings import Settings

ME, OTHER, GROUP, ELSE = 1000, 2000, 500, 600


def st(
    mode: int, uid: int = OTHER, gid: int = GROUP, ino: int = 1, size: int = 0
) -> os.stat_result:
    """A status as os.stat returns it: (mode, ino, dev, nlink, uid, gid, size, times...)."""
    return os.stat_result((mode, ino, 1, 1, uid, gid, size, 0, 7, 9))


ITEM = Item(Spot(Path("/d/a.csv"), "a.csv", "a.csv", None), Snapshot(1, 2, 3, 4, 5))


@pytest.mark.parametrize(
    ("kind", "attempts", "expired", "max_attempts", "expected"),
    [
        (Kind.SERVICE, 0, 0, 1, Next.BACK_OFF),  # never costs an attempt
        (Kind.SERVICE, 4, 0, 5, Next.BACK_OFF),
        (Kind.EXPIRED, 0, 0, 1, Next.FRESH_URL),
        (Kind.EXPIRED, 0, 1, 1, Next.FRESH_URL),
        (Kind.EXPIRED, 0, 2, 1, Next.CHECK_CLOCK),  # the third in a row: the clock
        (Kind.FILE, 0, 0, 5, Next.RETRY),
        (Kind.FILE, 3, 0, 5, Next.RETRY),
        (Kind.FILE, 4, 0, 5, Next.FAIL),  # the last attempt
        (Kind.FILE, 0, 0, 1, Next.FAIL),
        (Kind.FINAL, 0, 0, 5, Next.FAIL),
        (Kind.REFUSED, 0, 0, 5, Next.FAIL),
    ],
)
def test_a_files_next_step_after_a_fault(kind, attempts, expired, max_attempts, expected):
    item = Item(ITEM.spot, ITEM.snapshot, attempts=attempts, expired=expired)
    assert decide(item, kind, max_attempts).next is expected


@pytest.mark.parametrize(
    ("where", "gate"), [("put", "storage"), ("urls", "api"), ("token", "api"), ("", "api")]
)
def test_a_service_fault_belongs_to_the_thing_that_failed(where, gate):
    assert gate_for(where) == gate


def test_storage_backoff_grows_while_the_api_answers_and_only_a_good_put_ends_it():
    now = [0.0]
    gates = Gates(1.0, 100.0, clock=lambda: now[0], jitter=lambda: 1.0)
    put_503 = Fault(Kind.SERVICE, "storage answered HTTP 503", 503, where="put")
    waits = []
    for _ in range(4):
        waits.append(gates.trouble(put_503))
        gates.api.fine()  # the signed URLs keep coming: no help to the storage
        now[0] += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 8.0]
    assert gates.outage() is gates.storage and gates.api.failing_since is None
    assert gates.trouble(Fault(Kind.SERVICE, "HTTP 503", 503, where="urls")) == 1.0  # its own
    gates.storage.fine()
    now[0] += 1.0
    assert gates.trouble(put_503) == 1.0  # a new episode starts at the first step
    assert gates.outage() is gates.api  # failing the longest


def test_a_failed_route_waits_its_backoff_and_holds_new_outcomes_untried():
    retries: MoveRetries[str] = MoveRetries(lambda step: 10.0 * step)
    route = (Path("/drop/users"), True)
    assert retries.stuck(route, ["a"], "/drop/users", 1, now=0.0) == 10.0
    assert retries.holding(route) and not retries.holding((Path("/drop/users"), False))
    retries.hold(route, "b")
    assert retries.due(9.9) == {} and len(retries) == 2 and retries.next_due() == 10.0
    assert retries.due(10.0) == {route: Stuck(1, 10.0, "/drop/users", ["a", "b"])}
    assert not retries.holding(route) and retries.next_due() is None


def test_a_moved_file_is_checked_against_the_version_that_was_sent(tmp_path):
    sent = Snapshot.of(os.lstat(write(tmp_path / "a.csv", b"sent")))
    wait_for(  # a ctime the rename will change: the file system's clock has moved on
        lambda: os.lstat(write(tmp_path / "tick", b"")).st_ctime_ns > sent.ctime_ns, 5, "a tick"
    )
    (tmp_path / "a.csv").rename(tmp_path / "moved.csv")
    assert moved_intact(os.lstat(tmp_path / "moved.csv"), sent)  # the rename's new ctime is fine
    write(tmp_path / "other.csv", b"sent").replace(tmp_path / "moved.csv")
    assert not moved_intact(os.lstat(tmp_path / "moved.csv"), sent)  # another file, same bytes
    appended = Snapshot.of(os.lstat(tmp_path / "moved.csv"))
    with (tmp_path / "moved.csv").open("ab") as out:
        out.write(b"+")
    assert not moved_intact(os.lstat(tmp_path / "moved.csv"), appended)
    # Watched for late writes, the same file written to is intact: a late write, sent again
    assert moved_intact(os.lstat(tmp_path / "moved.csv"), appended, late_writes=True)
    write(tmp_path / "other.csv", b"sent+").replace(tmp_path / "moved.csv")
    assert not moved_intact(os.lstat(tmp_path / "moved.csv"), appended, late_writes=True)


@pytest.mark.parametrize(
    ("counts", "has", "has_not"),
    [
        (
            Counts(0, 0, 1, 0, folders=("/drop/users is not writable by productiv (...)",)),
            "files wait: /drop/users is not writable by productiv",
            "service unavailable",
        ),
        (
            Counts(2, 0, 0, 0, time.time(), "storage answered HTTP 503", "the storage"),
            "service unavailable since",
            "files wait",
        ),
        (Counts(0, 0, 0, 0, folders=("a", "b", "c")), "; and 1 more folder(s)", "; files wait: c"),
    ],
)
def test_the_status_line_tells_a_folder_problem_from_an_outage(counts, has, has_not):
    line = status_line(counts)
    assert has in line and has_not not in line


# -- the finisher, on real files -------------------------------------------------------------


class Bench:
    """A finisher over real folders, with a clock the test moves."""

    def __init__(self, root: Path, mover: Mover | None = None) -> None:
        self.drop, self.done, self.failed = root / "drop", root / "done", root / "failed"
        for folder in (self.drop, self.done, self.failed):
            folder.mkdir()
        self.now = 0.0
        self.handed_back: list[Spot] = []
        self.work = WorkQueue(lambda: self.now, lambda spots: None)
        settings = Settings(drop_dir=self.drop, app_id="a", client_id="c", client_secret="s")
        self.finisher = Finisher(
            mover or Mover(self.drop, self.done, self.failed, time.time),
            self.work,
            lambda step: 10.0 * 2 ** (step - 1),
            self.handed_back.extend,
            Journal(root / "state", 10**6, 1),
            Metrics(settings),
            monotonic=lambda: self.now,
        )
        self.beat = Heartbeat("finisher")

    def item(self, rel: str, data: bytes = b"data") -> Item:
        path = write(self.drop / rel, data)
        file_type = rel.split("/", maxsplit=1)[0] if "/" in rel else None
        item = Item(Spot(path, rel, path.name, file_type), Snapshot.of(os.lstat(path)))
        self.work.put_many([item])
        assert self.work.take_batch(10, timeout=0) == [item]
        return item

    def step(self) -> None:
        self.finisher.step(self.beat)


def sent() -> Sent:
    return Sent(status=200, seconds=0.1, etag="", sha256="0" * 64)


def test_a_move_that_fails_is_retried_as_a_move_with_a_growing_backoff(tmp_path, logs_json):
    bench = Bench(tmp_path)
    item = bench.item("users/a.csv")
    (bench.done / "users").write_bytes(b"")  # a file where done/users should be: even root fails
    bench.finisher.done(item, sent(), "/bucket/a.csv")
    bench.step()
    for wait in (10.0, 20.0, 40.0):
        bench.now += wait  # only when the wait is over is the move tried again
        bench.step()
    assert [e["attempt"] for e in logs_json.events("retrying")] == [1, 2, 3, 4]
    assert [e["seconds"] for e in logs_json.events("retrying")] == [10.0, 20.0, 40.0, 80.0]
    [problem] = logs_json.events("folder_not_writable")
    assert problem["folder"] == str(bench.done / "users") and "not a folder" in problem["reason"]
    assert bench.work.counts() == (0, 1)  # never put back in the queue for another upload
    assert len(bench.finisher.folders) == 1
    (bench.done / "users").unlink()
    bench.now += 80.0
    bench.step()
    assert (bench.done / "users" / "a.csv").read_bytes() == b"data"
    assert len(logs_json.events("uploaded")) == 1 and logs_json.events("folder_writable")
    assert not bench.finisher.folders and bench.work.counts() == (0, 0)


def test_a_refused_file_that_changed_since_is_not_moved_to_failed(tmp_path, logs_json):
    bench = Bench(tmp_path)
    item = bench.item("a.csv", b"too big")
    write(item.path, b"smaller now")  # the producer rewrote it after it was refused
    bench.finisher.fail(item, "too big", None)
    bench.step()
    assert not list(bench.failed.iterdir())
    assert item.path.read_bytes() == b"smaller now" and bench.handed_back == [item.spot]
    assert logs_json.events("changed") and not logs_json.events("failed")


class ReplacedDuringTheMove(Mover):
    """The producer's `mv new a.csv` lands between the finisher's lstat and its rename."""

    def to_done(self, path: Path) -> Path:
        write(path.with_name(".new"), b"the new version").replace(path)
        return super().to_done(path)


def test_a_file_replaced_between_the_check_and_the_rename_goes_back_to_be_sent(
    tmp_path, logs_json: Captured
):
    bench = Bench(tmp_path)
    bench.finisher._mover = ReplacedDuringTheMove(bench.drop, bench.done, bench.failed, time.time)
    item = bench.item("a.csv", b"the sent version")
    bench.finisher.done(item, sent(), "/bucket/a.csv")
    bench.step()
    assert item.path.read_bytes() == b"the new version"  # back in drop/ under its name
    assert not list(bench.done.iterdir()) and bench.handed_back == [item.spot]
    assert not logs_json.events("uploaded")
    assert (
        logs_json.events("changed")[0]["reason"] == "the file was replaced while it was being moved"
    )


class WrittenDuringTheMove(Mover):
    """The producer writes on through its open descriptor between the finisher's lstat and its
    rename: the same file, grown (what a producer pausing past settle_seconds does)."""

    def to_done(self, path: Path) -> Path:
        with path.open("ab") as out:
            out.write(b" and more")
        return super().to_done(path)


@pytest.mark.parametrize("late_writes", [True, False])
def test_a_file_written_to_between_the_check_and_the_rename_is_a_late_write_when_watched(
    tmp_path, logs_json: Captured, late_writes: bool
):
    """Watched for late writes, it stays in done/ and is handed to that watch, whose baseline is
    the version uploaded: it is sent again from there as a late write. Unwatched, nothing
    would ever send the rest, so it goes back to drop/ like a replaced file."""
    bench = Bench(tmp_path)
    bench.finisher._mover = WrittenDuringTheMove(bench.drop, bench.done, bench.failed, time.time)
    bench.finisher._late_writes = late_writes
    placed: list[tuple[Item, Path, bool]] = []
    bench.finisher._placed = placed.extend
    item = bench.item("a.csv", b"the sent version")
    bench.finisher.done(item, sent(), "/bucket/a.csv")
    bench.step()
    if late_writes:
        assert (bench.done / "a.csv").read_bytes() == b"the sent version and more"
        assert placed == [(item, bench.done / "a.csv", True)] and not bench.handed_back
        assert logs_json.events("uploaded") and not logs_json.events("changed")
    else:
        assert item.path.read_bytes() == b"the sent version and more"  # back in drop/
        assert not list(bench.done.iterdir()) and bench.handed_back == [item.spot]
        assert not logs_json.events("uploaded")


def test_a_folder_its_bits_let_in_but_that_cannot_be_listed_gets_no_chmod_fix(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir(mode=0o770)  # this user's (or root's): the bits allow listing it
    trouble = FolderTrouble()
    trouble.listing(folder, PermissionError(errno.EACCES, "Permission denied"))
    [text] = trouble.texts()  # an ACL or NFS's root_squash refused: not the sticky bit
    assert "cannot list it" in text and "chmod" not in text and "getfacl" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to other users")
def test_one_batch_judges_a_folder_once_but_a_sticky_folder_for_each_file(tmp_path):
    """The dispatcher shares one look per folder across a batch (`seen`): a plain folder's
    verdict holds for all its files, a sticky one's depends on each file's owner."""
    from watcher.disk.access import STICKY, User

    drop = tmp_path / "drop"
    (drop / "users").mkdir(parents=True)
    mover = Mover(drop, tmp_path / "done", tmp_path / "failed", time.time)
    mover.user = User("svc", ME, frozenset({ME}), "a test's service user")
    os.chown(tmp_path, ME, ME)  # done/ and failed/ are made here: the service's own
    for folder, mode in ((drop, 0o1777), (drop / "users", 0o700)):
        os.chmod(folder, mode)
    mine, theirs = write(drop / "mine.csv"), write(drop / "theirs.csv")
    os.chown(mine, ME, ME)
    os.chown(theirs, OTHER, OTHER)
    seen: dict = {}
    assert mover.blocker(mine, seen) is None
    problem = mover.blocker(theirs, seen)
    assert problem is not None and STICKY in problem.reason
    assert mover.blocker(mine, seen) is None  # and again: sticky verdicts are never shared
    first = mover.blocker(drop / "users" / "a.csv", seen)  # root's 0700 folder: refused
    assert first is not None and mover.blocker(drop / "users" / "b.csv", seen) == first


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (errno.ENOSPC, "free space"),
        (errno.EROFS, "read-write"),
        (errno.EACCES, "ACLs"),
        (errno.EXDEV, "drop folder's mount"),  # it said "see the reason": a cross-device link
        (None, "see the reason"),
    ],
)
def test_a_move_refused_for_a_reason_the_mode_does_not_show_gets_its_own_fix(number, words):
    assert words in fix_for_error(number)
