"""The pure decisions, tested directly from tables (no threads, no network, no sleeping)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.heartbeats import IDLE_WAKE_SECONDS
from watcher.items import Item, Snapshot, Spot
from watcher.logs import Redactor
from watcher.pipeline.mover import NAME_MAX_BYTES, Mover, candidate_names
from watcher.pipeline.stability import Candidate, Stabiliser, is_stable, observe
from watcher.pipeline.uploader import refusal, url_is_stale
from watcher.pipeline.watching import is_ignored, locate
from watcher.pipeline.workqueue import WorkQueue
from watcher.remote.api import SignedUrl, token_needs_refresh, url_expiry, url_problem
from watcher.remote.faults import (
    Kind,
    backoff_seconds,
    classify_api_status,
    classify_put,
    retry_after_seconds,
)
from watcher.settings import DEFAULT_IGNORE

SNAP = Snapshot(1, 2, 10, 100, 100)
SPOT = Spot(Path("/d/a.csv"), "a.csv", "a.csv", None)


# -- stability -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "snapshot", "now", "expected_since"),
    [
        (None, SNAP, 5.0, 5.0),  # first look starts the clock
        (Candidate(SPOT, SNAP, 1.0), SNAP, 5.0, 1.0),  # unchanged keeps it
        (Candidate(SPOT, SNAP, 1.0), Snapshot(1, 2, 11, 100, 100), 5.0, 5.0),  # grew
        (Candidate(SPOT, SNAP, 1.0), Snapshot(1, 2, 10, 101, 100), 5.0, 5.0),  # mtime
        (Candidate(SPOT, SNAP, 1.0), Snapshot(1, 2, 10, 100, 101), 5.0, 5.0),  # ctime only (cp -p)
        (Candidate(SPOT, SNAP, 1.0), Snapshot(1, 3, 10, 100, 100), 5.0, 5.0),  # replaced (inode)
    ],
)
def test_observe_restarts_the_clock_on_any_change(previous, snapshot, now, expected_since):
    assert observe(previous, SPOT, snapshot, now).since == expected_since


def test_syncing_a_folder_removed_meanwhile_is_not_an_error(tmp_path):
    """The finisher syncs drop/ after moving a file out; an operator may have removed it."""
    mover = Mover(tmp_path / "drop", tmp_path / "done", tmp_path / "failed", lambda: 0.0)
    (tmp_path / "done").mkdir()
    mover.sync([tmp_path / "drop", tmp_path / "done"])


def test_a_sidecar_left_without_its_file_by_a_crash_gives_the_name_back(tmp_path):
    """kill -9 between writing a sidecar and moving its file: the file, refused again after the
    restart, went to failed/ under a stamped name, beside a sidecar for nothing (attack pass)."""
    mover = Mover(tmp_path / "drop", tmp_path / "done", tmp_path / "failed", lambda: 0.0)
    (tmp_path / "drop").mkdir()
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "report.csv.error.json").write_text('{"reason": "before the crash"}')
    (tmp_path / "drop" / "report.csv").write_text("x")
    (tmp_path / "failed" / "kept.csv").write_text("an earlier one")
    (tmp_path / "failed" / "kept.csv.error.json").write_text('{"reason": "earlier"}')
    (tmp_path / "drop" / "kept.csv").write_text("y")
    assert mover.to_failed(tmp_path / "drop" / "report.csv", {"reason": "now"}).name == "report.csv"
    assert (
        json.loads((tmp_path / "failed" / "report.csv.error.json").read_text())["reason"] == "now"
    )
    moved = mover.to_failed(tmp_path / "drop" / "kept.csv", {"reason": "now"})
    assert moved.name != "kept.csv"  # a name with its file is never taken over
    assert (tmp_path / "failed" / "kept.csv").read_text() == "an earlier one"


def test_a_file_that_cannot_be_looked_at_is_skipped_not_fatal(tmp_path, caplog):
    """An lstat error other than 'gone' (here a name too long; an unsearchable folder for a
    non-root daemon) is said once and skipped; it must not end the stabiliser's thread."""
    caplog.set_level("INFO")
    work = WorkQueue(lambda: 0.0, lambda spots: None)
    stabiliser = Stabiliser(1.0, work, lambda: 0.0)
    spot = Spot(tmp_path / ("x" * 300) / "a.csv", "a.csv", "a.csv", None)
    for _ in range(2):
        stabiliser.notice([spot])
        stabiliser.step(0.0)
    skipped = [r for r in caplog.records if getattr(r, "event", None) == "skipped"]
    assert len(skipped) == 1 and "cannot look at it" in skipped[0].fields["reason"]


