"""The test relay itself (tests/tcpproxy.py): the link it claims to play is the link it plays.

Its rate and delay are measured by the receiving end, not taken from the relay's own books."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.helpers import wait_for
from tests.tcpproxy import Link, Record, Relay

Handler = Callable[[socket.socket], None]


class Arrivals:
    """What a receiving end read: (moment, running total) per read."""

    def __init__(self) -> None:
        self.record = Record()
        self.lock = threading.Lock()

    def read_all(self, sock: socket.socket) -> None:
        while data := sock.recv(65536):
            with self.lock:
                self.record.add(time.monotonic(), len(data))


@contextmanager
def server(handle: Handler) -> Iterator[tuple[str, int]]:
    """A threaded TCP server on loopback that runs `handle(connection)` for each client."""

    class Handle(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            handle(self.request)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handle) as srv:
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield srv.server_address[:2]  # type: ignore[misc]
        finally:
            srv.shutdown()
            thread.join()


def echo(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := sock.recv(65536):
        sock.sendall(data)


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trips(sock: socket.socket, count: int) -> list[float]:
    seconds = []
    for n in range(count):
        t0 = time.monotonic()
        sock.sendall(bytes([n]))
        assert sock.recv(1) == bytes([n])
        seconds.append(time.monotonic() - t0)
    return seconds


# -- the link model, as numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "free_at", "now", "size", "leaves", "free_after"),
    [
        (None, 0.0, 5.0, 100, 5.0, 0.0),  # no limit: at once
        (1000.0, 0.0, 0.0, 500, 0.5, 0.5),  # an idle link: size / rate from now
        (1000.0, 0.5, 0.2, 500, 1.0, 1.0),  # a busy link: queued behind what it already has
        (1000.0, 1.0, 3.0, 100, 3.1, 3.1),  # idle again: no credit for the quiet time
    ],
)
def test_a_link_serialises_bytes_at_its_rate(rate, free_at, now, size, leaves, free_after):
    link = Link(rate, free_at)
    assert link.leaves(now, size) == pytest.approx(leaves)
    assert link.free_at == pytest.approx(free_after)


@pytest.mark.parametrize(
    ("rate", "free_at", "now", "wait", "read"),
    [
        (None, 9.0, 0.0, 0.0, 65536),
        (150_000.0, 1.0, 0.5, 0.4, 1500),  # 100 ms of queue ahead of the link is allowed
        (150_000.0, 1.0, 0.99, 0.0, 1500),
        (50_000.0, 0.0, 0.0, 0.0, 1024),  # at least 1 KiB a read
        (1e9, 0.0, 0.0, 0.0, 65536),  # at most 64 KiB a read
    ],
)
def test_a_link_takes_bytes_only_a_little_ahead_of_its_queue(rate, free_at, now, wait, read):
    link = Link(rate, free_at)
    assert link.wait(now) == pytest.approx(wait)
    assert link.read_size() == read


def test_a_record_finds_when_a_total_was_reached_and_the_total_at_a_moment():
    record = Record()
    for when, size in [(1.0, 100), (2.0, 100), (3.0, 300)]:
        record.add(when, size)
    assert [record.when(n) for n in (1, 100, 101, 500)] == [1.0, 1.0, 2.0, 3.0]
    assert [record.at(t) for t in (0.5, 1.0, 2.5, 9.0)] == [0, 100, 200, 500]
    assert record.rate(100, 500) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="only 500 bytes"):
        record.when(501)


# -- the relay on real sockets -----------------------------------------------------------------


def test_bytes_go_through_whole_both_ways_and_are_counted():
    payload = os.urandom(3 * 1024 * 1024 + 17)

    def reply_after_eof(sock: socket.socket) -> None:
        got = b""
        while data := sock.recv(65536):
            got += data
        sock.sendall(got[::-1])  # the client's half-close came through: answer, then close

    with server(reply_after_eof) as address, Relay(address) as relay, connect(relay.address) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        back = b""
        while data := c.recv(65536):
            back += data
    assert back == payload[::-1]
    assert (relay.up.total, relay.down.total, relay.connections) == (len(payload),) * 2 + (1,)


def test_latency_adds_one_round_trip_per_exchange_and_one_for_the_handshake():
    latency = 0.05
    with server(echo) as address:
        with connect(address) as direct:
            baseline = min(round_trips(direct, 10))
        firsts, rest = [], []
        with Relay(address, latency=latency) as relay:
            for _ in range(3):
                t0 = time.monotonic()  # before the connect: the relay's clock starts at its accept
                with connect(relay.address) as c:
                    c.sendall(b"\0")
                    assert c.recv(1) == b"\0"
                    firsts.append(time.monotonic() - t0)
                    rest.extend(round_trips(c, 3))
    # A loaded machine delays any one sample by tens of milliseconds, never makes one shorter:
    # lower bounds hold for every sample, upper bounds for the quickest of several.
    assert baseline < 0.01  # loopback itself is well below the relay's latency
    assert min(firsts) >= 2 * latency  # the handshake's round trip, then the exchange's...
    assert min(firsts) < 3 * latency  # ...not a third
    assert min(rest) >= latency
    assert min(rest) < 2 * latency  # one round trip per exchange, not two


def test_an_upstream_rate_holds_at_the_receiver_and_holds_the_sender_back():
    arrivals = Arrivals()
    size, rate = 2_000_000, 1_000_000.0
    with server(arrivals.read_all) as address, Relay(address, up_rate=rate) as relay:
        with connect(relay.address) as c:
            t0 = time.monotonic()
            c.sendall(os.urandom(size))
            sending = time.monotonic() - t0
        wait_for(lambda: arrivals.record.total == size, what="every byte at the receiver")
    got = arrivals.record
    assert got.rate(got.totals[0], size) == pytest.approx(rate, rel=0.03)
    assert relay.up.rate(relay.up.totals[0], size) == pytest.approx(rate, rel=0.03)
    # Its writes blocked: it felt the slow link (direct, 2 MB go in milliseconds). How much the
    # sender's kernel buffers first depends on TCP autotuning: 0.83 s was seen in one run.
    assert sending > 0.25 * size / rate


def test_a_downstream_rate_holds_at_the_receiver():
    size, rate = 600_000, 1_000_000.0

    def send(sock: socket.socket) -> None:
        sock.sendall(os.urandom(size))

    arrivals = Arrivals()
    with (
        server(send) as address,
        Relay(address, down_rate=rate) as relay,
        connect(relay.address) as c,
    ):
        arrivals.read_all(c)
    got = arrivals.record
    assert got.total == relay.down.total == size
    assert got.rate(got.totals[0], size) == pytest.approx(rate, rel=0.03)


@pytest.mark.parametrize(("per_connection", "total_rate"), [(False, 1e6), (True, 2e6)])
def test_a_rate_is_shared_by_all_connections_unless_per_connection(per_connection, total_rate):
    arrivals = Arrivals()
    size = 500_000

    def upload(address: tuple[str, int]) -> None:
        with connect(address) as c:
            c.sendall(os.urandom(size))

    with (
        server(arrivals.read_all) as address,
        Relay(address, up_rate=1e6, per_connection=per_connection) as relay,
    ):
        threads = [threading.Thread(target=upload, args=(relay.address,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_for(lambda: arrivals.record.total == 2 * size, what="every byte at the receiver")
    with arrivals.lock:
        got = arrivals.record
    assert got.rate(got.totals[0], 2 * size) == pytest.approx(total_rate, rel=0.05)


def test_a_stalled_link_forwards_nothing_until_it_resumes():
    with server(echo) as address, Relay(address) as relay, connect(relay.address) as c:
        assert round_trips(c, 1)
        relay.stall()
        c.sendall(b"held")
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.recv(4)  # a bounded wait is the test: nothing may come back meanwhile
        c.settimeout(10)
        relay.resume()
        assert c.recv(4) == b"held"
