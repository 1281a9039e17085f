"""Running it for years: receipts, status, retry-failed, retention, metrics, and a watch that
knows when it has gone deaf."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Captured
from tests.helpers import Child, Folders, cli, done_soon, plant, receipts, wait_for, write
from watcher.daemon import statusfile
from watcher.daemon.instance import DropLock
from watcher.disk.folders import LOCK_NAME
from watcher.items import printable
from watcher.pipeline.deafness import CANARY_NAME, HUNG, Canary, StatProbe
from watcher.pipeline.receipts import Journal
from watcher.sandbox.productiv import Sandbox


def test_every_outcome_is_receipted_with_the_streamed_checksum(daemon, folders, sandbox):
    data = os.urandom(300_000)
    write(folders.drop / "users" / "people.csv", data)
    write(folders.drop / "big.csv", b"x" * 300_001)
    with daemon(max_file_size=300_000):
        done_soon(folders, "users/people.csv")
        wait_for(lambda: (folders.failed / "big.csv").exists())
        wait_for(lambda: len(receipts(folders)) == 2)
    by_file = {r["file"]: r for r in receipts(folders)}
    up = by_file["users/people.csv"]
    assert up["outcome"] == "uploaded" and up["sha256"] == hashlib.sha256(data).hexdigest()
    assert up["bytes"] == 300_000 and up["status"] == 200 and up["attempts"] == 1
    assert (
        up["object"]
        == "/productiv-data/log-connector-data/productiv-ai/sandbox-app/users/people.csv"
    )
    assert up["moved_to"] == "done/users/people.csv" and up["type"] == "users"
    assert up["seconds"] >= 0 and up["time"].endswith("Z")
    failed = by_file["big.csv"]
    assert failed["outcome"] == "failed" and "max_file_size" in failed["reason"]
    assert failed["moved_to"] == "failed/big.csv" and failed["sha256"] is None
    put = next(r for r in sandbox.requests if r.endpoint == "put")
    assert put.headers["Content-Length"] == "300000" and "Transfer-Encoding" not in put.headers
    if shutil.which("jq"):
        out = subprocess.run(
            ["jq", "-r", ".file", str(folders.root / "state" / "receipts.jsonl")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert sorted(out) == ["big.csv", "users/people.csv"]


def test_the_journal_rotates_by_size_and_keeps_n_files(tmp_path):
    journal = Journal(tmp_path, max_bytes=4096, keep=2)
    for n in range(200):
        journal.append([{"file": f"f{n:03}.csv", "outcome": "uploaded", "pad": "x" * 40}])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["receipts.jsonl", "receipts.jsonl.1", "receipts.jsonl.2"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    newest = list(journal.newest_first())
    assert newest[0]["file"] == "f199.csv"
    assert [r["file"] for r in newest] == sorted((r["file"] for r in newest), reverse=True)


def config_file(folders: Folders, sandbox: Sandbox, extra: str = "") -> Path:
    path = folders.root / "config.toml"
    path.write_text(
        f'app_id = "{sandbox.app_id}"\nclient_id = "{sandbox.client_id}"\n'
        f'api_url = "{sandbox.url}"\ntoken_url = "{sandbox.url}/oauth2/token"\n'
        f'drop_dir = "{folders.drop}"\nsettle_seconds = 0.3\nstatus_seconds = 0.3\n{extra}'
    )
    return path


@pytest.mark.long
def test_status_of_a_running_daemon_and_of_a_file(sandbox, folders):
    config = config_file(folders, sandbox)
    assert cli("status", config=config).returncode == 3  # never started
    # the PUT is held 6 s: each `status` is a new Python process, over 1 s on a loaded machine
    sandbox.inject("put", count=1, delay=6.0)
    write(folders.drop / "contracts" / "deal.pdf", b"%PDF")
    child = Child({"PRODUCTIV_CLIENT_SECRET": sandbox.client_secret}, "--config", str(config))
    try:
        wait_for(lambda: sandbox.arrived["put"] == 1)
        # the status file follows within status_seconds, while the PUT is held

        def uploading() -> bool:
            shown = cli("status", config=config)
            print(shown.returncode, shown.stdout, shown.stderr)  # the last one, if it fails
            return "uploading contracts/deal.pdf" in shown.stdout

        wait_for(uploading, what="status naming the PUT in flight")
        busy = cli("status", config=config)
        assert busy.returncode == 0, busy.stdout + busy.stderr
        assert "running since" in busy.stdout
        done_soon(folders, "contracts/deal.pdf")
        wait_for(lambda: '"uploaded": 1' in cli("status", "--json", config=config).stdout)
        doc = json.loads(cli("status", "--json", config=config).stdout)
        assert doc["running"] and doc["recent"][0]["file"] == "contracts/deal.pdf"
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        child.close()
    stopped = cli("status", config=config)
    assert stopped.returncode == 3 and "not running" in stopped.stdout
    one = cli("status", "deal.pdf", config=config)
    assert one.returncode == 0
    assert "uploaded contracts/deal.pdf -> done/contracts/deal.pdf" in one.stdout
    assert hashlib.sha256(b"%PDF").hexdigest() in one.stdout
    assert cli("status", "never-seen.csv", config=config).returncode == 1


def test_retry_failed_moves_files_back_by_reason_and_age(daemon, folders, sandbox):
    write(folders.drop / "users" / "big.csv", b"x" * 20)
    write(folders.drop / "small.csv", b"x")
    sandbox.refuse_names = {"small.csv"}
    with daemon(max_file_size=10):
        wait_for(lambda: len(list(folders.failed.rglob("*.error.json"))) == 2)
    config = config_file(folders, sandbox)
    assert "0 file(s)" in cli("retry-failed", "--older-than", "1h", config=config).stdout
    dry = cli("retry-failed", "--dry-run", config=config)
    assert "would move failed/users/big.csv -> drop/users/big.csv" in dry.stdout
    assert (folders.failed / "users" / "big.csv").exists()
    moved = cli("retry-failed", "--reason", "MAX_FILE_SIZE", config=config)
    assert moved.returncode == 0, moved.stderr
    assert "moved failed/users/big.csv -> drop/users/big.csv" in moved.stdout
    assert (folders.drop / "users" / "big.csv").read_bytes() == b"x" * 20
    assert not (folders.failed / "users" / "big.csv.error.json").exists()
    assert (folders.failed / "small.csv").exists()  # another reason: left alone
    assert cli("retry-failed", "--older-than", "soon", config=config).returncode == 78


def test_retry_failed_never_follows_a_type_folder_a_producer_made_a_symlink(
    folders, sandbox, tmp_path
):
    """It moved by path: failed/users/bad.csv went into the link's target, out of the tree,
    its sidecar deleted, and the output said drop/users/bad.csv (attack pass)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(folders.failed / "users" / "bad.csv", b"data")
    write(folders.failed / "users" / "bad.csv.error.json", b'{"reason": "x"}')
    write(folders.failed / "odd.csv", b"odd")
    write(folders.failed / "odd.csv.error.json", b"[]")  # JSON, but not a sidecar's object
    shutil.rmtree(folders.drop / "users", ignore_errors=True)
    (folders.drop / "users").symlink_to(elsewhere)
    config = config_file(folders, sandbox)
    for dry in (["--dry-run"], []):
        result = cli("retry-failed", *dry, config=config)
        assert result.returncode == 1, result.stdout + result.stderr
        refused = "not moved: failed/users/bad.csv: drop/users is a symlink, not a folder"
        assert refused in result.stdout, result.stdout  # the same words in both
        assert not result.stderr  # no log line of the daemon's
    assert "moved failed/odd.csv -> drop/odd.csv" in result.stdout
    assert (folders.drop / "odd.csv").read_bytes() == b"odd"
    assert not list(elsewhere.iterdir())
    assert (folders.failed / "users" / "bad.csv").read_bytes() == b"data"
    assert (folders.failed / "users" / "bad.csv.error.json").exists()


