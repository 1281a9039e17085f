"""A file's fate in one pure function (`fates.decide`), from tables: every outcome in every
state that matters, and what the uploader, the finisher and `upload` do with it."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from watcher.heartbeats import Heartbeat
from watcher.items import Item, Snapshot, Spot
from watcher.metrics import Metrics
from watcher.pipeline.fates import EXPIRED_IN_A_ROW, Fate, Happened, Next, decide
from watcher.pipeline.finisher import Finisher
from watcher.pipeline.mover import Mover
from watcher.pipeline.receipts import Journal
from watcher.pipeline.workqueue import WorkQueue
from watcher.remote.body import FileChanged, FileGone, NotRegular
from watcher.remote.faults import Fault, Kind
from watcher.remote.transfer import Sent
from watcher.settings import Settings

MAX = 3
SPOT = Spot(Path("/d/a.csv"), "a.csv", "a.csv", None)


def item(attempts: int = 0, expired: int = 0, puts: int = 2) -> Item:
    return Item(SPOT, Snapshot(1, 2, 3, 4, 5), attempts=attempts, puts=puts, expired=expired)


OUTCOMES: list[Kind | Happened] = [*Kind, *Happened]
STATES = list(itertools.product(range(MAX), range(EXPIRED_IN_A_ROW)))  # (attempts, expired)


@pytest.mark.parametrize(
    ("what", "attempts", "expired", "expected"),
    [
        # an expired URL: a fresh one, no attempt used; the third in a row is the clock's fault
        (Kind.EXPIRED, 0, 0, Fate(Next.FRESH_URL, item(0, 1))),
        (Kind.EXPIRED, 2, 1, Fate(Next.FRESH_URL, item(2, 2))),
        (Kind.EXPIRED, 0, 2, Fate(Next.CHECK_CLOCK, item(0, 3))),
        (Kind.EXPIRED, 1, 5, Fate(Next.CHECK_CLOCK, item(1, 6))),
        # the file refused: one attempt used, the expired run ends; the last attempt fails it
        (Kind.FILE, 0, 0, Fate(Next.RETRY, item(1, 0))),
        (Kind.FILE, 1, 2, Fate(Next.RETRY, item(2, 0))),
        (Kind.FILE, 2, 0, Fate(Next.FAIL, item(2, 0))),  # as it is: no dead retried() count
        (Kind.FILE, 2, 2, Fate(Next.FAIL, item(2, 2))),
        # a URL about to expire before its PUT began: ask again, and it is not an expired one
        (Happened.URL_STALE, 1, 2, Fate(Next.FRESH_URL, item(1, 2))),
    ],
)
def test_the_outcomes_that_change_a_files_state(what, attempts, expired, expected):
    assert decide(item(attempts, expired), what, MAX) == expected


STEADY = {
    Kind.SERVICE: Next.BACK_OFF,  # the gate backs off; never an attempt, whatever the state
    Kind.FINAL: Next.FAIL,
    Kind.REFUSED: Next.FAIL,
    Kind.GONE: Next.FORGET,
    Kind.NOT_REGULAR: Next.FORGET,
    Kind.CHANGED: Next.SETTLE_AGAIN,
    Happened.STORED: Next.MOVE,
    Happened.MOVE_FAILED: Next.MOVE_AGAIN,  # never a new PUT, whatever the attempts
    Happened.MOVED: Next.RECORD,
}


@pytest.mark.parametrize(("what", "step"), STEADY.items())
@pytest.mark.parametrize(("attempts", "expired"), STATES)
def test_the_outcomes_that_leave_a_files_state_as_it_is(what, step, attempts, expired):
    before = item(attempts, expired)
    assert decide(before, what, MAX) == Fate(step, before)


@pytest.mark.parametrize("what", OUTCOMES)
@pytest.mark.parametrize(("attempts", "expired"), STATES)
@pytest.mark.parametrize("max_attempts", [1, MAX])
def test_every_outcome_in_every_state_has_one_step_and_keeps_the_puts(
    what, attempts, expired, max_attempts
):
    fate = decide(item(attempts, expired), what, max_attempts)
    assert fate.item.puts == 2 and fate.item.spot == SPOT  # the PUTs made: the finisher's
    assert fate.item.attempts <= max(attempts, max_attempts - 1)  # never past the last attempt
    if fate.next is not Next.RETRY:
        assert fate.item.attempts == attempts  # only a retry costs an attempt


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        (FileGone(), Kind.GONE, "removed before it was uploaded"),
        (NotRegular("a symlink"), Kind.NOT_REGULAR, "a symlink, not a regular file"),
        (FileChanged("it grew"), Kind.CHANGED, "it grew"),
    ],
)
def test_the_files_own_troubles_are_faults_with_their_kinds(error, kind, reason):
    assert isinstance(error, Fault) and error.kind is kind and error.reason == reason


# -- a move's disk error, on real folders ---------------------------------------------------


def test_a_failed_move_is_counted_once_per_try_in_the_retries_metric(tmp_path):
    pytest.importorskip("prometheus_client")
    drop, done, failed = tmp_path / "drop", tmp_path / "done", tmp_path / "failed"
    for folder in (drop, done, failed):
        folder.mkdir()
    (drop / "users").mkdir()
    path = drop / "users" / "a.csv"
    path.write_bytes(b"data")
    (done / "users").write_bytes(b"")  # a file where done/users should be: the move fails
    textfile = tmp_path / "metrics.prom"
    settings = Settings(drop_dir=drop, app_id="a", access_token="t", metrics_textfile=textfile)
    metrics = Metrics(settings)
    now = [0.0]
    work = WorkQueue(lambda: now[0], lambda spots: None)
    finisher = Finisher(
        Mover(drop, done, failed, time.time),
        work,
        lambda step: 10.0,
        lambda spots: None,
        Journal(tmp_path / "state", 10**6, 1),
        metrics,
        monotonic=lambda: now[0],
    )
    item = Item(Spot(path, "users/a.csv", "a.csv", "users"), Snapshot.of(os.lstat(path)))
    work.put_many([item])
    work.take_batch(1, timeout=0)
    finisher.done(item, Sent(200, 0.1, "", "0" * 64), "/bucket/a.csv")
    beat = Heartbeat("finisher")
    finisher.step(beat)
    now[0] += 10.0
    finisher.step(beat)  # tried again: a second retry
    metrics.write_textfile()
    counted = [
        line
        for line in textfile.read_text().splitlines()
        if line.startswith("productiv_watcher_retries_total")
    ]
    assert counted == ['productiv_watcher_retries_total{cause="move",class="disk"} 2.0']
