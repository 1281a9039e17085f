"""Three parts tested directly, with a clock the test moves: the gates (a backoff shared by the
threads that call one thing), the work queue's batch picking, and the bounded answer reads."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest
import urllib3

from tests.conftest import Captured
from watcher.items import Item, Snapshot, Spot
from watcher.metrics import Metrics
from watcher.pipeline.workqueue import WorkQueue
from watcher.remote.answers import PIECE_BYTES, bounded
from watcher.remote.breakers import Gates, ServiceGate
from watcher.remote.faults import Fault, Kind
from watcher.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fault(where: str = "put", retry_after: float | None = None) -> Fault:
    return Fault(Kind.SERVICE, f"{where} answered HTTP 503", 503, retry_after, where=where)


# -- ServiceGate and Gates ------------------------------------------------------------------


def test_a_gate_steps_once_per_backoff_however_many_threads_report_it(logs_json: Captured):
    clock = Clock()
    gate = ServiceGate("storage", lambda step: 2.0**step, clock)
    assert gate.remaining() == 0 and gate.wait(threading.Event())  # open: no wait at all
    assert gate.trouble(fault()) == 2.0
    clock.now += 0.5
    assert gate.trouble(fault()) == 1.5  # the same step, reported by another thread: folded
    assert gate.remaining() == 1.5 and gate.last_error == "put answered HTTP 503"
    clock.now += 1.5
    assert gate.trouble(fault()) == 4.0  # its step is over: the next one
    assert [e["attempt"] for e in logs_json.events("retrying")] == [1, 2]
    assert gate.failing_since == 100.0


def test_a_retry_after_is_the_wait_of_its_step():
    clock = Clock()
    gate = ServiceGate("api", lambda step: 1.0, clock)
    assert gate.trouble(fault("urls", retry_after=30.0)) == 30.0
    assert gate.remaining() == 30.0


def test_only_a_success_ends_the_outage_and_the_next_starts_at_the_first_step(
    logs_json: Captured,
):
    clock = Clock()
    gate = ServiceGate("storage", lambda step: 10.0 * step, clock)
    gate.fine()  # no outage: nothing said
    assert not logs_json.events("recovered")
    gate.trouble(fault())
    clock.now += 10.0
    gate.trouble(fault())
    clock.now += 5.0
    gate.fine()
    [recovered] = logs_json.events("recovered")
    assert recovered == {**recovered, "what": "storage", "seconds": 15.0}
    assert gate.failing_since is None and gate.last_error is None and gate.remaining() == 0
    assert gate.trouble(fault()) == 10.0  # step 1 again


def test_waiting_at_a_closed_gate_ends_at_a_stop():
    clock = Clock()
    gate = ServiceGate("storage", lambda step: 3600.0, clock)
    gate.trouble(fault())
    stop = threading.Event()
    stop.set()
    assert gate.wait(stop) is False  # a stop is never stuck behind a backoff


def test_the_wall_clock_time_of_an_outage_is_told_from_the_monotonic_one():
    clock = Clock()
    gate = ServiceGate("api", lambda step: 1.0, clock)
    assert gate.failing_since_epoch() is None
    gate.trouble(fault("urls"))
    clock.now += 60.0
    since = gate.failing_since_epoch()
    assert since is not None and abs(since - (time.time() - 60.0)) < 1.0


def test_every_report_of_a_service_fault_is_counted_by_where_and_class(tmp_path):
    pytest.importorskip("prometheus_client")
    textfile = tmp_path / "m.prom"
    settings = Settings(app_id="a", access_token="t", metrics_textfile=textfile)
    metrics = Metrics(settings)
    gates = Gates(1.0, 8.0, Clock(), metrics, jitter=lambda: 1.0)
    gates.trouble(fault("put"))
    gates.trouble(fault("put"))  # folded into the step, still a retry of that PUT
    gates.trouble(fault("token"))
    metrics.write_textfile()
    lines = [
        ln
        for ln in textfile.read_text().splitlines()
        if ln.startswith("productiv_watcher_retries_total")
    ]
    assert sorted(lines) == [
        'productiv_watcher_retries_total{cause="put",class="5xx"} 2.0',
        'productiv_watcher_retries_total{cause="token",class="5xx"} 1.0',
    ]


def test_the_gates_share_the_backoff_settings_of_the_moment():
    gates = Gates(1.0, 8.0, Clock(), jitter=lambda: 1.0)
    assert [gates.delay(step) for step in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    gates.initial_seconds, gates.max_seconds = 0.5, 1.0
    assert [gates.delay(step) for step in (1, 2, 3)] == [0.5, 1.0, 1.0]
    half = Gates(2.0, 8.0, Clock(), jitter=lambda: 0.0)
    assert half.delay(1) == 1.0  # the jitter spreads a step between half and all of it


def test_a_fault_steps_the_gate_of_the_thing_that_failed_and_the_outage_is_the_oldest():
    clock = Clock()
    gates = Gates(1.0, 8.0, clock, jitter=lambda: 1.0)
    assert gates.outage() is None
    gates.trouble(fault("urls"))
    assert gates.api.remaining() == 1.0 and gates.storage.remaining() == 0
    clock.now += 5.0
    gates.trouble(fault("put"))
    assert gates.outage() is gates.api
    gates.api.fine()
    assert gates.outage() is gates.storage


# -- the work queue's batches ----------------------------------------------------------------


def queued(name: str, file_type: str | None = None, folder: str = "") -> Item:
    path = Path("/drop", file_type or "", folder, name)
    rel = str(path.relative_to("/drop"))
    return Item(Spot(path, rel, name, file_type), Snapshot(1, hash(rel) & 0xFFFF, 1, 1, 1))


def names(batch: list[Item]) -> list[str]:
    return [item.spot.rel for item in batch]


@pytest.mark.parametrize(
    ("waiting", "limit", "batch", "left"),
    [
        # oldest first, up to the limit
        (["a", "b", "c"], 2, ["a", "b"], ["c"]),
        # one type per batch: the API is asked per type; the others wait their turn, in order
        (["users/a", "b", "users/c", "d"], 10, ["users/a", "users/c"], ["b", "d"]),
        # distinct names: one signed-URL answer per name
        (["users/x/a", "users/y/a", "users/b"], 10, ["users/x/a", "users/b"], ["users/y/a"]),
        # a lone file goes at once, never waits to fill a batch
        (["a"], 50, ["a"], []),
    ],
)
def test_a_batch_is_due_files_of_one_type_with_distinct_names(waiting, limit, batch, left):
    clock = Clock()
    work = WorkQueue(clock, lambda spots: None)
    items = {}
    for rel in waiting:
        parts = rel.split("/")
        file_type = parts[0] if len(parts) > 1 else None
        folder = parts[1] if len(parts) > 2 else ""
        items[rel] = queued(parts[-1], file_type, folder)
    work.put_many(list(items.values()))
    assert names(work.take_batch(limit, timeout=0)) == [items[r].spot.rel for r in batch]
    assert names(work.take_batch(100, timeout=0)) == [items[r].spot.rel for r in left]


def test_a_file_put_back_with_a_time_waits_for_it_and_others_go_first():
    clock = Clock()
    work = WorkQueue(clock, lambda spots: None)
    a, b = queued("a"), queued("b")
    work.put_many([a, b])
    [first, second] = work.take_batch(10, timeout=0)
    work.put_back(first, not_before=clock.now + 5.0)  # a file-side retry's backoff
    work.put_back(second)
    assert work.take_batch(10, timeout=0) == [b]
    assert work.take_batch(10, timeout=0) == []  # not due yet: the timeout passes
    clock.now += 5.0
    assert work.take_batch(10, timeout=0) == [a]
    assert work.counts() == (0, 2)  # both taken, neither released


def test_a_path_is_queued_once_until_it_is_released():
    work = WorkQueue(Clock(), lambda spots: None)
    a = queued("a")
    work.put_many([a, a])
    work.put_many([a])
    assert work.counts() == (1, 0) and work.take_batch(10, timeout=0) == [a]
    work.put_many([a])  # in flight: still ignored
    assert work.counts() == (0, 1)
    work.release(a.path)
    work.put_many([a])
    assert work.counts() == (1, 0)


def test_picking_looks_at_a_bounded_number_of_entries_of_another_type():
    work = WorkQueue(Clock(), lambda spots: None)
    others = [queued(f"o{n}", "other") for n in range(20)]
    users = queued("u", "users")
    work.put_many([queued("first"), *others, users])
    batch = work.take_batch(2, timeout=0)
    assert names(batch) == ["first"]  # 4 x limit passed over, then it stops looking
    assert work.counts() == (21, 1)  # the passed-over entries are all still queued
    assert names(work.take_batch(2, timeout=0)) == ["other/o0", "other/o1"]


def test_a_closed_queue_answers_at_once_and_empty():
    work = WorkQueue(Clock(), lambda spots: None)
    work.put_many([queued("a")])
    work.close()
    assert work.take_batch(10) == []


def test_a_waiting_take_is_woken_by_a_put():
    work = WorkQueue(time.monotonic, lambda spots: None)
    got: list[list[Item]] = []
    taker = threading.Thread(target=lambda: got.append(work.take_batch(10, timeout=10.0)))
    taker.start()
    a = queued("a")
    work.put_many([a])
    taker.join(5.0)
    assert got == [[a]]


# -- bounded answer reads --------------------------------------------------------------------


def answer(body: bytes) -> urllib3.HTTPResponse:
    return urllib3.HTTPResponse(body=BytesIO(body), status=200, preload_content=False)


@pytest.mark.parametrize(
    ("size", "limit", "data", "whole"),
    [
        (0, 100, b"", True),
        (100, 100, b"x" * 100, True),  # exactly the limit: whole
        (101, 100, b"x" * 100, False),  # one byte more: cut at the limit
        (3 * PIECE_BYTES + 7, 10**7, b"x" * (3 * PIECE_BYTES + 7), True),  # many pieces
        (10**6, PIECE_BYTES + 1, b"x" * (PIECE_BYTES + 1), False),
    ],
)
def test_an_answer_is_read_up_to_its_limit(size, limit, data, whole):
    body = bounded(answer(b"x" * size), limit, seconds=60.0)
    assert (body.data, body.whole) == (data, whole)


def test_an_answer_is_read_for_at_most_its_time():
    ticks = iter([0.0, 0.0, 0.5, 1.0, 1.5])  # one look per piece: the second runs out of time
    body = bounded(answer(b"x" * (10 * PIECE_BYTES)), 10**7, 1.0, clock=lambda: next(ticks))
    assert body.whole is False and len(body.data) == 2 * PIECE_BYTES


@contextmanager
def server(reply: bytes) -> Iterator[str]:
    """A loopback server that answers one request with `reply`, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(reply)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        thread.join(5.0)
        listener.close()


def test_an_answer_cut_by_its_connection_is_judged_on_what_came():
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 10
    with server(reply) as url, urllib3.PoolManager() as pool:
        response = pool.request("GET", url, preload_content=False, retries=False)
        body = bounded(response, 10**6, 5.0)
    assert body.data == b"y" * 10 and body.whole is False
