"""The main loop under hostile and unlucky conditions: signal bursts, stops while the API hangs,
chores that meet I/O errors, reloads that cannot or must not be applied, bad settings."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.conftest import Child, Folders, wait_for
from tests.test_cli import daemon_env
from tests.test_pipeline import write
from watcher.sandbox import Sandbox


def status_stamp(folders: Folders) -> float:
    try:
        doc = json.loads((folders.root / "state" / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return 0.0
    return float(doc.get("updated_epoch", 0.0))


def started(sandbox: Sandbox, folders: Folders, **extra: str) -> Child:
    child = Child(daemon_env(sandbox, folders, PRODUCTIV_STATUS_SECONDS="0.2", **extra))
    wait_for(lambda: " ready " in child.stderr or child.proc.poll() is not None, what="READY")
    return child


def test_a_burst_of_sighups_leaves_the_daemon_answering_and_stoppable(sandbox, folders):
    child = started(sandbox, folders)
    try:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:  # as from a shell loop: kill -HUP as fast as it goes
            os.kill(child.proc.pid, signal.SIGHUP)
        write(folders.drop / "after.csv", b"after the burst")
        wait_for(lambda: (folders.done / "after.csv").exists(), timeout=10, what="an upload")
        stamp = status_stamp(folders)
        wait_for(lambda: status_stamp(folders) > stamp, timeout=10, what="the status file")
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == 0
    finally:
        child.close()
    assert "Traceback" not in child.stderr


def test_two_sigterms_in_quick_succession_end_it(sandbox, folders):
    for _ in range(3):
        child = started(sandbox, folders)
        try:
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGTERM)
            assert child.wait(10) == 0
        finally:
            child.close()


def test_a_stop_does_not_wait_for_a_hanging_token_call(sandbox, folders):
    sandbox.inject("token", count=1, delay=30)
    child = started(sandbox, folders, PRODUCTIV_REQUEST_TIMEOUT_SECONDS="60")
    try:
        write(folders.drop / "a.csv", b"a")
        wait_for(lambda: sandbox.arrived["token"] == 1, what="the token call")
        begun = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
        assert time.monotonic() - begun < 3.0  # not the 20-s shutdown_timeout_seconds
    finally:
        child.close()
    assert folders.files(folders.drop) == ["a.csv"]
