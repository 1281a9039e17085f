"""The PUT over the links users have: slow, stalled, rate-limited, corrupting (issue 12).

The storage's signed URLs lead through tests/tcpproxy.py's relay, which plays the link and
records what the storage received and when; rates are measured there, from timestamps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import Captured, Daemon, make_settings
from tests.helpers import done_soon, receipts, wait_for, write
from tests.tcpproxy import Relay
from watcher.sandbox.productiv import Sandbox

MiB = 1024 * 1024
# A dead link is given up request_timeout_seconds after its last byte, give or take this much
# (scheduling on a loaded machine). Not libcurl's LOW_SPEED_* alone: its rate is an average over
# the last 5 s, so it gives up a link that died after a burst only 5 s + LOW_SPEED_TIME later.
STALL_SLACK_SECONDS = 2.0


@contextmanager
def storage_link(sandbox: Sandbox, **link: Any) -> Iterator[Relay]:
    """The sandbox's signed URLs lead through a relay that plays `link` (see `Relay`)."""
    parts = urlsplit(sandbox.url)
    with Relay((str(parts.hostname), int(parts.port or 80)), **link) as relay:
        sandbox.url_base = relay.url  # SigV2 signs the path, not the host: the URLs stay valid
        yield relay


# -- slow links finish, dead links are given up -----------------------------------------------


@pytest.mark.long
def test_a_large_file_over_a_slow_link_arrives_whole_in_one_put(
    daemon, folders, sandbox, logs_json
):
    """3 MiB at 400 KB/s with request_timeout_seconds 1.5: a MiB takes 2.6 s. A rule of one MiB
    per timeout (the urllib3 engine's) aborts it every time; a stall rule lets it through."""
    payload = os.urandom(3 * MiB)
    rate = 400_000
    with storage_link(sandbox, up_rate=rate) as relay, daemon(request_timeout_seconds=1.5):
        write(folders.drop / "big.bin", payload)
        done_soon(folders, "big.bin", timeout=30)
    assert sandbox.stored("big.bin") == payload
    assert sandbox.arrived["put"] == 1
    assert not logs_json.events("retrying")
    [uploaded] = logs_json.events("uploaded")
    assert uploaded["seconds"] > 4 * 1.5  # it took many timeouts' worth: the link was slow
    assert relay.up.rate(MiB // 4, len(payload)) == pytest.approx(rate, rel=0.1)


def test_a_dead_link_is_given_up_after_request_timeout_and_retried(
    daemon, folders, sandbox, logs_json
):
    """The link stops forwarding anything (no reset, no answer) under a PUT: it is aborted after
    request_timeout_seconds (never before), retried, and goes up once the link is back."""
    payload = os.urandom(2 * MiB)  # more than the sender's socket buffers take
    with storage_link(sandbox) as relay, daemon(request_timeout_seconds=1.0):
        relay.stall()
        write(folders.drop / "a.bin", payload)
        wait_for(lambda: relay.connections, what="the PUT's connection")
        stalled = time.monotonic()
        wait_for(lambda: logs_json.events("retrying"), timeout=20, what="the PUT given up")
        given_up = time.monotonic() - stalled
        relay.resume()
        done_soon(folders, "a.bin", timeout=20)
    assert 1.0 <= given_up < 1.0 + STALL_SLACK_SECONDS
    assert sandbox.stored("a.bin") == payload
    assert sandbox.count("put", 200) == 1
    assert folders.files(folders.failed) == []


# -- the bandwidth limit -----------------------------------------------------------------------


@pytest.mark.long
def test_upload_rate_limit_holds_for_all_puts_together_and_a_reload_changes_it(
    sandbox, folders, logs_json: Captured
):
    """4 files of 2 MiB, 4 at a time: 1 MiB/s in all (not per transfer), then 2 MiB/s after a
    reload, each within 10 %, measured where the storage receives the bytes."""
    files = {f"f{n}.bin": os.urandom(2 * MiB) for n in range(4)}
    limited = make_settings(sandbox, folders, upload_concurrency=4, upload_rate_limit="1MiB")
    faster = make_settings(sandbox, folders, upload_concurrency=4, upload_rate_limit="2MiB")
    with storage_link(sandbox) as relay, Daemon(limited, reload=lambda: faster) as service:
        for name, data in files.items():
            write(folders.drop / name, data)
        wait_for(lambda: relay.up.total >= 2.5 * MiB, timeout=20, what="2.5 MiB sent")
        service.request_reload()
        wait_for(lambda: logs_json.events("reloaded"), what="the reload")
        reloaded = time.monotonic()
        done_soon(folders, *files, timeout=30)
    assert {name: sandbox.stored(name) for name in files} == files
    [reload] = logs_json.events("reloaded")
    assert "upload_rate_limit" in reload["applied"]
    up = relay.up
    assert up.rate(MiB // 2, 2 * MiB + MiB // 2) == pytest.approx(MiB, rel=0.1)
    assert up.rate(up.at(reloaded + 0.25), up.total - MiB // 4) == pytest.approx(2 * MiB, rel=0.1)


# -- integrity against the storage's answer ----------------------------------------------------


def test_a_put_answered_with_another_md5_etag_is_retried(daemon, folders, sandbox, logs_json):
    """A plain-MD5 ETag that is not the MD5 of what was sent (a corrupting proxy or storage bug)
    fails that PUT; the retry's right ETag is recorded as verified."""
    sandbox.inject("put", etag='"0123456789abcdef0123456789abcdef"')
    write(folders.drop / "a.csv", b"payload")
    with daemon():
        done_soon(folders, "a.csv")
    assert sandbox.count("put", 200) == 2
    [retry] = logs_json.events("retrying")
    assert "ETag" in retry["reason"] and "0123456789abcdef" in retry["reason"]
    [receipt] = receipts(folders)
    assert receipt["outcome"] == "uploaded" and receipt["etag_verified"] is True


@pytest.mark.parametrize(
    "etag",
    [
        '"9b2cf535f27731c974343645a3985328-2"',  # a multipart upload's: not an MD5 of the body
        '"kms-encrypted-object"',  # SSE-KMS: an opaque value
        None,  # no ETag at all
    ],
)
def test_an_etag_that_is_not_a_plain_md5_is_not_checked(daemon, folders, sandbox, logs_json, etag):
    sandbox.inject("put", etag=etag if etag is not None else "")
    write(folders.drop / "a.csv", b"payload")
    with daemon():
        done_soon(folders, "a.csv")
    assert sandbox.count("put", 200) == 1
    assert not logs_json.events("retrying")
    [receipt] = receipts(folders)
    assert receipt["outcome"] == "uploaded" and receipt["etag_verified"] is None


def test_the_right_etag_is_recorded_as_verified(daemon, folders, sandbox):
    write(folders.drop / "a.csv", b"payload")
    write(folders.drop / "empty.csv", b"")
    with daemon():
        done_soon(folders, "a.csv", "empty.csv")
    assert [r["etag_verified"] for r in receipts(folders)] == [True, True]
