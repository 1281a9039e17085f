"""A hostile or odd API and storage, and secrets in every output (issue 11 items 5, 6, 10, 12
and 14's token newline; issue 10's Ceph expiry): whatever comes back, a classified Fault with a
reason, never a dead thread, and no credential in any text that leaves the process."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_settings
from tests.helpers import assert_no_secrets, cli, daemon_env, finishes, item_for, wait_for, write
from watcher import logs
from watcher.daemon import statusfile
from watcher.daemon.notify import SystemdNotifier
from watcher.logs import REDACT, TOKENS_KEPT, JsonFormatter, Redactor, TextFormatter
from watcher.remote.api import (
    MAX_REQUEST_LINE_BYTES,
    URL_PATH,
    ApiClient,
    SignedUrl,
    name_cost,
    packed,
    parse_token,
)
from watcher.remote.faults import Fault, Kind, classify_put
from watcher.remote.network import Network, ca_file
from watcher.remote.transfer import FileChanged, Sent, Transfer
from watcher.sandbox.productiv import CLIENT_ID, CLIENT_SECRET, Sandbox
from watcher.settings import FILE_TYPES, Settings

DEEP = "[" * 200_000  # json's C parser raises RecursionError, not ValueError
DIRECT = Network(None, {}, ca_file(None), None)  # no proxy, certifi's CAs


@pytest.fixture
def client(sandbox: Sandbox):
    api = ApiClient(make_settings(sandbox, None))
    yield api
    api.close()


# -- item 5: any answer is a classified fault ------------------------------------------------


def test_a_signed_url_with_an_impossible_port_fails_the_file_not_the_worker(
    daemon, folders, sandbox, logs_json
):
    sandbox.url_base = "https://127.0.0.1:99999"
    write(folders.drop / "a.csv")
    with daemon():
        wait_for((folders.failed / "a.csv.error.json").exists)
    sidecar = json.loads((folders.failed / "a.csv.error.json").read_text())
    assert "port" in sidecar["reason"]
    assert not logs_json.events("crashed")
    assert sandbox.count("put") == 0


def test_a_put_to_a_url_that_cannot_be_sent_is_a_final_fault(tmp_path):
    """The transfer's own guard, for a URL that reaches it without the API client's check."""
    transfer = Transfer(5.0, 1, network=DIRECT)
    for url in ("https://127.0.0.1:99999/b/k", "http://127.0.0.1:-1/b/k"):
        with pytest.raises(Fault) as caught:
            transfer.put(SignedUrl(url, None), item_for(write(tmp_path / "a.csv")))
        assert caught.value.kind is Kind.FINAL and "cannot be used" in caught.value.reason


@pytest.mark.parametrize("endpoint", ["token", "urls"])
def test_a_json_answer_nested_too_deep_is_a_service_fault(sandbox, client, endpoint):
    if endpoint == "urls":
        client.token()
    sandbox.inject(endpoint, count=5, body=DEEP)
    with pytest.raises(Fault) as caught:
        client.upload_urls(["a.csv"], None)
    assert caught.value.kind is Kind.SERVICE and "not JSON" in caught.value.reason


def test_a_deeply_nested_answer_delays_the_file_and_kills_no_thread(
    daemon, folders, sandbox, logs_json
):
    sandbox.inject("urls", count=2, body=DEEP)
    write(folders.drop / "a.csv")
    with daemon():
        wait_for((folders.done / "a.csv").exists)
    assert not logs_json.events("crashed")
    assert any("not JSON" in e.get("reason", "") for e in logs_json.events("retrying"))


def test_check_reports_a_token_answer_nested_too_deep(sandbox, folders):
    sandbox.inject("token", count=20, body=DEEP)
    result = cli("check", env=daemon_env(sandbox, folders))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "token: FAIL the token endpoint answered with a body that is not JSON" in result.stdout
    assert "Traceback" not in result.stderr


ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "[" * 5000, "{" * 3000, "\x00", "null", "1e999", "\ud800"]),
)
ODD_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=8,
)
ODD_STATUS = st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 413, 414, 429, 431, 503])
ODD_HEADERS = st.dictionaries(
    st.sampled_from(["Retry-After", "Date", "ETag"]),
    st.one_of(
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
        st.sampled_from(["Fri, 27 Nov 99999 07:16:00 GMT", "99999999999999999999", "-1"]),
    ),
    max_size=3,
)


def odd_url(port: int) -> st.SearchStrategy[str]:
    """Signed URLs from an API gone wrong, all aimed at the sandbox's loopback port or none."""
    return st.builds(
        "{}://{}{}/{}?{}".format,
        st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
        st.sampled_from(["127.0.0.1", "localhost", "", "[::1", "127.0.0.1\x00", "u:p@127.0.0.1"]),
        st.sampled_from([f":{port}", ":99999", ":0", ":-1", ":x", ":", ""]),
        st.text(max_size=20),
        st.text(max_size=30),
    )