def test_a_file_noticed_while_its_name_is_in_flight_is_looked_at_once_it_is_free(tmp_path):
    """A producer can drop the next report.csv the moment the last one leaves the drop folder,
    before the finisher lets go of the name: that notice must not wait for the next rescan, nor
    be looked at over and over while the name is held (a rescan parks every queued file)."""
    clock = [100.0]
    work = WorkQueue(lambda: clock[0], lambda spots: stabiliser.notice(spots))
    stabiliser = Stabiliser(2.0, work, lambda: clock[0])
    path = tmp_path / "report.csv"
    path.write_bytes(b"first")
    spot = Spot(path, "report.csv", "report.csv", None)

    def step_at(t: float) -> list[bytes]:
        clock[0] = t
        stabiliser.step(t)
        return [item.path.read_bytes() for item in work.take_batch(10, 0)]

    stabiliser.notice([spot])
    assert step_at(100.0) == []
    assert step_at(102.0) == [b"first"]  # queued, then in flight
    path.unlink()  # the finisher moves it out...
    path.write_bytes(b"second!")  # ...and the next one lands at once
    stabiliser.notice([spot])
    clock[0] = 102.5  # the old one still holds the name: parked, nothing to look at until free
    assert stabiliser.step(102.5) == IDLE_WAKE_SECONDS and len(stabiliser) == 0
    work.release(path)  # the name is free: noticed again
    assert len(stabiliser) == 1
    assert step_at(103.0) == []  # a new file, settling
    assert step_at(105.0) == [b"second!"]


def test_a_settling_file_is_counted_until_it_is_on_the_queue(tmp_path):
    """len(stabiliser) feeds `waiting`: were a file counted nowhere while it is looked at (its
    lstat lets other threads run), the main loop would see a quiet daemon and sleep 10 s."""
    clock = [0.0]
    seen: list[int] = []  # the count at the moments a file is between stages

    class Looking(Stabiliser):
        def _look(self, spot: Spot, now: float) -> Item | None:
            seen.append(len(self))
            return super()._look(spot, now)

    class Queueing(WorkQueue):
        def put_many(self, items: list[Item]) -> None:
            seen.append(len(stabiliser))
            super().put_many(items)

    work = Queueing(lambda: clock[0], lambda spots: None)
    stabiliser = Looking(1.0, work, lambda: clock[0])
    path = tmp_path / "a.csv"
    path.write_bytes(b"x")
    stabiliser.notice([Spot(path, "a.csv", "a.csv", None)])
    for clock[0] in (0.0, 1.0):
        stabiliser.step(clock[0])
    assert [item.path for item in work.take_batch(10, 0)] == [path]
    assert seen == [1, 1, 1] and len(stabiliser) == 0


def test_a_notice_for_a_held_name_is_counted_once(tmp_path):
    """A rescan finds every waiting file again; while it is parked on the queue, which counts the
    file, the stabiliser must not count it too (`waiting` would double during a backlog)."""
    work = WorkQueue(lambda: 0.0, lambda spots: None)
    stabiliser = Stabiliser(1.0, work, lambda: 0.0)
    spot = Spot(tmp_path / "a.csv", "a.csv", "a.csv", None)
    work.put_many([Item(spot, SNAP, noticed_at=0.0)])
    stabiliser.notice([spot])
    assert len(stabiliser) == 1  # not looked at yet: it may be a new file
    stabiliser.step(0.0)
    assert len(stabiliser) == 0 and work.counts() == (1, 0)


@pytest.mark.parametrize(
    ("since", "now", "settle", "stable"),
    [
        (0.0, 1.9, 2.0, False),
        (0.0, 2.0, 2.0, True),
        (0.0, 9.0, 2.0, True),
        (5.0, 5.0, 0.1, False),
    ],
)
def test_is_stable(since, now, settle, stable):
    assert is_stable(Candidate(SPOT, SNAP, since), now, settle) is stable


