"""The PUT engine on libcurl (issue 12): what goes on the wire, from which descriptor, how fast,
and what is said when it fails. A raw HTTP server on loopback sees the bytes exactly as sent."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import certifi
import pycurl
import pytest

from tests.conftest import make_settings
from tests.helpers import done_soon, item_for, receipts, wait_for, write
from watcher.daemon.service import Service
from watcher.remote.api import SignedUrl
from watcher.remote.body import etag_matches
from watcher.remote.curlerrors import Failure, curl_fault, openssl_words
from watcher.remote.faults import Fault, Kind
from watcher.remote.network import Network
from watcher.remote.pacing import RateLimit, stall_rate, stalled
from watcher.remote.transfer import FileChanged, Transfer

DIRECT = Network(None, {}, certifi.where(), None)
QUERY = "X-Amz-Credential=AKIA%2F20250101%2Fus-east-1&X-Amz-Signature=5ecret+sig%3D&a=b%20c"


@dataclass
class Request:
    head: bytes
    body: bytes

    @property
    def line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.decode("latin-1").partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


@dataclass
class RawServer:
    """Answers every PUT 200 with the body's MD5 as ETag (or `etag`), after reading it at
    `rate` bytes/s when set (a slow link, with a small receive buffer so the sender feels it)."""

    rate: int = 0
    etag: str | None = None
    close_at_once: bool = False
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._one, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            if self.rate:
                # Small, so the sender feels the rate; not smaller: with 8 KiB, loopback TCP stalls
                # on its tiny window and the link runs at a third of `rate`.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            if self.close_at_once:
                return
            head, _, body = data.partition(b"\r\n\r\n")
            request = Request(head, b"")
            size = int(request.header("Content-Length") or 0)
            started = time.monotonic()
            while len(body) < size:
                chunk = conn.recv(4096 if self.rate else 65536)
                if not chunk:
                    return
                body += chunk
                if self.rate:
                    time.sleep(max(0.0, started + len(body) / self.rate - time.monotonic()))
            request.body = body
            self.requests.append(request)
            etag = self.etag if self.etag is not None else hashlib.md5(body).hexdigest()
            conn.sendall(f'HTTP/1.1 200 OK\r\nETag: "{etag}"\r\nContent-Length: 0\r\n\r\n'.encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # ends the accept
        self.sock.close()
        for thread in self.threads:
            thread.join(10)


def silent_server() -> tuple[socket.socket, list[socket.socket]]:
    """A server that accepts and then neither reads nor answers (a small receive buffer)."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    accepted: list[socket.socket] = []
    sock.settimeout(10)
    threading.Thread(target=lambda: accepted.append(sock.accept()[0]), daemon=True).start()
    return sock, accepted


@pytest.fixture
def server() -> Iterator[RawServer]:
    running = RawServer()
    yield running
    running.close()


