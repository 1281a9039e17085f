"""A loopback TCP relay for tests and the benchmark: a slower, longer link to the storage.

Put it between the daemon and the storage (the sandbox's `url_base`, or the endpoint boto3 signs
for): every connection to `Relay.address` is relayed to `upstream`, byte for byte.

The link it plays, per direction of a connection (see `Link`): bytes leave a bottleneck at `rate`
bytes/s (None: as fast as they come), then travel `latency / 2` seconds. So a request and its
answer take `latency` more in all: a link with `latency` more round-trip time, not `latency` per
direction. A new connection's first bytes wait one `latency` more, as the TCP handshake over such
a link would. A rate is per direction, for all connections together (`per_connection=False`: a
slow uplink shared by every transfer) or for each connection alone.

A sender must feel a slow link as it would a real one: its writes block. So the relay takes at
most `HORIZON` seconds' worth of bytes ahead of the bottleneck, keeps its socket buffers small,
and offers an Ethernet-sized segment (`MSS`): with loopback's 64 KiB segments the sender's kernel
grows its send buffer to 4 MB (measured: 2.9 MB sent but not delivered after 5 s at 200 KB/s;
with these settings 0.6-0.75 MB, about what a real link's sender holds).

It records every byte it delivers with the moment it did (`up`, `down`: what the storage received
and when), and `stall()` stops all forwarding until `resume()`: a link that went dead without a
reset. One thread drives everything (selectors and a timer per queued chunk); no dependency.
"""

from __future__ import annotations

import bisect
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

HORIZON = 0.1  # seconds of a rate-limited link's bytes read ahead of it (its queue)
WINDOW = 4 * 1024 * 1024  # bytes in flight per direction of an unlimited link (a TCP window)
BUFFER = 16 * 1024  # the relay's receive buffers (the kernel doubles it)
MSS = 1460  # bytes per TCP segment the relay offers: Ethernet's, not loopback's 65,483
MAX_READ = 64 * 1024


@dataclass
class Link:
    """One direction's bottleneck: serialises bytes at `rate` bytes/s, one chunk after another."""

    rate: float | None = None
    free_at: float = 0.0  # when the bottleneck has sent everything scheduled so far

    def leaves(self, now: float, size: int) -> float:
        """When `size` bytes handed over at `now` have left the bottleneck (and books them)."""
        if self.rate is None:
            return now
        self.free_at = max(now, self.free_at) + size / self.rate
        return self.free_at

    def read_size(self) -> int:
        """Bytes to take per read: about 10 ms of the link, so that sharers interleave finely."""
        if self.rate is None:
            return MAX_READ
        return int(min(MAX_READ, max(1024, self.rate / 100)))

    def wait(self, now: float) -> float:
        """Seconds before the link may take more bytes (0: now)."""
        if self.rate is None:
            return 0.0
        return max(0.0, self.free_at - HORIZON - now)


@dataclass
class Record:
    """What one direction delivered: the total and (moment, running total) per write."""

    total: int = 0
    times: list[float] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)

    def add(self, when: float, size: int) -> None:
        self.total += size
        self.times.append(when)
        self.totals.append(self.total)

    def when(self, size: int) -> float:
        """The moment the running total first reached `size` bytes."""
        index = bisect.bisect_left(self.totals, size)
        if index == len(self.totals):
            raise ValueError(f"only {self.total} bytes were delivered, not {size}")
        return self.times[index]

    def at(self, moment: float) -> int:
        """The running total at `moment` (monotonic clock)."""
        index = bisect.bisect_right(self.times, moment)
        return self.totals[index - 1] if index else 0

    def rate(self, start: int, end: int) -> float:
        """Bytes/s delivered between the moments the total reached `start` and `end` bytes."""
        return (end - start) / (self.when(end) - self.when(start))


class Pipe:
    """One direction of one connection: bytes read from `src` wait their due time, then go to
    `dst`; an empty chunk is the end of the stream (a half-close, passed on in its turn)."""

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        link: Link,
        record: Record,
        delay: float,
        start: float,
    ) -> None:
        self.src, self.dst, self.link, self.record = src, dst, link, record
        self.delay = delay  # the one-way travel time
        self.start = start  # no byte leaves before this (the handshake's round trip)
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.ended = False  # src said EOF (a marker is queued)
        self.done = False  # the EOF was passed on
        self.blocked = False  # dst's buffer is full: wait until it is writable

    def wait(self, now: float) -> float | None:
        """Seconds until `src` may be read (None: not now, something else wakes us)."""
        if self.ended or self.queued >= WINDOW:
            return None
        return self.link.wait(now)

    def take(self, now: float, data: bytes) -> None:
        due = self.link.leaves(max(now, self.start), len(data)) + self.delay
        if data:
            self.queued += len(data)
        else:
            self.ended = True
        self.queue.append((due, data))

    def due(self) -> float | None:
        """When the first queued chunk is due (None: nothing queued or dst is full)."""
        return self.queue[0][0] if self.queue and not self.blocked else None

    def flush(self, now: float) -> None:
        """Write every chunk that is due, in order, as far as dst takes them."""
        self.blocked = False
        while self.queue and self.queue[0][0] <= now:
            due, data = self.queue[0]
            if not data:
                self.queue.popleft()
                self.done = True
                self.dst.shutdown(socket.SHUT_WR)
                return
            try:
                sent = self.dst.send(data)
            except BlockingIOError:
                sent = 0
            if sent:
                self.record.add(now, sent)
                self.queued -= sent
            if sent < len(data):
                self.queue[0] = (due, data[sent:])
                self.blocked = True
                return
            self.queue.popleft()


