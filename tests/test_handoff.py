"""The dispatcher's hand-over of tickets to the transfer thread: whole batches, bounded."""

from __future__ import annotations

import threading

from watcher.pipeline.handoff import Handoff


def test_a_batch_goes_whole_and_in_order_once_it_fits() -> None:
    ready: Handoff[int] = Handoff(depth=4)
    assert ready.put_all([1, 2, 3], timeout=0)
    assert not ready.put_all([4, 5], timeout=0)  # 5 would wait: nothing of it is handed over
    assert ready.get_nowait() == 1
    assert ready.put_all([4, 5], timeout=0)
    assert [ready.get_nowait() for _ in range(5)] == [2, 3, 4, 5, None]


def test_a_batch_larger_than_the_depth_goes_alone() -> None:
    ready: Handoff[int] = Handoff(depth=2)
    assert ready.put_all([1, 2, 3], timeout=0)
    assert not ready.put_all([4], timeout=0)
    assert [ready.get(timeout=0) for _ in range(4)] == [1, 2, 3, None]


def test_a_waiting_batch_is_handed_over_when_the_taker_makes_room() -> None:
    ready: Handoff[int] = Handoff(depth=2)
    assert ready.put_all([1, 2], timeout=0)
    handed: list[bool] = []
    putter = threading.Thread(target=lambda: handed.append(ready.put_all([3, 4], timeout=30)))
    putter.start()
    assert ready.get(timeout=0) == 1
    assert ready.get(timeout=0) == 2  # now the whole batch fits
    putter.join(30)
    assert handed == [True]
    assert [ready.get(timeout=0), ready.get(timeout=0)] == [3, 4]


def test_wake_ends_a_get_that_waits() -> None:
    ready: Handoff[int] = Handoff(depth=2)
    got: list[int | None] = []
    taker = threading.Thread(target=lambda: got.append(ready.get(timeout=30)))
    taker.start()
    ready.wake()  # before or after the taker waits: either way its get ends
    taker.join(30)
    assert got == [None]


def test_a_larger_depth_after_a_reload_lets_a_waiting_batch_in() -> None:
    handoff: Handoff[int] = Handoff(2)
    handoff.put_all([1, 2], timeout=0)
    assert not handoff.put_all([3, 4], timeout=0)  # 4 > 2: waits for room
    handoff.resize(4)
    assert handoff.put_all([3, 4], timeout=0)
    assert [handoff.get_nowait() for _ in range(4)] == [1, 2, 3, 4]
