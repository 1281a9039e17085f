"""Long runs, behind `make soak` (not part of `make test`): the full-size volume of the issue."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.helpers import Child, Folders, daemon_env, wait_for

pytestmark = pytest.mark.soak


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(900)
def test_20000_waiting_and_a_burst_of_5000_all_go_through_once_in_bounded_memory(
    sandbox, folders: Folders
):
    """With a rescan every 3 s, so that every queued file is noticed again and again while it
    waits: each such notice must wait for its name's release, not be uploaded twice or polled."""
    for n in range(20_000):
        (folders.drop / f"b{n:05}.csv").write_bytes(b"backlog")
    child = Child(
        daemon_env(
            sandbox,
            folders,
            PRODUCTIV_SETTLE_SECONDS="0.2",
            PRODUCTIV_RETRY_MAX_SECONDS="0.2",
            PRODUCTIV_BATCH_SIZE="100",
            PRODUCTIV_RESCAN_SECONDS="3",
        )
    )
    try:
        started = time.monotonic()
        wait_for(lambda: " ready " in child.stderr, timeout=60)
        ready = time.monotonic() - started
        (folders.drop / "users").mkdir()
        for n in range(5_000):
            (folders.drop / "users" / f"u{n:04}.csv").write_bytes(b"burst")
        wait_for(lambda: sandbox.count("put", 200) >= 25_000, timeout=600)
        wait_for(lambda: not folders.files(folders.drop), timeout=60)
        elapsed = time.monotonic() - started
        peak = peak_rss_mib(child.proc.pid)
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0
    finally:
        child.close()
    print(f"\nready after {ready:.1f} s, 25,000 files in {elapsed:.1f} s, peak RSS {peak:.0f} MiB")
    assert len(folders.files(folders.done)) == 25_000
    assert sandbox.count("put", 200) == 25_000  # each once
    assert peak < 150