# -- where a path belongs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "default_type", "expected"),
    [
        ("/d/a.csv", None, ("a.csv", None)),
        ("/d/a.csv", "users", ("a.csv", "users")),
        ("/d/users/a.csv", None, ("users/a.csv", "users")),
        ("/d/contracts/a b.pdf", "users", ("contracts/a b.pdf", "contracts")),
        ("/d/other/x", None, ("other/x", "other")),
        ("/d/misc/a.csv", None, None),  # not a type folder
        ("/d/users/deep/a.csv", None, None),  # too deep
        ("/d/.hidden", None, None),
        ("/d/users/a.csv.part", None, None),
        ("/d", None, None),
        ("/elsewhere/a.csv", None, None),
        # a type folder's own name is never a file to upload, whatever it is (issue 11, item 3)
        ("/d/users", None, None),
        ("/d/users", "users", None),
        ("/d/other", "other", None),
    ],
)
def test_locate(path, default_type, expected):
    spot = locate(path, "/d", default_type, DEFAULT_IGNORE)
    assert (None if spot is None else (spot.rel, spot.file_type)) == expected


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        ("report.csv", False),
        (".report.csv", True),
        ("a.tmp", True),
        ("a.TMP", False),
        ("x.crdownload", True),
        ("~$budget.xlsx", True),
        ("notes~", True),
        ("Thumbs.db", True),
        ("a.partial", True),
        ("desktop.ini", True),
        ("data.swp", True),
        ("ok.part.csv", False),
    ],
)
def test_ignore_patterns_match_the_basename(name, ignored):
    assert is_ignored(name, DEFAULT_IGNORE) is ignored


# -- names in done/ and failed/ --------------------------------------------------------------

NOON = 1795763700.0  # 2026-11-27T07:15:00Z


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "report.pdf",
            ["report.pdf", "report.20261127T071500Z.pdf", "report.20261127T071500Z-2.pdf"],
        ),
        ("README", ["README", "README.20261127T071500Z", "README.20261127T071500Z-2"]),
        ("a.tar.gz", ["a.tar.gz", "a.tar.20261127T071500Z.gz", "a.tar.20261127T071500Z-2.gz"]),
    ],
)
def test_candidate_names(name, expected):
    names = candidate_names(name, NOON)
    assert [next(names) for _ in range(3)] == expected


@given(
    st.text(
        st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=255,
    ),
    st.integers(0, 20),
)
def test_candidate_names_are_distinct_and_fit(name, reserve):
    if len(os.fsencode(name)) > NAME_MAX_BYTES or name in (".", ".."):
        return
    names = list(candidate_names(name, NOON, reserve))[:50]
    assert len(set(names)) == len(names)
    assert all(len(os.fsencode(n)) <= NAME_MAX_BYTES - reserve for n in names)
    assert name.startswith(".") or not any(n.startswith(".") for n in names)


@pytest.mark.parametrize(
    "name",
    [
        "a." + "x" * 253,  # the whole name after its first dot
        "Acme Inc. " + "quarterly licence usage export " * 8,  # 250 bytes, no extension
        "\u5831\u544a." + "\u6570" * 80,  # 80 CJK characters after the dot: 246 bytes
        "x" * 230 + "." + "y" * 24,
        "\u5831." + "y" * 232,  # room for the stamp, not for the stem's first (3-byte) character
    ],
)
@pytest.mark.parametrize("reserve", [0, len(".error.json")])
def test_a_long_name_with_an_early_dot_gets_its_stamp_at_the_end(name, reserve):
    """Its suffix left no room for a stem: the next name was looked for forever, and the
    finisher thread with it (every later file uploaded, none moved)."""
    names = candidate_names(name, NOON, reserve)
    tried = [next(names) for _ in range(3)]
    assert len(set(tried)) == 3
    assert all(len(os.fsencode(n)) <= NAME_MAX_BYTES - reserve for n in tried)
    assert all(n.startswith(name[:8]) for n in tried)
    stamped = [n for n in tried if n != name]
    assert not any(n.startswith(".") for n in stamped)  # never a hidden name without a stem
    stem, _, suffix = name.rpartition(".")
    room = NAME_MAX_BYTES - reserve - len(f".20261127T071500Z-999.{suffix}".encode())
    kept = re.compile(rf"\.20261127T071500Z(-\d)?\.{suffix}")  # the suffix stays last
    at_end = re.compile(r"\.20261127T071500Z(-\d)?")  # no room: it is part of the stem
    rule = kept if len(stem[:1].encode()) <= room else at_end
    assert all(rule.search(n) and rule.search(n).end() == len(n) for n in stamped), stamped


