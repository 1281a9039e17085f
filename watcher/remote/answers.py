"""An answer's body, read bounded: at most so many bytes, for at most so many seconds.

A hostile or broken server can answer with an endless body (a PUT answered so grew the daemon
by 2 GiB in 8 s, the worker never came back) or trickle it a byte at a time, each byte within
the read timeout. So a body is read in pieces up to a size and a time; what is left is never
read and its connection is closed. The answer is judged on its status and what was read.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from urllib3 import BaseHTTPResponse
from urllib3.exceptions import HTTPError

PIECE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes
    whole: bool  # False: cut at the size or time limit, or by the connection


def bounded(
    response: BaseHTTPResponse,
    limit: int,
    seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> Body:
    """Read up to `limit` bytes of the body within `seconds`; a whole body hands the connection
    back to its pool, a cut one closes it (the rest is never read)."""
    deadline = clock() + seconds
    pieces: list[bytes] = []
    size = 0
    try:
        while size <= limit and clock() < deadline:
            piece = response.read1(min(PIECE_BYTES, limit + 1 - size), decode_content=True)
            if not piece:
                response.release_conn()
                return Body(b"".join(pieces), whole=True)
            pieces.append(piece)
            size += len(piece)
    except (HTTPError, OSError):
        pass  # cut by the connection: judged on what came
    with contextlib.suppress(OSError):
        response.close()
    response.release_conn()
    return Body(b"".join(pieces)[:limit], whole=False)