def odd_answer(body: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"status": ODD_STATUS, "headers": ODD_HEADERS},
        optional={"body": body.map(lambda b: b if isinstance(b, str) else json.dumps(b))},
    )


@pytest.mark.long
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_answer_from_the_api_or_storage_is_a_classified_fault(sandbox, tmp_path, data):
    """Odd bodies, statuses, headers and URL maps, through the real client and the real PUT."""
    sandbox.clear()
    names = ["a.csv", "b.csv"]
    token = st.fixed_dictionaries(
        {}, optional={"access_token": ODD_TEXT | ODD_JSON, "expires_in": ODD_JSON}
    )
    url_map = st.dictionaries(
        st.sampled_from(names) | ODD_TEXT, odd_url(int(sandbox.url.rsplit(":", 1)[1])) | ODD_JSON
    )
    for endpoint, body in (("token", token | ODD_JSON), ("urls", url_map | ODD_JSON)):
        if data.draw(st.booleans(), label=f"odd {endpoint}"):
            sandbox.inject(endpoint, **data.draw(odd_answer(body), label=endpoint))
    put_answer = data.draw(st.none() | odd_answer(ODD_TEXT), label="put")
    if put_answer is not None:
        sandbox.inject("put", count=2, **put_answer)
    api = ApiClient(make_settings(sandbox, None, request_timeout_seconds=2.0))
    transfer = Transfer(2.0, 1, network=DIRECT)
    item = item_for(write(tmp_path / "a.csv", b"data"))
    try:
        answer = api.upload_urls(names, None)
        for value in answer.values():
            if isinstance(value, SignedUrl):
                transfer.put(value, item)
            else:
                assert value.kind is Kind.FINAL
    except Fault as fault:
        assert fault.reason and "\n" not in fault.reason
    except FileChanged:
        pass  # the storage accepted it and the file is the same: cannot happen, but is fine
    finally:
        api.close()


# -- answers without end: read bounded (answers.py) ------------------------------------------


