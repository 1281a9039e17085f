"""How fast the PUTs go: the bandwidth limit for all of them together, and the stall rule.

Both count what really moved. The limit is a token bucket taken from in libcurl's READFUNCTION
(libcurl's MAX_SEND_SPEED_LARGE limits one transfer, not the sum). The stall rule counts bytes
the server acknowledged, read from the socket (TIOCOUTQ): libcurl's own low-speed rule counts
bytes written to the socket, and a slow link drains a send buffer of megabytes long after
libcurl's last write, which libcurl takes for a stall.
"""

from __future__ import annotations

import fcntl
import sys
import termios
import time
from collections.abc import Callable

import pycurl

BURST_SECONDS = 0.25  # the bucket holds this much of a second's bytes: a short burst after a lull
RESUME_BYTES = 16 * 1024  # a paused transfer goes on once this much (or what it lacks) is due


class RateLimit:
    """A token bucket: `rate` bytes per second for every PUT together (0: no limit)."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = clock()
        self.rate = rate
        self._tokens = self._capacity()

    def _capacity(self) -> float:
        return max(1.0, self.rate * BURST_SECONDS)

    def set_rate(self, rate: int) -> None:
        self.rate = rate
        self._tokens = min(self._tokens, self._capacity())

    def take(self, want: int) -> int:
        """How many of `want` bytes may be sent now (taken from the bucket): all of them, or a
        piece of at least RESUME_BYTES (or a bucketful), else none. Dribbling out what the
        bucket gained since the last call cost a callback per few hundred bytes (measured:
        28,000 reads for 6 MB at 2 MiB/s, most of a core)."""
        if not self.rate:
            return want
        now = self._clock()
        self._tokens = min(self._capacity(), self._tokens + (now - self._at) * self.rate)
        self._at = now
        got = min(want, int(self._tokens))
        if got < min(want, RESUME_BYTES, int(self._capacity())):
            return 0
        self._tokens -= got
        return got

    def wait(self, want: int) -> float:
        """Seconds until `want` bytes (at most a bucketful) may go."""
        if not self.rate:
            return 0.0
        missing = min(want, self._capacity()) - self._tokens
        return max(0.0, missing / self.rate - (self._clock() - self._at))

    def resume_wait(self, left: int) -> float:
        """Seconds until a transfer paused with `left` bytes to send should go on."""
        return self.wait(min(left, RESUME_BYTES))


def stall_rate(min_rate: int, limit: int, concurrency: int) -> int:
    """The stall rule's rate: `min_rate`, or half a transfer's share of the bandwidth limit when
    that is lower, so that a limit the operator set never looks like a stall."""
    if not limit:
        return min_rate
    return max(1, min(min_rate, limit // (2 * max(1, concurrency))))


def stalled(acknowledged: int, at_window_start: int, rate: int, window_seconds: float) -> bool:
    """At the end of a window: fewer than `rate` bytes/s reached the server during it."""
    return acknowledged - at_window_start < rate * window_seconds


def unacknowledged(curl: pycurl.Curl) -> int:
    """Bytes in the transfer's socket that the server has not acknowledged yet (Linux)."""
    fd = curl.getinfo(pycurl.ACTIVESOCKET)
    if fd < 0:
        return 0
    try:
        queued = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(queued, sys.byteorder, signed=True)


def acknowledged(curl: pycurl.Curl) -> int:
    """Bytes of the request that reached the server."""
    return int(curl.getinfo(pycurl.SIZE_UPLOAD_T)) - unacknowledged(curl)