def test_long_name_leaves_room_for_the_sidecar():
    name = "x" * 250 + ".csv"
    first = next(candidate_names(name, NOON, reserve=len(".error.json")))
    assert first.endswith(".20261127T071500Z.csv")
    assert len(first) + len(".error.json") <= NAME_MAX_BYTES


# -- whose fault, and how long to wait ---------------------------------------------------------

EXPIRED_XML = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
RCLONE_EXPIRED_XML = (
    b"<Error><Code>AccessDenied</Code><Message>The difference between the request time and the "
    b"server&#39;s time exceeds the maximum allowed.</Message></Error>"
)
MISMATCH_XML = b"<Error><Code>SignatureDoesNotMatch</Code><Message>no</Message></Error>"


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (200, b"", None),
        (403, EXPIRED_XML, Kind.EXPIRED),
        (400, RCLONE_EXPIRED_XML, Kind.EXPIRED),  # rclone serve s3's words for it
        (403, b"<Error><Code>RequestTimeTooSkewed</Code></Error>", Kind.EXPIRED),
        (403, MISMATCH_XML, Kind.FILE),
        (400, b"<Error><Code>RequestTimeout</Code></Error>", Kind.FILE),
        (
            403,
            b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
            Kind.FILE,
        ),
        (411, b"", Kind.FILE),
        (429, b"", Kind.SERVICE),
        (500, b"", Kind.SERVICE),
        (503, b"<Error><Code>SlowDown</Code></Error>", Kind.SERVICE),
        (307, b"", Kind.SERVICE),
        (100, b"", Kind.SERVICE),  # an interim answer, and then none: never the file's fault
        (0, b"", Kind.SERVICE),
    ],
)
def test_classify_put(status, body, kind):
    assert classify_put(status, body) is kind


@pytest.mark.parametrize(
    ("status", "endpoint", "kind"),
    [
        (200, "urls", None),
        (400, "urls", Kind.REFUSED),
        (414, "urls", Kind.REFUSED),
        (431, "urls", Kind.REFUSED),  # header fields too large: a smaller batch, like 414
        (431, "token", Kind.SERVICE),
        (404, "urls", Kind.SERVICE),
        (403, "urls", Kind.SERVICE),
        (401, "urls", Kind.SERVICE),
        (429, "urls", Kind.SERVICE),
        (503, "urls", Kind.SERVICE),
        (400, "token", Kind.SERVICE),
        (401, "token", Kind.SERVICE),
        (302, "urls", Kind.SERVICE),
    ],
)
def test_classify_api_status(status, endpoint, kind):
    assert classify_api_status(status, endpoint) is kind


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("0", 0.0),
        ("100000", 900.0),
        ("Fri, 27 Nov 2026 07:16:00 GMT", 60.0),
        ("Fri, 27 Nov 2026 07:00:00 GMT", 0.0),
        ("soon", None),
    ],
)
def test_retry_after(header, expected):
    assert retry_after_seconds(header, NOON) == expected


def test_backoff_doubles_up_to_the_cap_with_jitter_between_half_and_whole():
    assert [backoff_seconds(n, 1.0, 300.0, 0.999999) for n in (1, 2, 3, 4)] == pytest.approx(
        [1, 2, 4, 8], rel=1e-5
    )
    assert backoff_seconds(1, 1.0, 300.0, 0.0) == 0.5
    assert backoff_seconds(50, 1.0, 300.0, 0.0) == 150.0


@given(st.integers(1, 10_000), st.floats(0.01, 10), st.floats(10, 1000), st.floats(0, 0.999))
def test_backoff_is_bounded(step, initial, maximum, jitter):
    wait = backoff_seconds(step, initial, maximum, jitter)
    assert initial / 2 <= wait <= maximum  # never above the cap, whatever the step
    if initial * 2.0 ** min(step - 1, 64) >= maximum:  # the doubling has reached the cap
        assert wait >= maximum / 2