def file_of(tmp_path: Path, data: bytes, name: str = "a.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- the promises on the wire ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 70_000, 3 * 1024 * 1024 + 7])
def test_the_body_goes_with_its_exact_length_and_no_other_header(server, tmp_path, size):
    data = os.urandom(size)
    sent = Transfer(5.0, 1, network=DIRECT).put(
        SignedUrl(f"{server.url}/b/a.csv?{QUERY}", None), item_for(file_of(tmp_path, data))
    )
    (request,) = server.requests
    assert request.body == data
    assert request.header("Content-Length") == str(size)
    assert request.header("Transfer-Encoding") is None
    assert request.header("Content-Type") is None and request.header("Content-MD5") is None
    assert request.header("Expect") is None  # no 100-continue wait
    assert sent.sha256 == hashlib.sha256(data).hexdigest() and sent.etag_verified is True


def test_a_configured_content_type_is_the_one_extra_header(server, tmp_path):
    transfer = Transfer(5.0, 1, "text/csv", network=DIRECT)
    transfer.put(SignedUrl(f"{server.url}/b/a.csv", None), item_for(file_of(tmp_path, b"x")))
    assert server.requests[0].header("Content-Type") == "text/csv"


@pytest.mark.parametrize(
    "path",
    [
        "/b/a%2Bb+c%20d.csv",  # + and an encoded space stay as they are
        "/b/%E2%82%AC%25.csv",  # non-ASCII, percent-encoded by the signer; an encoded %
        "/b/../c/./d.csv",  # dot segments are not resolved
        "/b/a%2fb.csv",  # lower-case escapes are not normalised
    ],
)
def test_the_url_is_sent_exactly_as_received(server, tmp_path, path):
    transfer = Transfer(5.0, 1, network=DIRECT)
    transfer.put(SignedUrl(f"{server.url}{path}?{QUERY}", None), item_for(file_of(tmp_path, b"x")))
    assert server.requests[0].line == f"PUT {path}?{QUERY} HTTP/1.1"


def test_the_file_is_read_from_the_descriptor_that_was_checked(server, tmp_path):
    """The path stops leading to the file right after the checked open (its folder is renamed,
    which leaves the file's own ctime alone): the bytes still go, from the descriptor."""
    (tmp_path / "folder").mkdir()
    path = file_of(tmp_path / "folder", b"checked version")
    item = item_for(path)

    def open_then_replace(target: Path, flags: int) -> int:
        fd = os.open(target, flags)
        (tmp_path / "folder").rename(tmp_path / "moved")
        return fd

    transfer = Transfer(5.0, 1, network=DIRECT, opener=open_then_replace)
    transfer.put(SignedUrl(f"{server.url}/b/a.csv", None), item)
    assert server.requests[0].body == b"checked version"


def test_a_file_that_shrinks_while_it_is_sent_is_a_changed_file(server, tmp_path):
    path = file_of(tmp_path, os.urandom(2 * 1024 * 1024))
    transfer = Transfer(5.0, 1, network=DIRECT)
    with pytest.raises(FileChanged, match="shrank"):
        transfer.put(
            SignedUrl(f"{server.url}/b/a.csv", None),
            item_for(path),
            lambda sent: os.truncate(path, 10),
        )


def test_a_file_that_grows_while_it_is_sent_is_a_changed_file(server, tmp_path):
    path = file_of(tmp_path, os.urandom(300_000))

    def grow(sent: int) -> None:
        with path.open("ab") as f:
            f.write(b"more")

    transfer = Transfer(5.0, 1, network=DIRECT)
    with pytest.raises(FileChanged, match="while it was being sent"):
        transfer.put(SignedUrl(f"{server.url}/b/a.csv", None), item_for(path), grow)
    assert len(server.requests[0].body) == 300_000  # cut at the settled size


# -- slow links, the stall rule and the bandwidth limit ------------------------------------------


@pytest.mark.long
def test_a_slow_link_finishes_when_it_keeps_moving(tmp_path):
    """1.25 MiB at 256 KiB/s takes 5 s, far past request_timeout_seconds: it is not a stall."""
    slow = RawServer(rate=256 * 1024)
    data = os.urandom(5 * 256 * 1024)
    try:
        transfer = Transfer(1.0, 1, network=DIRECT)
        sent = transfer.put(
            SignedUrl(f"{slow.url}/b/a.csv", None), item_for(file_of(tmp_path, data))
        )
    finally:
        slow.close()
    assert slow.requests[0].body == data and sent.seconds > 4


def test_a_stalled_put_is_a_service_fault_naming_the_rule(tmp_path):
    """A server that reads nothing: fewer than min_rate bytes/s for the timeout."""
    silent, accepted = silent_server()
    port = silent.getsockname()[1]
    try:
        transfer = Transfer(1.0, 1, network=DIRECT, min_rate=1024)
        with pytest.raises(Fault) as caught:
            transfer.put(
                SignedUrl(f"http://127.0.0.1:{port}/b/a.csv?{QUERY}", None),
                item_for(file_of(tmp_path, os.urandom(32 * 1024 * 1024))),
            )
    finally:
        silent.close()
        for conn in accepted:
            conn.close()
    assert caught.value.kind is Kind.SERVICE
    assert "fewer than 1024 bytes/s" in caught.value.reason
    assert "min_upload_rate" in caught.value.reason


@pytest.mark.parametrize("limit", [512 * 1024, 2 * 1024 * 1024])
def test_the_bandwidth_limit_holds_for_all_puts_together(server, tmp_path, limit):
    """Eight files, four at a time: the whole run takes bytes / limit, within 10 %."""
    total = 3 * limit
    items = [item_for(file_of(tmp_path, os.urandom(total // 8), f"{n}.csv")) for n in range(8)]
    transfer = Transfer(5.0, 4, network=DIRECT, rate_limit=limit)
    transfer.limit.take(limit)  # an empty bucket: the run starts with no saved-up burst
    started, cpu = time.monotonic(), time.thread_time()
    waiting, done = list(items), []
    while len(done) < len(items):
        while waiting and transfer.running < 4:
            transfer.start(SignedUrl(f"{server.url}/b/{len(waiting)}", None), waiting.pop(), bool)
        done += transfer.perform(1.0)
    seconds, cpu = time.monotonic() - started, time.thread_time() - cpu
    assert all(d.sent is not None for d in done)
    rate = total / seconds
    assert 0.9 * limit <= rate <= 1.1 * limit, f"{rate:.0f} B/s against a limit of {limit}"
    # Held back, the engine waits; it does not spin (it took 0.8 CPU-s per second of the run
    # when the bucket let a few hundred bytes go per call).
    assert cpu < 0.2 * seconds, f"the engine took {cpu:.2f} CPU-s in {seconds:.1f} s"


def test_progress_keeps_each_slot_alive_for_the_watchdog(tmp_path):
    slow = RawServer(rate=512 * 1024)
    transfer = Transfer(5.0, 2, network=DIRECT)
    try:
        for n in range(2):
            path = file_of(tmp_path, os.urandom(1024 * 1024), f"{n}.csv")
            transfer.start(SignedUrl(f"{slow.url}/b/{n}", None), item_for(path), bool)
        silences, done = [], []
        while len(done) < 2:
            done += transfer.perform(0.2)
            now = time.monotonic()
            silences += [beat.silent_for(now) for beat in transfer.beats()]
    finally:
        slow.close()
    assert [beat.name for beat in transfer.beats()] == ["put-1", "put-2"]
    assert max(silences) < 1.0


# -- what is said when it fails ----------------------------------------------------------------


def test_a_refused_connection_says_so_without_the_query(tmp_path):
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(Fault) as caught:
        Transfer(2.0, 1, network=DIRECT).put(
            SignedUrl(f"http://127.0.0.1:{port}/b/a.csv?{QUERY}", None),
            item_for(file_of(tmp_path, b"x")),
        )
    assert caught.value.kind is Kind.SERVICE
    assert caught.value.reason == (
        "PUT to storage failed: cannot connect to 127.0.0.1 (Connection refused)"
    )


def test_a_connection_closed_without_an_answer_is_a_service_fault(tmp_path):
    closing = RawServer(close_at_once=True)
    try:
        with pytest.raises(Fault) as caught:
            Transfer(2.0, 1, network=DIRECT).put(
                SignedUrl(f"{closing.url}/b/a.csv?{QUERY}", None),
                item_for(file_of(tmp_path, b"x")),
            )
    finally:
        closing.close()
    assert caught.value.kind is Kind.SERVICE
    assert "127.0.0.1" in caught.value.reason and "5ecret" not in caught.value.reason


def test_an_answer_that_never_comes_ends_after_the_timeout(tmp_path):
    mute, kept = silent_server()
    port = mute.getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(Fault) as caught:
            Transfer(0.5, 1, network=DIRECT).put(
                SignedUrl(f"http://127.0.0.1:{port}/b/a.csv", None),
                item_for(file_of(tmp_path, b"x")),
            )
    finally:
        mute.close()
        for conn in kept:
            conn.close()
    assert caught.value.reason == "PUT to storage failed: no answer from 127.0.0.1 within 0.5 s"
    assert time.monotonic() - started < 3


SECRET_MESSAGE = f"Failed to connect to h port 1 via http://u:pw@p/b?{QUERY}"


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (Failure(pycurl.E_COULDNT_RESOLVE_HOST, SECRET_MESSAGE, "h", ""), "cannot resolve h"),
        (
            Failure(pycurl.E_COULDNT_CONNECT, SECRET_MESSAGE, "h", "p:3128", os_errno=111),
            "cannot connect to the proxy p:3128 (Connection refused)",
        ),
        (
            Failure(pycurl.E_RECV_ERROR, SECRET_MESSAGE, "h", "p:3128", connect_code=407),
            "cannot connect to h through the proxy p:3128: 407 Proxy Authentication Required:"
            " check the user name and password in the proxy setting",
        ),
        (
            Failure(
                pycurl.E_PEER_FAILED_VERIFICATION,
                "SSL certificate problem: unable to get local issuer certificate",
                "h",
                "p:3128",
                verify_result=20,
            ),
            "certificate verify failed for h: set ca_bundle to your proxy's CA"
            " (unable to get local issuer certificate)",
        ),
        (
            Failure(pycurl.E_PEER_FAILED_VERIFICATION, SECRET_MESSAGE, "h", "", verify_result=10),
            "certificate verify failed for h: unknown reason",
        ),
        (
            Failure(
                pycurl.E_OPERATION_TIMEDOUT,
                SECRET_MESSAGE,
                "h",
                "",
                timeout_seconds=30,
            ),
            "cannot connect to h within 30 s",
        ),
        (
            Failure(pycurl.E_PARTIAL_FILE, SECRET_MESSAGE, "h", ""),
            "PARTIAL_FILE (libcurl error 18) with h",
        ),
        (
            Failure(pycurl.E_UNSUPPORTED_PROTOCOL, SECRET_MESSAGE, "h", "", connected=True),
            "h answered something that is not HTTP/1.1",
        ),
        (Failure(100, SECRET_MESSAGE, "h", ""), "h answered a header block too large to read"),
    ],
)
def test_reasons_are_built_from_codes_never_from_libcurls_text(failure, expected):
    fault = curl_fault(failure)
    assert fault.kind is Kind.SERVICE and fault.where == "put"
    assert fault.reason == f"PUT to storage failed: {expected}"
    assert "5ecret" not in fault.reason and "pw" not in fault.reason


def test_a_url_libcurl_refuses_is_final():
    fault = curl_fault(Failure(pycurl.E_URL_MALFORMAT, SECRET_MESSAGE, "h", ""))
    assert fault.kind is Kind.FINAL and "cannot be used" in fault.reason
    assert "5ecret" not in fault.reason


def test_a_refused_url_is_named_by_its_easy_code_not_the_multis():
    fault = curl_fault(Failure(pycurl.E_UNSUPPORTED_PROTOCOL, SECRET_MESSAGE, "h", ""))
    assert fault.kind is Kind.FINAL and fault.reason.endswith("(UNSUPPORTED_PROTOCOL)")


def test_openssl_words_never_carry_a_url():
    assert openssl_words("SSL certificate problem: self-signed certificate") == (
        "self-signed certificate"
    )
    assert openssl_words(f"SSL: no match for http://h/b?{QUERY}") == "unknown reason"


# -- integrity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("etag", "md5", "expected"),
    [
        ('"0cc175b9c0f1b6a831c399e269772661"', "0cc175b9c0f1b6a831c399e269772661", True),
        ("0CC175B9C0F1B6A831C399E269772661", "0cc175b9c0f1b6a831c399e269772661", True),
        ('"00000000000000000000000000000000"', "0cc175b9c0f1b6a831c399e269772661", False),
        ('"0cc175b9c0f1b6a831c399e269772661-2"', "0cc175b9c0f1b6a831c399e269772661", None),
        ("", "0cc175b9c0f1b6a831c399e269772661", None),
        ('W/"abc"', "0cc175b9c0f1b6a831c399e269772661", None),
    ],
)
def test_only_a_plain_md5_etag_is_checked(etag, md5, expected):
    assert etag_matches(etag, md5) is expected


def test_an_etag_that_is_not_the_md5_sent_fails_the_put(tmp_path):
    lying = RawServer(etag="0" * 32)
    try:
        with pytest.raises(Fault) as caught:
            Transfer(2.0, 1, network=DIRECT).put(
                SignedUrl(f"{lying.url}/b/a.csv", None), item_for(file_of(tmp_path, b"a"))
            )
    finally:
        lying.close()
    assert caught.value.kind is Kind.FILE and caught.value.status == 200
    assert caught.value.reason == (
        "the storage's ETag 00000000000000000000000000000000 is not the MD5 of the bytes sent"
        " (0cc175b9c0f1b6a831c399e269772661): the stored object may be corrupt"
    )


# -- the token bucket --------------------------------------------------------------------------


def test_the_bucket_gives_what_the_rate_allows():
    now = [0.0]
    bucket = RateLimit(1000, lambda: now[0])
    assert bucket.take(10_000) == 250  # a quarter of a second's bytes saved up at most
    assert bucket.take(1) == 0 and bucket.wait(100) == pytest.approx(0.1)
    now[0] = 0.5
    assert bucket.take(10_000) == 250  # capped: an idle spell saves no more
    now[0] = 0.625
    assert bucket.take(10_000) == 0  # no piece smaller than a bucketful, or what is wanted
    assert bucket.take(100) == 100
    now[0] = 0.9  # 25 left + 275 gained: a bucketful again
    assert bucket.take(10_000) == 250
    bucket.set_rate(0)
    assert bucket.take(10_000) == 10_000 and bucket.wait(1) == 0.0


def test_a_slot_is_reused_for_the_next_put(server, tmp_path):
    transfer = Transfer(5.0, 1, network=DIRECT)
    for n in range(3):
        path = file_of(tmp_path, bytes([n]) * 10, f"{n}.csv")
        transfer.put(SignedUrl(f"{server.url}/b/{n}", None), item_for(path))
    assert len(transfer.beats()) == 1 and len(server.requests) == 3


# -- in the daemon -----------------------------------------------------------------------------


def test_an_etag_that_is_not_the_md5_sent_is_retried_then_receipted_verified(
    daemon, folders, sandbox, logs_json
):
    sandbox.inject("put", count=1, status=200, headers={"ETag": f'"{"0" * 32}"'})
    write(folders.drop / "a.csv", b"payload")
    with daemon():
        done_soon(folders, "a.csv")
        wait_for(lambda: (folders.root / "state" / "receipts.jsonl").exists())
    (retry,) = logs_json.events("retrying")
    assert "is not the MD5 of the bytes sent" in retry["reason"]
    assert sandbox.stored("a.csv") == b"payload"
    (receipt,) = receipts(folders)
    assert receipt["etag_verified"] is True and receipt["attempts"] == 2


def test_an_etag_that_is_no_md5_proves_nothing(daemon, folders, sandbox):
    sandbox.inject(
        "put", count=1, status=200, headers={"ETag": '"9b2cf535f27731c974343645a3985328-2"'}
    )
    write(folders.drop / "a.csv", b"payload")
    with daemon():
        done_soon(folders, "a.csv")
        wait_for(lambda: (folders.root / "state" / "receipts.jsonl").exists())
    assert receipts(folders)[0]["etag_verified"] is None


def test_the_bandwidth_limit_changes_on_reload(sandbox, folders, logs_json):
    limited = make_settings(sandbox, folders, upload_rate_limit="16KiB")
    unlimited = make_settings(sandbox, folders, upload_rate_limit="")
    assert unlimited.upload_rate_limit == 0
    current = [limited]
    service = Service(limited, reload=lambda: current[0])
    thread = threading.Thread(target=service.run, name="test-daemon")
    thread.start()
    try:
        wait_for(service.ready.is_set, what="READY")
        write(folders.drop / "big.csv", os.urandom(1024 * 1024))  # 64 s at 16 KiB/s
        wait_for(lambda: service.uploader.progress.get("big.csv", (0, 0))[0] > 0)
        assert not (folders.done / "big.csv").exists()
        current[0] = unlimited
        service.request_reload()
        done_soon(folders, "big.csv", timeout=10)
    finally:
        service.request_stop()
        thread.join(30)
    (line,) = logs_json.events("reloaded")
    assert line["applied"] == ["upload_rate_limit"]


@pytest.mark.parametrize(
    ("min_rate", "limit", "concurrency", "expected"),
    [
        (1024, 0, 4, 1024),  # no limit: the setting
        (1024, 10 * 1024 * 1024, 4, 1024),  # a generous limit changes nothing
        (1024, 4096, 4, 512),  # 1 KiB/s a transfer at most: half of it counts as moving
        (1024, 1, 64, 1),  # never 0: a transfer that moves nothing is still a stall
    ],
)
def test_the_stall_rate_never_makes_a_limit_look_like_a_stall(
    min_rate, limit, concurrency, expected
):
    assert stall_rate(min_rate, limit, concurrency) == expected


@pytest.mark.parametrize(
    ("acknowledged", "at_start", "expected"),
    [(0, 0, True), (10_239, 0, True), (10_240, 0, False), (50_000, 45_000, True)],
)
def test_a_window_with_fewer_bytes_than_the_rate_is_a_stall(acknowledged, at_start, expected):
    assert stalled(acknowledged, at_start, 1024, 10.0) is expected