@contextlib.contextmanager
def endless_server(trickle: bool) -> Iterator[int]:
    """A server that reads one request and answers 200 with a body that never ends: 1 MiB
    pieces as fast as it can, or one byte every 0.2 s (each within any read timeout)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                head, _, body = head.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                while length and len(body) < int(length.group(1)):
                    body += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[")
                while not stop.is_set():
                    conn.sendall(b"1," if trickle else b"1," * (1 << 19))
                    if trickle:
                        stop.wait(0.2)

    thread = threading.Thread(target=serve, name="endless", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("trickle", [False, True], ids=["flood", "trickle"])
def test_an_endless_put_answer_is_read_bounded_and_the_put_judged_on_its_status(tmp_path, trickle):
    transfer = Transfer(1.0, 1, network=DIRECT)
    item = item_for(write(tmp_path / "a.csv", b"data"))
    with endless_server(trickle) as port:
        url = SignedUrl(f"http://127.0.0.1:{port}/b/a.csv?Signature=x", None)
        sent = finishes(lambda: transfer.put(url, item), 10)
    assert isinstance(sent, Sent) and sent.status == 200, sent


@pytest.mark.parametrize("trickle", [False, True], ids=["flood", "trickle"])
def test_an_endless_api_answer_is_a_service_fault(sandbox, trickle):
    with endless_server(trickle) as port:
        token_url = f"http://127.0.0.1:{port}/oauth2/token"
        api = ApiClient(
            make_settings(sandbox, None, token_url=token_url, request_timeout_seconds=1)
        )
        try:
            fault = finishes(api.token, 10)
        finally:
            api.close()
    assert isinstance(fault, Fault) and fault.kind is Kind.SERVICE, fault
    assert "did not end within" in fault.reason


# -- item 14: a token with a trailing newline ------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "token"),
    [("abc\n", "abc"), ("  abc \r\n", "abc"), ("eyJ.a-b_c~d+e/f==", "eyJ.a-b_c~d+e/f==")],
)
def test_a_token_is_stripped_of_surrounding_whitespace(raw, token):
    assert parse_token({"access_token": raw, "expires_in": 60}) == (token, 60.0)


@pytest.mark.parametrize("raw", ["ab c", "ab\nc", "ab\x00c", "caf\u00e9", "\u2603"])
def test_a_token_that_cannot_be_sent_in_a_header_says_so(raw):
    with pytest.raises(Fault) as caught:
        parse_token({"access_token": raw})
    assert caught.value.kind is Kind.SERVICE and "cannot be sent in a header" in caught.value.reason


def test_a_token_with_a_trailing_newline_works(sandbox, client):
    answer = sandbox.issue_token()
    sandbox.inject(
        "token", body=json.dumps({**answer, "access_token": answer["access_token"] + "\n"})
    )
    assert isinstance(client.upload_urls(["a.csv"], None)["a.csv"], SignedUrl)


@pytest.mark.parametrize("bad", ["tok\x00en", "tok\u2603en"])
def test_an_unsendable_token_is_named_as_the_token_endpoints_fault(sandbox, client, bad):
    sandbox.inject("token", body=json.dumps({"access_token": bad, "expires_in": 60}))
    with pytest.raises(Fault) as caught:
        client.upload_urls(["a.csv"], None)
    assert caught.value.kind is Kind.SERVICE
    assert "token endpoint" in caught.value.reason and "cannot reach" not in caught.value.reason


# -- item 12: 431, and requests under 8 KiB by construction -----------------------------------


@pytest.mark.parametrize(
    ("costs", "budget", "groups"),
    [
        ([], 10, []),
        ([3, 3, 3], 6, [[3, 3], [3]]),
        ([6, 1], 6, [[6], [1]]),
        ([2, 7, 2], 6, [[2], [7], [2]]),  # too big alone: a group of one, refused with a reason
        ([1] * 5, 100, [[1] * 5]),
    ],
)
def test_packed(costs, budget, groups):
    assert packed(costs, lambda c: c, budget) == groups


PACK_SETTINGS = Settings(
    app_id="app id/with+odd chars",
    client_id="c",
    client_secret="s",
    api_url="https://api.example.com/prefix",
    token_url="https://login.example.com/t",
)


@given(
    st.lists(st.text(min_size=1, max_size=255), min_size=1, max_size=60),
    st.sampled_from([None, *FILE_TYPES]),
)
def test_signed_url_requests_are_packed_within_8_kib_exactly_as_sent(names, file_type):
    api = ApiClient(PACK_SETTINGS)
    try:
        budget = api.names_budget(file_type)
        for group in packed(names, name_cost, budget):
            params = [("filenames", n) for n in group] + (
                [("type", file_type)] if file_type else []
            )
            url = PACK_SETTINGS.api_url + URL_PATH.format(app_id="app%20id%2Fwith%2Bodd%20chars")
            prepared = requests.Request("GET", url, params=params).prepare()
            line = f"GET {prepared.path_url} HTTP/1.1"
            assert len(line) == MAX_REQUEST_LINE_BYTES - budget + sum(map(name_cost, group))
            assert len(line) <= MAX_REQUEST_LINE_BYTES
    finally:
        api.close()


def test_a_name_too_long_for_any_request_is_a_final_fault(sandbox):
    api = ApiClient(make_settings(sandbox, None, app_id="x" * MAX_REQUEST_LINE_BYTES))
    try:
        with pytest.raises(Fault) as caught:
            api.upload_urls(["a.csv"], None)
        assert caught.value.kind is Kind.FINAL and "too long" in caught.value.reason
        with pytest.raises(Fault) as caught:
            api.upload_urls(["a.csv", "b.csv"], None)
        assert caught.value.kind is Kind.REFUSED
    finally:
        api.close()
    assert sandbox.count("urls") == 0


def test_http_431_from_the_url_endpoint_splits_the_batch(daemon, folders, sandbox):
    sandbox.max_request_line = 1500
    names = [f"{n:03d}-{'x' * 40}.csv" for n in range(30)]
    for name in names:
        write(folders.drop / name)
    with daemon():
        wait_for(lambda: all((folders.done / n).exists() for n in names), timeout=30)
    assert sandbox.count("urls", 431) >= 1


def test_http_431_for_a_single_name_is_the_apis_trouble_not_the_files(
    daemon, folders, sandbox, logs_json
):
    """A 431 that splitting cannot cure (a front end with small header buffers and a large
    token): every file waits for the API, none goes to failed/."""
    sandbox.inject("urls", count=12, status=431)
    names = [f"{n}.csv" for n in range(3)]
    for name in names:
        write(folders.drop / name)
    with daemon():
        wait_for(lambda: all((folders.done / n).exists() for n in names), timeout=30)
    assert not folders.failed.exists() or not list(folders.failed.rglob("*"))
    assert any(e.get("what") == "api" and e["status"] == 431 for e in logs_json.events("retrying"))


def test_signed_url_requests_stay_within_8_kib_whatever_batch_size(daemon, folders, sandbox):
    sandbox.max_request_line = MAX_REQUEST_LINE_BYTES
    names = [f"{n:03d}-{'y' * 120}.csv" for n in range(120)]  # about 16 KiB of names
    for name in names:
        write(folders.drop / name)
    with daemon(batch_size=1000):
        wait_for(lambda: all((folders.done / n).exists() for n in names), timeout=30)
    assert sandbox.count("urls", 431) == 0
    assert sandbox.count("urls") <= 6  # packed full, not one name per request


# -- issue 10: Ceph's expired URL ------------------------------------------------------------

CEPH_DENIED = b"<Error><Code>AccessDenied</Code><Message></Message></Error>"
DENIED = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
MISMATCH = b"<Error><Code>SignatureDoesNotMatch</Code><Message></Message></Error>"


@pytest.mark.parametrize(
    ("status", "body", "url_expired", "kind"),
    [
        (403, CEPH_DENIED, True, Kind.EXPIRED),  # Ceph RGW, for a URL past its expiry
        (403, CEPH_DENIED, False, Kind.FILE),  # denied while the URL is still valid
        (403, DENIED, True, Kind.EXPIRED),
        (403, MISMATCH, True, Kind.FILE),  # a bad signature stays the file's problem
        (503, b"", True, Kind.SERVICE),
        (200, b"", True, None),
    ],
)
def test_classify_put_with_the_urls_own_expiry(status, body, url_expired, kind):
    assert classify_put(status, body, url_expired) is kind


def test_cephs_expired_url_answer_gets_a_fresh_url_not_a_failed_file(daemon, folders, sandbox):
    sandbox.expired_message = ""  # Ceph RGW: AccessDenied, empty Message
    sandbox.expire_next = 1
    write(folders.drop / "a.csv")
    with daemon(max_attempts=1):
        wait_for((folders.done / "a.csv").exists)
    assert sandbox.count("put", 403) == 1 and sandbox.count("urls") == 2
    assert not folders.failed.exists() or folders.files(folders.failed) == []


# -- item 6: secrets in files and command output ---------------------------------------------


def test_an_echoed_authorization_header_reaches_no_file_and_no_status_output(
    daemon, folders, sandbox, logs_json
):
    state = folders.root / "state"
    sandbox.inject("urls", count=100_000, status=503, echo_auth=True)
    write(folders.drop / "a.csv")
    metrics = folders.root / "metrics.prom"  # labels are closed sets: type, cause, class
    with daemon(status_seconds=0.1, metrics_textfile=metrics):
        status_text = wait_for(
            lambda: "Authorization" in (t := _read(state / statusfile.NAME)) and t,
            what="the echo in status.json",
        )
        sandbox.clear()
        sandbox.inject("urls", status=400, echo_auth=True)
        wait_for((folders.failed / "a.csv.error.json").exists)
    sidecar = (folders.failed / "a.csv.error.json").read_text()
    receipts = _read(state / "receipts.jsonl")
    for text in (status_text, sidecar, receipts):
        assert "Authorization: ***" in text
        assert_no_secrets(text)
    assert json.loads(receipts)["file"] == "a.csv"
    assert "productiv_watcher_files_failed" in metrics.read_text()
    assert_no_secrets(metrics.read_text())
    # A receipt written by an older version, unscrubbed: `status` scrubs what it prints.
    leaked = next(iter(sandbox._tokens))
    old = {"time": "2026-01-01T00:00:00Z", "file": "old.csv", "outcome": "failed"}
    old["reason"] = f"echoed Authorization: Bearer {leaked} and ?X-Amz-Signature=abc"
    with (state / "receipts.jsonl").open("a") as journal:
        journal.write(json.dumps(old) + "\n")
    env = {**sandbox.env(), "PRODUCTIV_DROP_DIR": str(folders.drop)}
    for args in (("status",), ("status", "old.csv"), ("status", "--json")):
        result = cli(*args, env=env)  # cli() fails on any leak in the output
        assert "old.csv" in result.stdout and leaked not in result.stdout


def test_check_never_prints_echoed_basic_credentials(sandbox, folders):
    sandbox.inject("token", count=20, status=400, echo_auth=True)
    result = cli("check", env=daemon_env(sandbox, folders, PRODUCTIV_CLIENT_AUTH="basic"))
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert result.returncode == 1
    assert "Authorization: ***" in result.stdout and basic not in result.stdout


def test_upload_never_prints_an_echoed_token(sandbox, tmp_path):
    sandbox.inject("urls", count=20, status=400, echo_auth=True)
    a = write(tmp_path / "a.csv")
    result = cli("upload", str(a), env=sandbox.env())  # cli() fails on any leak in the output
    assert result.returncode == 1 and "Authorization: ***" in result.stdout


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (  # urllib3's retry WARNING for a URL whose query starts with a bare flag
            "Retrying ... /b/k?x-id&X-Amz-Signature=abc&X-Amz-Credential=AK%2F1 HTTP/1.1",
            "Retrying ... /b/k?<redacted> HTTP/1.1",
        ),
        (
            "X-Amz-Signature=abc and signature=x&AWSAccessKeyId=K",
            "<redacted> and <redacted>&<redacted>",
        ),
        (
            '{"m": "refused, Authorization: Bearer eyJhbGciOi.x.y"}',
            '{"m": "refused, Authorization: ***"}',
        ),
        ("header was Bearer eyJhbGciOiJIUzI1NiJ9 then", "header was Bearer *** then"),
        ("sent Basic c2FuZGJveDpzZWNyZXQ= to it", "sent Basic *** to it"),
        ("basic checks passed; a bearer of news", "basic checks passed; a bearer of news"),
        ("file=what?.csv", "file=what?.csv"),
    ],
)
def test_the_scrubber_removes_credentials_it_was_never_told_about(line, expected):
    assert Redactor()(line) == expected


def test_scrubbed_json_stays_json_and_file_names_stay_exact():
    redact = Redactor()
    text = json.dumps({"m": 'see https://h/k?a=b"quoted" and Authorization: x\\"y'})
    assert "a=b" not in redact(text) and json.loads(redact(text))
    doc = {"file": "a?x=1.csv", "reason": "Bearer abcdefghijk", "up": [{"file": "b?y=2.csv"}]}
    assert redact.doc(doc) == {
        "file": "a?x=1.csv",
        "reason": "Bearer ***",
        "up": [{"file": "b?y=2.csv"}],
    }


def _record(secret: str) -> logging.LogRecord:
    record = logging.LogRecord("watcher.pipeline.uploader", logging.WARNING, "", 0, "", (), None)
    record.event = "retrying"
    record.fields = {
        "reason": f'the server said "{secret}" back',
        "answer": {"echo": secret, "none": None},
        "file": "a b.csv",
        "seconds": 1.0,
    }
    return record


@pytest.mark.parametrize("secret", ['se"cret', "back\\slash", "new\nline", "tab\there"])
@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_a_secret_that_quoting_escapes_is_scrubbed_in_both_log_formats(
    secret, formatter, monkeypatch
):
    """Scrubbing the finished line missed it: there it was `se\\"cret`, not `se"cret`."""
    redact = Redactor()
    redact.add([secret])
    monkeypatch.setattr(logs, "REDACT", redact)
    line = formatter.format(_record(secret))
    assert secret not in line and json.dumps(secret)[1:-1] not in line, line
    if isinstance(formatter, JsonFormatter):
        assert json.loads(line)["file"] == "a b.csv"


@pytest.mark.parametrize(
    "secret",
    [
        "back\\slashXY",
        "quote\"mark'Zq",
        "it'sOnlyOneQuote",  # repr quotes it with ", and then escapes no ' at all
        "s\u00e9cr\u00e9t+/=Kwonly",
        "tab\tstopQj",
        "emoji\U0001f600Astral",
    ],
)
@pytest.mark.parametrize(
    "spelled",
    [
        lambda s: json.dumps(s)[1:-1],  # an echoed JSON body, logged as text
        lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
        lambda s: json.dumps(json.dumps(s)),  # JSON inside JSON
        lambda s: repr(RuntimeError(f"refused {s}")),  # an exception inside another's message
        lambda s: repr(RuntimeError(f'refused "{s}"')),  # ... which picks its own quotes
        lambda s: repr(RuntimeError(repr(RuntimeError(s)))),  # two levels deep
        lambda s: repr(s.encode()),
        lambda s: ascii(s),
        lambda s: quote(s, safe=""),  # a form or a URL
        lambda s: quote(s),  # "/" kept
        lambda s: re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(s, safe="")),
        lambda s: quote_plus(s),
    ],
    ids=[
        "json",
        "json-utf8",
        "json-in-json",
        "repr",
        "repr-quoted",
        "repr-nested",
        "repr-bytes",
        "ascii",
        "percent",
        "percent-path",
        "percent-lower",
        "form",
    ],
)
@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_a_secret_already_escaped_in_the_text_is_scrubbed_too(
    secret, spelled, formatter, monkeypatch
):
    """A secret with a backslash inside an exception's repr was `back\\\\slash`: no longer
    the secret as registered, so it went out (and JSON doubled it again)."""
    redact = Redactor()
    redact.add([secret])
    monkeypatch.setattr(logs, "REDACT", redact)
    record = logging.LogRecord("watcher.remote.api", logging.WARNING, "", 0, "", (), None)
    record.event, record.fields = "retrying", {"reason": f"the API said: {spelled(secret)}"}
    line = formatter.format(record)
    assert "***" in line, line
    for word in re.findall(r"[A-Za-z]{4,}", secret):  # in every spelling of these secrets
        assert word not in line, line


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_a_traceback_with_an_escaped_secret_keeps_the_lines_head(formatter, monkeypatch):
    """In text lines the traceback was scrubbed only with the whole line: withheld, it took the
    time, the level and the event name with it (review)."""
    redact = Redactor()
    redact.add(["pa'ss\"w\u00f6rd42"])
    monkeypatch.setattr(logs, "REDACT", redact)
    try:
        raise RuntimeError(repr(RuntimeError("pa'ss\"w\u00f6rd42")))
    except RuntimeError:
        record = logging.LogRecord("watcher", logging.ERROR, "", 0, "", (), sys.exc_info())
    record.event = "crashed"
    line = formatter.format(record)
    assert "crashed" in line and "ERROR" in line.upper() and "withheld whole" in line, line
    assert "rd42" not in line


@pytest.mark.parametrize(
    ("secret", "text"),
    [
        (
            "p\u00e4ssw\u00f6rd99",
            "report \u2013 q3.csv: proxy said b'p\\xc3\\xa4ssw\\xc3\\xb6rd99'",
        ),
        ("tok\U0001f600en1234", 'file \udcff.csv {"echo": "tok\\ud83d\\ude00en1234"}'),
    ],
    ids=["bytes-repr-beside-an-en-dash", "surrogate-pair-beside-a-lone-surrogate"],
)
def test_the_rest_of_the_text_never_hides_an_escaped_secret(secret, text):
    """The text was recoded whole: one character outside Latin-1, or one lone surrogate (a
    file name that is not UTF-8), anywhere in it, and the secret went out (review)."""
    redact = Redactor()
    redact.add([secret])
    assert redact(text).startswith("***")


@pytest.mark.parametrize(
    ("secret", "line"),
    [
        ("\\a\\b\\c\\d", "\\" * 100_000),
        ("\u00e9a\u00e9b\u00e9c", "\\" * 100_000),
        ("a\\\\b\\\\c", "a" + "\\" * 100_000),
        ("#q8$kL!2@x", "%" * 100_000),
        ("!!!!!!!!", "\\x" * 50_000),
    ],
)
def test_an_escaped_secret_is_found_in_time_linear_in_the_line(secret, line):
    """A regex for every spelling took 28-46 s on 30,000 backslashes (quadratic), and a producer
    can put that many in the lock file's holder, which `status` prints (review)."""
    redact = Redactor()
    redact.add([secret])
    started = time.perf_counter()
    assert redact(line) == line  # nothing there
    assert "***" in redact(line + json.dumps(secret))  # after the run, escaped
    assert time.perf_counter() - started < 5  # linear: 0.2-0.4 s; quadratic: many minutes