def test_status_reads_a_damaged_journal_and_never_lets_a_name_forge_a_line(folders, sandbox):
    """A byte torn inside a name, or a line that is JSON but no receipt, crashed `status`; a
    name with a newline printed a second, forged, receipt line."""
    state = folders.root / "state"
    state.mkdir(exist_ok=True)
    forged = "note.csv\n  2026-11-30T04:00:00Z uploaded payroll.csv sha256 0000"
    good = {"time": "2026-11-30T03:00:00Z", "outcome": "uploaded", "file": forged}
    (state / "receipts.jsonl").write_bytes(
        (json.dumps(good) + "\n[1, 2]\n").encode() + b'{"file": "caf\xc3"}\n'
    )
    (state / "status.json").write_text('{"state": "running", "every_seconds": "x"}')
    config = config_file(folders, sandbox)
    result = cli("status", config=config)
    assert result.returncode == 3, result.stdout + result.stderr  # not running
    assert "Traceback" not in result.stderr
    assert "uploaded note.csv\\n  2026-11-30T04:00:00Z uploaded payroll.csv" in result.stdout
    assert not [
        line for line in result.stdout.splitlines() if "payroll" in " ".join(line.split()[:3])
    ]
    one = cli("status", "payroll.csv", config=config)
    assert one.returncode == 1 and "no receipt for payroll.csv" in one.stdout, one.stdout


