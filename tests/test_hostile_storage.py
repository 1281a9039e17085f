"""A hostile or odd storage against the libcurl PUT engine: whatever a raw socket answers, the
PUT ends within seconds as a classified Fault (or a success where the answer says so), with no
signed query in the reason and no thread left behind."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import DIRECT, finishes, item_for, write
from watcher.remote.api import SignedUrl
from watcher.remote.faults import Fault, Kind
from watcher.remote.transfer import Sent, Transfer

Script = Callable[[socket.socket], None]
SECRET = "Signature=s3cr3t"


def read_request(conn: socket.socket) -> bytes:
    """The request's head and its whole body (Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?i)content-length:\s*(\d+)", head)
    length = int(found.group(1)) if found else 0
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


@contextlib.contextmanager
def storage(script: Script) -> Iterator[int]:
    """One connection on loopback, served by `script`; its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                script(conn)

    thread = threading.Thread(target=serve, name="storage", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


def answer(raw: bytes) -> Script:
    def script(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(raw)

    return script


def early(raw: bytes, hold_seconds: float = 0.0) -> Script:
    """Answers after the head only, before the body was read; then closes, or first keeps the
    connection open for `hold_seconds`, reading nothing more."""

    def script(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(raw)
        threading.Event().wait(hold_seconds)

    return script


def reset_midway(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def hundred_then_silence(conn: socket.socket) -> None:
    read_request(conn)
    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    threading.Event().wait(4)


S3_ERROR = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
CASES: dict[str, tuple[Script, Kind | None]] = {
    "redirect": (
        answer(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:1/x?"
            + SECRET.encode()
            + b"\r\nContent-Length: 0\r\n\r\n"
        ),
        Kind.SERVICE,
    ),
    "100 then 403": (
        answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s"
            % (len(S3_ERROR), S3_ERROR)
        ),
        Kind.FILE,
    ),
    "100 then silence": (hundred_then_silence, Kind.SERVICE),
    # the body was not all sent: never a success, whatever the status said
    "200 early, closed": (early(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), Kind.SERVICE),
    "403 early, held open": (
        early(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(S3_ERROR), S3_ERROR),
            hold_seconds=4,
        ),
        Kind.FILE,
    ),
    "200 early, held open": (
        early(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", hold_seconds=4),
        Kind.SERVICE,
    ),
    "reset midway": (reset_midway, Kind.SERVICE),
    "http/1.0 without length": (answer(b"HTTP/1.0 200 OK\r\n\r\nstored"), None),
    "not http": (answer(b"SSH-2.0-OpenSSH_9.2\r\n"), Kind.SERVICE),
    "chunked": (
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        None,
    ),
    "huge header block": (
        answer(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 200_000 + b"\r\n\r\n"),
        Kind.SERVICE,
    ),
    "many headers": (
        answer(
            b"HTTP/1.1 200 OK\r\n"
            + b"X-Pad: aaaaaaaaaaaaaaaa\r\n" * 20_000
            + b"Content-Length: 0\r\n\r\n"
        ),
        Kind.SERVICE,
    ),
    "garbage status": (answer(b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"), Kind.SERVICE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_odd_storage_answer_ends_as_a_classified_fault_or_a_success(tmp_path, case):
    script, kind = CASES[case]
    transfer = Transfer(1.0, 1, network=DIRECT)
    item = item_for(write(tmp_path / "a.csv", b"data" * 1_000_000))
    before = threading.active_count()
    with storage(script) as port:
        url = SignedUrl(f"http://127.0.0.1:{port}/b/a.csv?{SECRET}", None)
        outcome = finishes(lambda: transfer.put(url, item), 8)
    if kind is None:
        assert isinstance(outcome, Sent), outcome
    else:
        assert isinstance(outcome, Fault) and outcome.kind is kind, outcome
        assert "s3cr3t" not in outcome.reason and "?" not in outcome.reason
    assert threading.active_count() <= before + 1