@pytest.mark.parametrize("secret", ["null", "true", "level", "event", "1.0,"])
def test_a_secret_that_spells_json_leaves_json_lines_valid(secret, monkeypatch):
    """A token that happened to be `null` made every later line `"metrics_textfile": ***`."""
    redact = Redactor()
    redact.add([secret])
    monkeypatch.setattr(logs, "REDACT", redact)
    doc = json.loads(JsonFormatter().format(_record(secret)))
    assert doc["event"] == "retrying" and doc["level"] == "warning" and doc["seconds"] == 1.0
    assert doc["reason"] == 'the server said "***" back' and doc["answer"]["echo"] == "***"


# -- item 10: the token cache is bounded ------------------------------------------------------


def test_the_scrubber_keeps_the_configured_secrets_and_only_the_last_few_tokens():
    redact = Redactor()
    redact.add(["configured-secret"])
    tokens = [f"token-{n:06d}" for n in range(20_000)]
    for token in tokens:
        redact.add_token(token)
    assert len(redact) == 1 + TOKENS_KEPT
    assert redact(f"a {tokens[-1]} b {tokens[-TOKENS_KEPT]} configured-secret") == "a *** b *** ***"
    assert tokens[0] in redact(tokens[0])  # long expired: no longer looked for
    started = time.perf_counter()
    for _ in range(1000):
        redact("2026-11-27T07:15:00.000Z INFO    uploaded file=a.csv bytes=10 seconds=0.1")
    assert time.perf_counter() - started < 0.5  # was 23.5 ms per line after a year of tokens