def test_status_of_a_daemon_that_cannot_write_its_status_file_says_so_and_exits_0(folders, sandbox):
    """It said "not running" and exited 3 while the lock's holder ran on, uploading (a full
    state folder): monitoring would have called the service down (attack pass)."""
    state = folders.root / "state"
    state.mkdir(exist_ok=True)
    old = {"state": "running", "pid": os.getpid(), "updated_epoch": time.time() - 3600}
    (state / "status.json").write_text(json.dumps({**old, "updated": "an hour ago"}))
    lock = DropLock(folders.drop)
    assert lock.acquire() is None
    try:
        result = cli("status", config=config_file(folders, sandbox))
        as_json = json.loads(cli("status", "--json", config=config_file(folders, sandbox)).stdout)
    finally:
        lock.release()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"running, but {state / 'status.json'} is not kept up to date" in result.stdout
    assert as_json["running"] and as_json["status_stale"]


def test_a_producers_flock_on_a_planted_lock_file_is_no_running_daemon(folders, sandbox):
    """Any producer can make and flock a file at the lock's name: `status` took that for a
    daemon whose status file was stale, and said "running", exit 0 (review)."""
    state = folders.root / "state"
    state.mkdir(exist_ok=True)
    (state / "status.json").write_text('{"state": "stopped", "updated": "yesterday"}')
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user: run `make test` as root")
    path = folders.drop / LOCK_NAME
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    os.chown(path, 65534, 65534)  # a producer's file
    with path.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = cli("status", config=config_file(folders, sandbox))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "running, but" not in result.stdout and "not running" in result.stdout


@pytest.mark.parametrize("pid", [0, -1, [1], 1e20, "x", None])
def test_a_status_file_with_a_pid_no_daemon_writes_describes_no_live_daemon(pid):
    doc = {"state": "running", "pid": pid, "updated_epoch": time.time()}
    assert not statusfile.running(doc, time.time())  # pid 0 was "alive", [1] a traceback


def test_status_never_lets_the_lock_files_holder_forge_a_line(folders, sandbox):
    """The holder's host is read from the lock file, which a producer can make and flock."""
    forged = "ghost\n  2026-11-30T04:00:00Z uploaded payroll.csv sha256 00\x1b[31m"
    path = folders.drop / LOCK_NAME
    path.write_text(json.dumps({"pid": 1, "host": forged}))
    with path.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (folders.root / "state").mkdir(exist_ok=True)
        (folders.root / "state" / "receipts.jsonl").write_text('{"file": "\\ud800.csv"}\n')
        result = cli("status", config=config_file(folders, sandbox))
    assert "Traceback" not in result.stderr, result.stderr
    assert (
        "active instance: pid 1 on ghost\\n  2026-11-30T04:00:00Z uploaded payroll" in result.stdout
    )
    assert "\x1b" not in result.stdout and "\\ud800.csv" in result.stdout, result.stdout


def test_status_is_not_held_up_by_a_fifo_at_the_lock_files_name(folders, sandbox):
    """`status` opened the lock file to probe it, blocking on a producer's FIFO for good."""
    os.mkfifo(folders.drop / LOCK_NAME)
    result = cli("status", config=config_file(folders, sandbox), timeout=15)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "active instance: none holds the drop folder" in result.stdout