class Relay:
    """`with Relay(("127.0.0.1", port), latency=0.02) as relay:` relays `relay.address`."""

    def __init__(
        self,
        upstream: tuple[str, int],
        latency: float = 0.0,
        up_rate: float | None = None,
        down_rate: float | None = None,
        per_connection: bool = False,
    ) -> None:
        """`latency`: seconds of round trip added; `up_rate` (towards `upstream`) and
        `down_rate`: bytes/s, for all connections together unless `per_connection`."""
        self.upstream = upstream
        self.latency = latency
        self._rates = (up_rate, down_rate)
        self._shared = None if per_connection else (Link(up_rate), Link(down_rate))
        self.up, self.down = Record(), Record()
        self.connections = 0
        self._stalled = False
        self._closing = False
        self._pipes: dict[socket.socket, tuple[Pipe, Pipe]] = {}  # socket -> (its out, its in)
        self._masks: dict[socket.socket, int] = {}
        self._selector = selectors.DefaultSelector()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)  # inherited,
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)  # as this is
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._woken)
        self._thread = threading.Thread(target=self._loop, name="tcp-relay", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        return "http://{}:{}".format(*self.address)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(lambda: setattr(self, "_closing", True))
        self._thread.join(10)
        for sock in [*self._pipes, self._listener, self._wake_r, self._wake_w]:
            sock.close()
        self._selector.close()

    def stall(self) -> None:
        """From now on nothing moves, either way, until `resume`: a dead link, not a reset."""
        self._call(lambda: setattr(self, "_stalled", True))

    def resume(self) -> None:
        self._call(lambda: setattr(self, "_stalled", False))

    def _call(self, change: Callable[[], None]) -> None:
        change()  # a plain attribute; the relay's thread looks at it on waking
        self._wake_w.send(b"x")

    # -- the relay's thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            now = time.monotonic()
            for key, _ in self._selector.select(self._turn(now)):
                key.data(key.fileobj)

    def _turn(self, now: float) -> float | None:
        """Deliver what is due, choose what to watch; returns how long to wait at most."""
        if self._stalled:
            for sock in self._pipes:
                self._watch(sock, 0)
            return None
        wake: list[float] = []
        for sock, (out, _) in list(self._pipes.items()):
            if sock not in self._pipes:
                continue  # closed with its peer this turn
            try:
                out.flush(now)
            except OSError:
                self._close(sock)
                continue
            if out.done and self._pipes[sock][1].done:
                self._close(sock)
        for sock, (out, into) in self._pipes.items():
            mask = 0
            read_wait = out.wait(now)
            if read_wait == 0.0:
                mask |= selectors.EVENT_READ
            elif read_wait is not None:
                wake.append(read_wait)
            if into.blocked:
                mask |= selectors.EVENT_WRITE
            due = into.due()
            if due is not None:
                wake.append(max(0.0, due - now))
            self._watch(sock, mask)
        return min(wake, default=None)

    def _watch(self, sock: socket.socket, mask: int) -> None:
        old = self._masks.get(sock, 0)
        if mask == old:
            return
        if not old:
            self._selector.register(sock, mask, self._ready)
        elif not mask:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask, self._ready)
        self._masks[sock] = mask

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        server = socket.socket()
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)  # before the handshake:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)  # a buffer under one
        server.settimeout(5)  # loopback segment stalls the sender (measured: 0.78 x the rate)
        try:
            server.connect(self.upstream)
        except OSError:
            client.close()
            server.close()
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        up, down = self._shared or (Link(self._rates[0]), Link(self._rates[1]))
        now, half = time.monotonic(), self.latency / 2
        upward = Pipe(client, server, up, self.up, half, now + self.latency)
        downward = Pipe(server, client, down, self.down, half, now)
        self._pipes[client] = (upward, downward)
        self._pipes[server] = (downward, upward)
        self.connections += 1

    def _ready(self, sock: socket.socket) -> None:
        """`sock` is readable or writable: read one chunk of its outgoing direction."""
        if sock not in self._pipes or self._stalled:
            return
        out = self._pipes[sock][0]
        if not self._masks.get(sock, 0) & selectors.EVENT_READ or out.wait(time.monotonic()) != 0:
            return  # only writable (the next turn flushes), or a sharer took the link's turn
        try:
            data = sock.recv(out.link.read_size())
        except BlockingIOError:
            return
        except OSError:
            self._close(sock)
            return
        out.take(time.monotonic(), data)

    def _woken(self, sock: socket.socket) -> None:
        sock.recv(4096)

    def _close(self, sock: socket.socket) -> None:
        """Both ends of the connection `sock` belongs to, at once (a reset, or both done)."""
        out = self._pipes[sock][0]
        for end in (out.src, out.dst):
            if self._masks.pop(end, 0):
                self._selector.unregister(end)
            self._pipes.pop(end, None)
            end.close()