def test_every_fetched_token_is_scrubbed_but_the_scrubber_stays_small(sandbox, client):
    for _ in range(3 * TOKENS_KEPT):
        client.upload_urls(["a.csv"], None)
        sandbox.forget_tokens()  # the next call gets a 401, then a fresh token
    current = client.token()
    assert sandbox.count("token") >= 3 * TOKENS_KEPT
    assert REDACT(f"x {current} y") == "x *** y"
    assert len(REDACT) <= TOKENS_KEPT + 4  # plus the few configured secrets of this process


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_a_status_text_is_one_line_of_the_notify_protocol(tmp_path, monkeypatch):
    """A newline in an API's words must not forge another assignment (WATCHDOG=1, MAINPID=)."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        SystemdNotifier().send("STATUS=retrying: bad\nWATCHDOG=1\nMAINPID=1", "READY=1")
        sent = server.recv(4096).decode()
    assert sent.splitlines() == ["STATUS=retrying: bad WATCHDOG=1 MAINPID=1", "READY=1"]


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
@pytest.mark.parametrize(
    "fields",
    [
        {"body": '{"authorization": "Token abcdefghijkl"}'},  # quoted: the pattern missed it
        {"reason": "Authorization:\tToken abcdefghijkl"},  # a tab, escaped by the quoting
        {"answer": {"echo": "s\u00e9cr\u00e9t-value"}},  # a dict in text: it was \\u00e9
        {"answer": {"s\u00e9cr\u00e9t-value": 1}},  # a key
    ],
)
def test_what_quoting_would_hide_is_scrubbed_before_it(fields, formatter, monkeypatch):
    redact = Redactor()
    redact.add(["s\u00e9cr\u00e9t-value"])
    monkeypatch.setattr(logs, "REDACT", redact)
    record = logging.LogRecord("watcher.remote.api", logging.WARNING, "", 0, "", (), None)
    record.event, record.fields = "retrying", fields
    line = formatter.format(record)
    for secret in ("abcdefghijkl", "s\u00e9cr\u00e9t-value", "s\\\\u00e9cr\\\\u00e9t-value"):
        assert secret not in line, line