def test_printable_escapes_what_could_forge_a_line_or_rewrite_the_screen():
    assert printable("a b.csv") == "a b.csv"
    assert printable("a\nb\tc\x1b[2Jd\u202eexe.csv") == "a\\nb\\tc\\x1b[2Jd\\u202eexe.csv"
    assert printable("caf\udcc3.csv") == "caf\\xc3.csv"  # a byte that is not UTF-8


def test_retry_failed_dry_run_follows_a_drop_dir_that_is_a_symlink_as_the_move_does(
    folders, sandbox
):
    """drop_dir may be a symlink (it is resolved at start); the dry run refused it as one."""
    real = folders.root / "real-drop"
    real.mkdir()
    link = folders.root / "link-drop"
    link.symlink_to(real)
    write(folders.failed / "x.csv", b"x")
    config = config_file(folders, sandbox, extra=f'failed_dir = "{folders.failed}"\n')
    config.write_text(config.read_text().replace(str(folders.drop), str(link)))
    for dry in (["--dry-run"], []):
        result = cli("retry-failed", *dry, config=config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "failed/x.csv -> link-drop/x.csv" in result.stdout, result.stdout
    assert (real / "x.csv").read_bytes() == b"x"


def test_retention_deletes_old_done_files_only(daemon, folders, sandbox, logs_json: Captured):
    write(folders.drop / "old.csv", b"1")
    write(folders.failed / "keep-failed.csv", b"f")
    write(folders.drop / ".waiting.tmp", b"w")
    with daemon(done_retention_days=2 / 86400):  # two seconds; swept every half second
        done_soon(folders, "old.csv")
        wait_for(lambda: not (folders.done / "old.csv").exists())
    [deleted] = logs_json.events("deleted")
    assert deleted["file"] == "done/old.csv"
    assert any(r["outcome"] == "deleted" and r["file"] == "done/old.csv" for r in receipts(folders))
    assert (folders.failed / "keep-failed.csv").exists() and (
        folders.drop / ".waiting.tmp"
    ).exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_prometheus_metrics_are_scraped_from_the_real_endpoint(daemon, folders, sandbox):
    port = free_port()
    textfile = folders.root / "metrics" / "productiv.prom"
    sandbox.inject("urls", count=4, status=503)
    write(folders.drop / "users" / "a.csv", b"12345")
    with daemon(metrics_port=port, metrics_textfile=textfile, status_seconds=0.2):

        def scrape() -> str:
            return (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )

        done_soon(folders, "users/a.csv")
        wait_for(lambda: "upload_seconds_count 1.0" in scrape())
        text = scrape()
        wait_for(lambda: "uploaded_total" in (textfile.read_text() if textfile.exists() else ""))
    assert 'productiv_watcher_files_uploaded_total{type="users"} 1.0' in text
    assert "productiv_watcher_bytes_uploaded_total 5.0" in text
    assert 'productiv_watcher_retries_total{cause="urls",class="5xx"}' in text
    assert "productiv_watcher_upload_seconds_count 1.0" in text
    for gauge in (
        "queue_depth",
        "in_flight",
        "oldest_waiting_seconds",
        "seconds_since_last_upload",
        "service_retrying",
        "folders_not_writable",
        "watch_deaf",
    ):
        assert f"productiv_watcher_{gauge} " in text
    assert "productiv_watcher_files_uploaded_total" in textfile.read_text()


def test_a_hanging_stat_is_reported_and_does_not_block(tmp_path):
    release = threading.Event()
    calls = []

    def stat_fn(path):
        calls.append(path)
        release.wait(10)
        return os.stat(path)

    probe = StatProbe(tmp_path, 0.2, stat_fn)
    started = time.monotonic()
    assert probe.identity() is HUNG
    assert probe.identity() is HUNG
    assert len(calls) == 1  # no second stat piles up behind the first
    assert time.monotonic() - started < 5.0  # not the 10-s stat behind it
    release.set()
    wait_for(lambda: probe.identity() == (tmp_path.stat().st_dev, tmp_path.stat().st_ino))


def test_a_dead_polling_observer_is_restarted(daemon, folders, logs_json: Captured):
    with daemon(polling=True, poll_interval_seconds=0.2) as service:
        service.watcher._observer.stop()  # as watchdog's thread does on an unexpected OSError
        wait_for(lambda: logs_json.events("watch_restored"))
        write(folders.drop / "after.csv", b"x")
        done_soon(folders, "after.csv")
    assert "lost its observer thread" in logs_json.events("watch_lost")[0]["reason"]


def test_the_canary_notices_a_watch_that_stopped_hearing(daemon, folders, logs_json: Captured):
    # A polling observer that looks once a minute hears nothing: exactly a mount gone quiet.
    with daemon(polling=True, poll_interval_seconds=60, canary_seconds=0.5):
        wait_for(lambda: logs_json.events("watch_deaf"))
    assert logs_json.events("watch_deaf")[0]["level"] == "error"
    assert not (folders.drop / ".productiv-watcher-canary").exists()  # removed at stop


def test_the_canary_stays_quiet_while_events_flow(daemon, folders, logs_json: Captured):
    with daemon(canary_seconds=0.3) as service:
        deadline = time.monotonic() + 1.5
        wait_for(lambda: time.monotonic() > deadline)  # several canary periods
        assert service.watcher.deaf_reason is None
    assert not logs_json.events("watch_deaf")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_what_a_producer_puts_at_the_canarys_name_is_removed_never_followed(
    tmp_path, kind, logs_json: Captured
):
    """The canary was made by path: a producer's symlink to the journal had it truncated, a
    folder crashed the daemon at every start, a FIFO blocked its main loop for good."""
    victim = tmp_path / "receipts.jsonl"
    victim.write_text("kept\n")
    path = tmp_path / CANARY_NAME
    now = [0.0]
    canary = Canary(tmp_path, 1.0, lambda: now[0])
    assert canary.tick()  # the first canary
    for _ in range(2):  # a producer plants again after each new canary
        path.unlink()
        plant(path, kind, victim)
        now[0] += 1.0
        canary.seen()
        assert canary.tick()  # heard, replaced, and the main loop goes on
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_uid == os.geteuid()
    assert victim.read_text() == "kept\n"
    planted = logs_json.events("canary_planted")
    assert len(planted) == 2
    assert all(e["canary"] == str(path) and e["level"] == "warning" for e in planted)


def test_a_producer_racing_the_canary_with_symlinks_never_has_a_file_written(tmp_path):
    """Planting a symlink in the instant between the old canary's removal and the new one's
    creation had the daemon truncate the link's target (the attack pass: its receipts)."""
    victim = tmp_path / "receipts.jsonl"
    victim.write_text("kept\n")
    path, now, stop = tmp_path / CANARY_NAME, [0.0], threading.Event()
    canary = Canary(tmp_path, 1.0, lambda: now[0])

    def plant() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                path.symlink_to(victim)

    producer = threading.Thread(target=plant, daemon=True)
    producer.start()
    try:
        for _ in range(500):
            now[0] += 1.0
            canary.tick()
    finally:
        stop.set()
        producer.join(5)
    assert victim.read_text() == "kept\n"


def test_an_unmounted_drop_folder_is_noticed_and_watched_again(sandbox, tmp_path, daemon_factory):
    drop = tmp_path / "mnt" / "drop"
    drop.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path / "mnt")]
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (tmp_path / "mnt" / "drop").mkdir()
        folders = Folders(
            tmp_path / "mnt",
            tmp_path / "mnt" / "drop",
            tmp_path / "mnt" / "done",
            tmp_path / "mnt" / "failed",
        )
        daemon, logs_json = daemon_factory(folders)
        with daemon:
            subprocess.run(["umount", "-l", str(tmp_path / "mnt")], check=True)
            wait_for(lambda: logs_json.events("watch_lost"))
            subprocess.run(mount, check=True)
            (tmp_path / "mnt" / "drop").mkdir()
            wait_for(lambda: logs_json.events("watch_restored"))
            write(folders.drop / "back.csv", b"x")
            done_soon(folders, "back.csv")
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "mnt")], check=False)