# -- URLs and tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://productiv-data.s3.us-west-2.amazonaws.com/k/a.pdf?X=1", True),
        ("http://127.0.0.1:9000/b/k?x=1", True),
        ("http://127.5.5.5/b/k", True),
        ("http://[::1]:80/b/k", True),
        ("http://localhost/b/k", True),
        ("http://example.com/b/k", False),
        ("http://10.0.0.1/b/k", False),
        ("https://user:pass@s3.amazonaws.com/b/k", False),
        ("https://user@s3.amazonaws.com/b/k", False),
        ("ftp://s3.amazonaws.com/b/k", False),
        ("file:///etc/passwd", False),
        ("not a url", False),
        ("https://[::1/x", False),
        ("https://127.0.0.1:99999/b/k?x=1", False),  # .port raises ValueError
        ("https://h:0/b/k", False),
        ("https://h:-1/b/k", False),
        ("https://h:443/b/k", True),
        ("https://h/b k?x=1", False),
        ("https://h/b\x00k", False),
        ("https://h/caf\u00e9", False),
    ],
)
def test_url_problem(url, ok):
    assert (url_problem(url) is None) is ok


@pytest.mark.parametrize(
    ("url", "expiry"),
    [
        ("https://h/b/k?AWSAccessKeyId=A&Expires=1795763700&Signature=a%2Bb", NOON),
        (
            "https://h/b/k?X-Amz-Date=20261127T071500Z&X-Amz-Expires=600&X-Amz-Signature=s",
            NOON + 600,
        ),
        ("https://h/b/k?X-Amz-Date=garbage&X-Amz-Expires=600", None),
        ("https://h/b/k?Expires=nan", None),
        ("https://h/b/k?Expires=1e999", None),
        ("https://h/b/k?X-Amz-Date=20261127T071500Z&X-Amz-Expires=inf", None),
        ("https://h/b/k", None),
    ],
)
def test_url_expiry(url, expiry):
    assert url_expiry(url) == expiry


@pytest.mark.parametrize(
    ("expires_at", "received_at", "now", "stale"),
    [
        (None, 0.0, 1e12, False),
        (1000.0, 0.0, 900.0, False),
        (1000.0, 0.0, 996.0, True),  # fine on arrival, nearly gone now: ask again
        (1000.0, 999.0, 999.5, False),  # arrived this close: let the storage decide
    ],
)
def test_url_is_stale(expires_at, received_at, now, stale):
    assert url_is_stale(SignedUrl("u", expires_at), received_at, now) is stale


@pytest.mark.parametrize(
    ("obtained", "lifetime", "now", "refresh"),
    [
        (0, 3600, 3539, False),
        (0, 3600, 3540, True),  # 60 s margin
        (0, 60, 29, False),
        (0, 60, 30, True),  # half of a short lifetime
        (0, float("inf"), 1e12, False),
    ],
)
def test_token_needs_refresh(obtained, lifetime, now, refresh):
    assert token_needs_refresh(obtained, lifetime, now) is refresh


def test_refusal():
    def item(name: str, size: int) -> Item:
        return Item(Spot(Path("/d") / name, name, name, None), Snapshot(1, 1, size, 1, 1))

    assert refusal(item("a.csv", 10), 10) is None
    assert "max_file_size" in (refusal(item("a.csv", 11), 10) or "")
    assert "UTF-8" in (refusal(item(os.fsdecode(b"bad\xff.csv"), 1), 10) or "")


# -- what may be logged ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "PUT /b/k.csv?AWSAccessKeyId=A&Expires=1&Signature=x%2B HTTP/1.1",
            "PUT /b/k.csv?<redacted> HTTP/1.1",
        ),
        ("url=https://h/k?X-Amz-Signature=abc&X-Amz-Date=1", "url=https://h/k?<redacted>"),
        ("file=what?.csv", "file=what?.csv"),  # a '?' in a file name stays
        ("token is hunter2-secret ok", "token is *** ok"),
    ],
)
def test_redactor(line, expected):
    redact = Redactor()
    redact.add(["hunter2-secret"])
    assert redact(line) == expected


@given(
    st.text(min_size=4, max_size=40).filter(lambda s: s.strip() == s and "?" not in s),
    st.text(max_size=40),
)
def test_redactor_never_lets_a_registered_secret_through(secret, noise):
    redact = Redactor()
    redact.add([secret])
    assert secret not in redact(noise + secret + noise)
