"""What an operator does by hand beside the service, as root, must not break the service.

The service runs as its own user (here `nobody`, in a drop group, over folders laid out as
install.sh makes them); the operator runs the daemon, or `retry-failed`, as root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Child, clean_env, done_soon
from tests.unprivileged import field, installed_layout


def owners(*paths: Path) -> set[int]:
    return {path.stat().st_uid for path in paths}


@pytest.mark.long
def test_a_daemon_run_by_hand_as_root_leaves_nothing_the_service_cannot_use(sandbox, as_nobody):
    with field(as_nobody) as f:
        installed_layout(f)
        state = f.folders.root / "state"
        f.produce(f.folders.drop / "users" / "by-root.csv", b"root's turn")
        env = {
            **sandbox.env(),
            "PRODUCTIV_DROP_DIR": str(f.folders.drop),
            "PRODUCTIV_SETTLE_SECONDS": "0.2",
            "PRODUCTIV_LOG_FORMAT": "json",
        }
        umask = os.umask(0o022)  # root's usual umask: what it makes is 0755 / 0644
        try:
            by_hand = Child(env)
        finally:
            os.umask(umask)
        try:
            done_soon(f.folders, "users/by-root.csv")
            by_hand.send_signal(signal.SIGTERM)
            assert by_hand.wait(15) == 0
        finally:
            by_hand.close()
        made = [f.folders.done / "users", state / "receipts.jsonl", state / "status.json"]
        made.append(f.folders.drop / ".productiv-watcher.lock")
        assert owners(*made) == {f.service}, [(p, p.stat().st_uid) for p in made]

        f.produce(f.folders.drop / "users" / "by-service.csv", b"the service's turn")
        f.start(sandbox)
        done_soon(f.folders, "users/by-service.csv", timeout=10)
        f.stop()
        assert not f.events("folder_not_writable") and not f.events("receipt_failed")
        receipts = (state / "receipts.jsonl").read_text()
        assert "users/by-service.csv" in receipts


def test_retry_failed_run_as_root_makes_type_folders_the_service_can_move_files_out_of(
    sandbox, as_nobody
):
    with field(as_nobody) as f:
        installed_layout(f)
        (f.folders.drop / "users").rmdir()  # gone, or never made (a template instance)
        refused = f.folders.failed / "users"
        refused.mkdir()
        os.chown(refused, f.service, f.drop_gid)
        f.produce(refused / "again.csv", b"try me again")
        umask = os.umask(0o022)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "watcher", "retry-failed"],
                env={**clean_env(), "PRODUCTIV_DROP_DIR": str(f.folders.drop)},
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            os.umask(umask)
        assert done.returncode == 0, done.stderr
        assert owners(f.folders.drop / "users") == {f.service}
        f.start(sandbox)
        done_soon(f.folders, "users/again.csv", timeout=10)
        f.stop()
        assert not f.events("folder_not_writable")
