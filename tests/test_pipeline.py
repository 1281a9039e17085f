"""The whole pipeline in-process, against the sandbox over real sockets and real folders."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Captured
from tests.helpers import Child, done_soon, inotify_masks, wait_for, write
from watcher.daemon import statusfile
from watcher.daemon.timings import DEFAULT
from watcher.pipeline.watching import Watcher
from watcher.settings import ConfigError


def test_files_waiting_at_start_go_up_whole_and_move_to_done(daemon, folders, sandbox):
    write(folders.drop / "top.csv", b"top")
    write(folders.drop / "users" / "people.csv", b"u" * 70_000)
    write(folders.drop / "contracts" / "deal.pdf", os.urandom(300_000))
    expected = {
        rel: (folders.drop / rel).read_bytes()
        for rel in ("top.csv", "users/people.csv", "contracts/deal.pdf")
    }
    with daemon(file_type="other"):
        done_soon(folders, *expected)
    assert folders.files(folders.drop) == []
    assert sandbox.stored("top.csv", "other") == expected["top.csv"]
    assert sandbox.stored("people.csv", "users") == expected["users/people.csv"]
    assert sandbox.stored("deal.pdf", "contracts") == expected["contracts/deal.pdf"]
    assert {rel: (folders.done / rel).read_bytes() for rel in expected} == expected


def test_put_has_content_length_no_chunking_and_no_content_type(daemon, folders, sandbox):
    with daemon():
        write(folders.drop / "empty.csv", b"")
        write(folders.drop / "some.csv", b"12345")
        done_soon(folders, "empty.csv", "some.csv")
    puts = [r for r in sandbox.requests if r.endpoint == "put"]
    assert sorted(r.headers.get("Content-Length") for r in puts) == ["0", "5"]
    assert all(
        "Transfer-Encoding" not in r.headers and "Content-Type" not in r.headers for r in puts
    )
    assert sandbox.stored("empty.csv") == b""


def test_a_file_written_slowly_is_uploaded_once_and_whole(daemon, folders, sandbox, logs_json):
    target = folders.drop / "slow.csv"
    with daemon(settle_seconds=0.5):
        with target.open("wb") as out:
            for n in range(15):  # 1.5 s of writing, a write every 0.1 s
                out.write(f"line {n}\n".encode())
                out.flush()
                time.sleep(0.1)
        done_soon(folders, "slow.csv")
    assert sandbox.stored("slow.csv") == b"".join(f"line {n}\n".encode() for n in range(15))
    assert sandbox.count("put") == 1
    assert len(logs_json.events("uploaded")) == 1


def test_a_scanner_that_closes_and_reopens_between_pages_is_uploaded_once(daemon, folders, sandbox):
    target = folders.drop / "scan.pdf"
    with daemon(settle_seconds=0.5):
        for page in range(6):
            with target.open("ab") as out:  # closed after every page: a close event each time
                out.write(f"page {page}\n".encode() * 100)
            time.sleep(0.2)
        done_soon(folders, "scan.pdf")
    assert sandbox.count("put") == 1
    assert sandbox.stored("scan.pdf").count(b"page 5") == 100


def test_files_moved_in_or_renamed_in_place_are_uploaded(daemon, folders, sandbox, tmp_path):
    outside = write(tmp_path / "staging" / "moved.csv", b"moved")
    with daemon():
        os.rename(outside, folders.drop / "moved.csv")
        write(folders.drop / ".rsync.tmp", b"renamed")
        os.rename(folders.drop / ".rsync.tmp", folders.drop / "renamed.csv")
        done_soon(folders, "moved.csv", "renamed.csv")
    assert sandbox.stored("renamed.csv") == b"renamed"


# pytest applies its own warning filters per test; the daemon has the one in `watching`
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
def test_inotify_is_asked_for_created_moved_in_closed_and_folder_gone_only(tmp_path):
    """Not IN_MOVED_FROM: watchdog holds each one back to pair it and searches its queue on every
    moved-in file. Our emitter replaces watchdog internals, so a watchdog upgrade that changes
    them must fail here rather than quietly watch with the wrong mask."""
    drop = tmp_path / "drop"
    (drop / "users").mkdir(parents=True)
    (drop / "contracts").mkdir()
    noticed: list[str] = []
    watcher = Watcher(drop, "other", (".*",), lambda spots: noticed.extend(s.rel for s in spots))
    watcher.start()
    try:
        wait_for(lambda: drop.stat().st_ino in inotify_masks(), 5, "the watch on drop/")
        masks = inotify_masks()
        wanted = 0x100 | 0x080 | 0x008 | 0x400  # CREATE, MOVED_TO, CLOSE_WRITE, DELETE_SELF
        assert masks[drop.stat().st_ino] & 0xFFFF == wanted
        assert masks[(drop / "users").stat().st_ino] & 0xFFFF == wanted
        os.rename(write(tmp_path / "outside.csv", b"1"), drop / "moved.csv")
        os.rename(write(drop / ".part", b"2"), drop / "users" / "renamed.csv")
        wait_for(lambda: {"moved.csv", "users/renamed.csv"} <= set(noticed), 5, "both noticed")
        (drop / "contracts").rename(drop / "later")  # a folder renamed in place...
        (drop / "later").rename(drop / "contracts")  # ...and back: its watch follows it
        write(drop / "contracts" / "deal.pdf", b"3")
        wait_for(lambda: "contracts/deal.pdf" in noticed, 5, "a file in the renamed folder")
    finally:
        watcher.stop()
        watcher.join(5)


def test_a_watch_that_cannot_start_leaves_no_inotify_thread_behind(tmp_path):
    """watchdog's inotify observer starts its reader thread (and a kernel inotify instance) as
    it is made, before the folder is watched: a drop folder that is gone when the watch is
    re-attached (a remount caught half-way) left both behind on every try, until the user's
    128 inotify instances were used up."""

    def inotify_fds() -> int:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum("inotify" in link for link in links)

    watcher = Watcher(tmp_path / "missing", "other", (".*",), lambda spots: None)
    before, instances = set(threading.enumerate()), inotify_fds()
    for _ in range(3):
        with pytest.raises(ConfigError, match="cannot watch drop_dir"):
            watcher.start()
    assert [t.name for t in set(threading.enumerate()) - before] == []
    assert inotify_fds() == instances
    watcher.join(5)


def test_a_watch_that_gets_no_inotify_instance_says_so(tmp_path):
    """No descriptor left for inotify_init (EMFILE): a ConfigError naming it, as for any other
    watch that cannot start (the main loop says it and tries again), never a raw OSError."""
    code = """if True:
        import resource, sys
        from pathlib import Path
        from watcher.pipeline.watching import Watcher
        from watcher.settings import ConfigError
        watcher = Watcher(Path(sys.argv[1]), "other", (".*",), lambda spots: None)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(open("/dev/null"))
        except OSError:
            pass
        try:
            watcher.start()
        except ConfigError as exc:
            print(exc)
    """
    (tmp_path / "drop").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "drop")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        done.stdout
        == f"cannot watch drop_dir {tmp_path / 'drop'}: inotify instance limit reached\n"
    )


def test_ignored_names_and_deeper_folders_stay_put(daemon, folders, sandbox, logs_json):
    ignored = [".hidden", "a.tmp", "b.part", "c.crdownload", "~$d.xlsx", "e~", "Thumbs.db"]
    for name in ignored:
        write(folders.drop / name, b"x")
    write(folders.drop / "users" / "deeper" / "f.csv", b"x")
    write(folders.drop / "misc" / "g.csv", b"x")
    with daemon():
        write(folders.drop / "marker.csv", b"x")
        done_soon(folders, "marker.csv")
    asked = {name for r in sandbox.requests for name in r.names}
    assert asked == {"marker.csv"}
    assert all((folders.drop / name).exists() for name in ignored)
    skipped = {e["file"] for e in logs_json.events("skipped")}
    assert skipped == {"misc", "users/deeper"}


def test_files_that_settle_together_share_signed_url_requests(daemon, folders, sandbox):
    for n in range(23):
        write(folders.drop / "users" / f"f{n:02}.csv", b"x")
    with daemon(batch_size=5):
        done_soon(folders, *(f"users/f{n:02}.csv" for n in range(23)))
    assert sandbox.count("urls") == math.ceil(23 / 5)
    assert all(len(r.names) <= 5 for r in sandbox.requests if r.endpoint == "urls")


def test_the_next_batch_s_urls_are_asked_for_while_the_current_one_is_sent(
    daemon, folders, sandbox
):
    """The ready queue holds a batch, so a worker never waits out a signed-URL call between
    batches: the second request goes out while the first batch's first PUT is still held."""
    for n in range(6):
        write(folders.drop / f"f{n}.csv", b"x")
    sandbox.inject("put", count=1, delay=3.0)
    with daemon(batch_size=3, upload_concurrency=1):
        wait_for(lambda: sandbox.arrived["put"] == 1, what="the first PUT")
        wait_for(lambda: sandbox.arrived["urls"] == 2, 2.5, "the second batch's URLs")
        assert sandbox.count("put") == 0  # the first PUT has not been answered yet
        done_soon(folders, *(f"f{n}.csv" for n in range(6)))


def test_a_quiet_daemon_is_woken_by_the_first_new_file(daemon, folders, sandbox):
    """Quiet, the main loop turns only every 10 s (a turn costs CPU even doing nothing); the
    first noticed file wakes it, so `status` shows an upload far shorter than that. The
    daemon's own timings here: with the tests' short turns this would pass without the wake."""
    sandbox.inject("put", count=1, delay=3.0)
    with daemon(timings=DEFAULT, status_seconds=0.2) as service:
        state = service.journal.folder
        wait_for(lambda: statusfile.read(state) is not None, what="the first status file")
        write(folders.drop / "a.csv", b"x")
        wait_for(lambda: sandbox.arrived["put"] == 1, what="the PUT")

        def uploading() -> list[str]:
            return [u["file"] for u in (statusfile.read(state) or {}).get("uploading", [])]

        wait_for(lambda: uploading() == ["a.csv"], 2.5, "a.csv uploading in the status file")
        done_soon(folders, "a.csv")


def test_one_batch_never_holds_two_files_of_the_same_name(daemon, folders, sandbox):
    write(folders.drop / "same.csv", b"top")
    write(folders.drop / "users" / "same.csv", b"users")
    with daemon(file_type="users"):
        done_soon(folders, "same.csv", "users/same.csv")
    assert all(len(set(r.names)) == len(r.names) for r in sandbox.requests if r.endpoint == "urls")
    assert sandbox.count("urls") == 2


def test_a_taken_name_in_done_gets_a_timestamp_and_nothing_is_overwritten(daemon, folders):
    write(folders.done / "report.pdf", b"yesterday")
    write(folders.drop / "report.pdf", b"today")
    with daemon():
        wait_for(lambda: len(list(folders.done.iterdir())) == 2)
        write(folders.drop / "report.pdf", b"later today")
        wait_for(lambda: len(list(folders.done.iterdir())) == 3)
    assert (folders.done / "report.pdf").read_bytes() == b"yesterday"
    contents = sorted(p.read_bytes() for p in folders.done.iterdir())
    assert contents == [b"later today", b"today", b"yesterday"]
    names = sorted(p.name for p in folders.done.iterdir())
    assert names[1].startswith("report.20") and names[1].endswith("Z.pdf")


SERVICE_FAULTS = [
    *({"status": status} for status in (500, 502, 503, 504)),
    {"status": 429, "retry_after": "1", "count": 2},
    {"drop": True},
    {"delay": 2.0},  # hangs past request_timeout_seconds
]


@pytest.mark.parametrize(
    ("endpoint", "fault"),
    [
        *(("token", f) for f in SERVICE_FAULTS),
        ("token", {"body": '{"access_tok'}),  # truncated
        ("token", {"body": "<html>gateway</html>"}),  # not JSON
        ("token", {"status": 302}),
        *(("urls", f) for f in SERVICE_FAULTS),
        ("urls", {"body": '{"a.csv": "http'}),
        ("urls", {"body": "<html>gateway</html>"}),
        ("urls", {"status": 302}),
        ("urls", {"partial": True, "count": 2}),  # some names missing, one never asked for
        *(("put", f) for f in SERVICE_FAULTS),
        ("put", {"status": 307}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()),
)
def test_service_faults_are_retried_and_never_fail_a_file(
    daemon, folders, sandbox, logs_json, endpoint, fault
):
    contents = {f"{n}.csv": os.urandom(2000 * n) for n in range(1, 4)}
    for name, data in contents.items():
        write(folders.drop / name, data)
    # Enough in a row to outlast urllib3's in-call retries (of 3 files at once, for PUTs).
    sandbox.inject(endpoint, **{"count": 12 if endpoint == "put" else 4, **fault})
    with daemon(request_timeout_seconds=0.5):
        done_soon(folders, *contents, timeout=30)
    assert {name: sandbox.stored(name) for name in contents} == contents
    assert folders.files(folders.failed) == []
    assert not logs_json.events("failed")
    retrying = logs_json.events("retrying")
    assert retrying
    if "partial" not in fault:  # a partial answer is a file-level retry, not an outage
        assert logs_json.events("recovered")
    if "retry_after" in fault:  # honoured exactly, whatever the backoff says
        assert {r["seconds"] for r in retrying} == {1.0}


def test_a_hung_connection_times_out_and_is_retried(daemon, folders, sandbox, logs_json):
    sandbox.inject("put", count=1, delay=3.0)
    write(folders.drop / "a.csv", b"payload")
    with daemon(request_timeout_seconds=0.5):
        done_soon(folders, "a.csv", timeout=20)
    assert folders.files(folders.failed) == []


def test_retry_lines_are_per_backoff_step_not_per_file(daemon, folders, sandbox, logs_json):
    for n in range(30):
        write(folders.drop / f"f{n}.csv", b"x")
    sandbox.inject("urls", count=3, status=503)
    with daemon():
        done_soon(folders, *(f"f{n}.csv" for n in range(30)))
    assert len(logs_json.events("retrying")) == 3


def test_an_expired_url_is_replaced_without_costing_an_attempt(daemon, folders, sandbox):
    sandbox.expire_next = 1
    write(folders.drop / "a.csv", b"payload")
    with daemon(max_attempts=1):
        done_soon(folders, "a.csv")
    assert sandbox.count("put", 403) == 1
    assert sandbox.count("urls") == 2
    assert sandbox.stored("a.csv") == b"payload"


def test_a_401_gets_one_fresh_token(daemon, folders, sandbox):
    with daemon():
        write(folders.drop / "a.csv", b"1")
        done_soon(folders, "a.csv")
        sandbox.forget_tokens()
        write(folders.drop / "b.csv", b"2")
        done_soon(folders, "b.csv")
    assert sandbox.count("token") == 2
    assert sandbox.count("urls", 401) == 1


def test_a_refused_put_goes_to_failed_with_a_sidecar(daemon, folders, sandbox, logs_json):
    sandbox.inject("put", count=3, status=403)
    write(folders.drop / "contracts" / "no.pdf", b"x")
    with daemon(max_attempts=3):
        wait_for((folders.failed / "contracts" / "no.pdf.error.json").exists)
    sidecar = json.loads((folders.failed / "contracts" / "no.pdf.error.json").read_text())
    assert sidecar["file"] == "contracts/no.pdf"
    assert sidecar["status"] == 403
    assert sidecar["attempts"] == 3
    assert "403" in sidecar["reason"] and "AccessDenied" in sidecar["reason"]
    assert sidecar["failed_at"].endswith("Z")
    assert (
        oct((folders.failed / "contracts" / "no.pdf.error.json").stat().st_mode & 0o777) == "0o640"
    )
    assert (folders.failed / "contracts" / "no.pdf").read_bytes() == b"x"
    [failed] = logs_json.events("failed")
    assert failed["file"] == "contracts/no.pdf" and failed["status"] == 403


def test_a_name_missing_from_the_answer_is_retried_then_failed(daemon, folders, sandbox):
    sandbox.omit_names = {"lost.csv"}
    write(folders.drop / "lost.csv", b"x")
    write(folders.drop / "fine.csv", b"y")
    with daemon(max_attempts=2):
        wait_for((folders.failed / "lost.csv.error.json").exists)
        done_soon(folders, "fine.csv")
    sidecar = json.loads((folders.failed / "lost.csv.error.json").read_text())
    assert "no URL" in sidecar["reason"] and sidecar["attempts"] == 0
    assert sum("lost.csv" in r.names for r in sandbox.requests) == 2


def test_a_refused_name_is_found_by_splitting_the_batch(daemon, folders, sandbox):
    sandbox.refuse_names = {"bad name.csv"}
    for name in ("a.csv", "b.csv", "bad name.csv", "c.csv", "d.csv"):
        write(folders.drop / name, name)
    with daemon():
        wait_for((folders.failed / "bad name.csv.error.json").exists)
        done_soon(folders, "a.csv", "b.csv", "c.csv", "d.csv")
    sidecar = json.loads((folders.failed / "bad name.csv.error.json").read_text())
    assert "invalid filename: bad name.csv" in sidecar["reason"]
    assert sidecar["status"] == 400


def test_names_that_cannot_be_sent_or_files_too_large_fail_without_asking(daemon, folders, sandbox):
    bad = os.fsdecode(b"caf\xe9.csv")  # Latin-1 bytes: not UTF-8
    write(folders.drop / bad, b"x")
    write(folders.drop / "big.csv", b"x" * 11)
    with daemon(max_file_size=10):
        wait_for(lambda: len(folders.files(folders.failed)) == 4)
    assert sandbox.count("urls") == 0
    sidecar = json.loads((folders.failed / (bad + ".error.json")).read_bytes())
    assert sidecar["file"] == "caf\\xe9.csv" and "UTF-8" in sidecar["reason"]
    assert (
        "max_file_size" in json.loads((folders.failed / "big.csv.error.json").read_text())["reason"]
    )


def test_a_plain_http_url_to_another_host_is_refused(daemon, folders, sandbox):
    sandbox.url_base = "http://example.com"
    write(folders.drop / "a.csv", b"x")
    with daemon():
        wait_for((folders.failed / "a.csv.error.json").exists)
    assert "not https" in json.loads((folders.failed / "a.csv.error.json").read_text())["reason"]
    assert sandbox.count("put") == 0


def test_links_fifos_sockets_and_folders_are_never_uploaded(
    daemon, folders, sandbox, logs_json, tmp_path
):
    outside = write(tmp_path / "secret.txt", b"outside")
    inside = write(folders.drop / "real.csv", b"real")
    os.symlink(outside, folders.drop / "out-link.csv")
    os.symlink(inside, folders.drop / "in-link.csv")
    os.symlink(folders.drop / "nowhere", folders.drop / "dangling.csv")
    os.symlink(folders.drop / "loop.csv", folders.drop / "loop.csv")
    os.mkfifo(folders.drop / "pipe.csv")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folders.drop / "sock.csv"))
    (folders.drop / "folder.csv").mkdir()
    try:
        with daemon():
            done_soon(folders, "real.csv")
            wait_for(lambda: len(logs_json.events("skipped")) == 7)
    finally:
        sock.close()
    assert {r for r in sandbox.requests for r in r.names} == {"real.csv"}
    assert {e["file"] for e in logs_json.events("skipped")} == {
        "out-link.csv",
        "in-link.csv",
        "dangling.csv",
        "loop.csv",
        "pipe.csv",
        "sock.csv",
        "folder.csv",
    }
    assert (folders.drop / "pipe.csv").exists() and (folders.drop / "out-link.csv").is_symlink()


def test_a_file_deleted_before_upload_is_forgotten(daemon, folders, sandbox, logs_json):
    with daemon(settle_seconds=1.0) as service:
        write(folders.drop / "gone.csv", b"x")
        # looked at once (a candidate), not merely noticed: len() counts those too
        wait_for(lambda: service.stabiliser.oldest() is not None)
        (folders.drop / "gone.csv").unlink()
        wait_for(lambda: logs_json.events("vanished"))
    assert sandbox.count("urls") == 0


def test_a_file_changed_during_upload_is_sent_again_whole(daemon, folders, sandbox, logs_json):
    sandbox.inject("put", count=1, delay=1.0)
    target = write(folders.drop / "grow.csv", b"first\n")
    with daemon() as service:
        wait_for(lambda: service.uploader.sending == 1 and sandbox.arrived["put"] == 1)
        with target.open("ab") as out:
            out.write(b"second\n")
        done_soon(folders, "grow.csv")
    assert [e["file"] for e in logs_json.events("changed")] == ["grow.csv"]
    assert sandbox.stored("grow.csv") == b"first\nsecond\n"
    assert (folders.done / "grow.csv").read_bytes() == b"first\nsecond\n"
    assert sandbox.count("put", 200) == 2


def test_stop_waits_for_puts_in_flight_and_leaves_the_rest(sandbox, folders, logs_json):
    from tests.conftest import Daemon, make_settings

    sandbox.inject("put", count=1, delay=1.0)
    for n in range(5):
        write(folders.drop / f"f{n}.csv", b"x")
    daemon = Daemon(make_settings(sandbox, folders, upload_concurrency=1, batch_size=1))
    with daemon as service:
        wait_for(lambda: service.uploader.sending == 1)
    assert len(folders.files(folders.done)) == 1
    assert len(folders.files(folders.drop)) == 4
    assert logs_json.events("stopped")[0]["uploaded"] == 1


def test_no_thread_is_left_behind_after_a_stop(daemon, folders):
    before = {t.name for t in threading.enumerate()}
    with daemon():
        pass
    wait_for(lambda: {t.name for t in threading.enumerate()} <= before)


def test_logs_never_show_secrets_tokens_or_signed_queries(
    daemon, folders, sandbox, logs_json: Captured
):
    sandbox.inject("put", count=1, status=403)
    write(folders.drop / "a.csv", b"x")
    with daemon(max_attempts=1, log_level="DEBUG"):
        wait_for((folders.failed / "a.csv").exists)
    text = logs_json.text
    assert "urllib3" in text  # DEBUG lines of the HTTP library were written, and redacted
    assert "?<redacted>" in text
    tokens = [t for t in sandbox._tokens]
    assert tokens and not any(t in text for t in tokens)


def test_an_unknown_app_is_a_loud_outage_not_a_failed_file(daemon, folders, sandbox, logs_json):
    write(folders.drop / "a.csv", b"x")
    with daemon(app_id="no-such-app"):
        wait_for(lambda: len(logs_json.events("retrying")) >= 2)
    assert logs_json.events("retrying")[0]["status"] == 404
    assert folders.files(folders.drop) == ["a.csv"] and folders.files(folders.failed) == []


def test_the_rescan_finds_files_no_event_announced(daemon, folders, sandbox):
    # A polling observer that looks only once a minute stands in for a mount without events.
    with daemon(polling=True, poll_interval_seconds=60, rescan_seconds=0.5):
        write(folders.drop / "quiet.csv", b"x")
        done_soon(folders, "quiet.csv")


def test_files_found_again_by_rescans_while_they_wait_go_up_once(
    daemon, folders, sandbox, logs_json
):
    """Every rescan notices every waiting file again: such a notice waits on the work queue for
    its name's release, then finds the file gone to done/, so nothing is sent twice."""
    names = [f"w{n:02}.csv" for n in range(12)]
    for name in names:
        write(folders.drop / name, name.encode())
    sandbox.inject("put", count=3, delay=0.5)
    with daemon(rescan_seconds=0.2, upload_concurrency=1, batch_size=4) as service:
        wait_for(lambda: service.work._parked, what="a rescan's notice parked on a held name")
        done_soon(folders, *names)
        wait_for(lambda: service.operations.counts().waiting == 0, what="nothing waiting")
    assert sandbox.count("put") == len(names) and folders.files(folders.drop) == []
    assert logs_json.events("vanished") == []  # not taken for a file that disappeared


def test_polling_mode_uploads(daemon, folders, sandbox):
    with daemon(polling=True, poll_interval_seconds=0.2):
        write(folders.drop / "users" / "polled.csv", b"x")
        done_soon(folders, "users/polled.csv")
    assert sandbox.stored("polled.csv", "users") == b"x"


def test_a_file_replaced_while_settling_is_uploaded_as_its_last_version(daemon, folders, sandbox):
    with daemon(settle_seconds=0.6) as service:
        write(folders.drop / "r.csv", b"old")
        wait_for(lambda: service.stabiliser.oldest() is not None)  # the old version was seen
        write(folders.drop / ".r.tmp", b"new version")
        os.replace(folders.drop / ".r.tmp", folders.drop / "r.csv")
        done_soon(folders, "r.csv")
    assert sandbox.stored("r.csv") == b"new version"
    assert sandbox.count("put") == 1


def test_an_unreadable_file_goes_to_failed_with_the_reason(sandbox, as_nobody, nobody_tmp):
    """Runs the daemon as `nobody`: root reads every file, so only a dropped privilege shows it."""
    base = nobody_tmp
    (base / "drop").mkdir()
    write(base / "drop" / "locked.csv", b"secret").chmod(0o000)
    write(base / "drop" / "open.csv", b"fine").chmod(0o644)
    as_nobody.own(base, base / "drop")
    env = {
        **sandbox.env(),
        **as_nobody.env,
        "PRODUCTIV_DROP_DIR": str(base / "drop"),
        "PRODUCTIV_SETTLE_SECONDS": "0.3",
    }

    def finished() -> bool:
        return (base / "failed" / "locked.csv.error.json").exists() and (
            base / "done" / "open.csv"
        ).exists()

    child = Child(env, command=as_nobody.argv, cwd=Path("/"))
    try:
        wait_for(lambda: finished() or child.proc.poll() is not None, what="both files moved")
    finally:
        child.close()
    assert finished(), child.stderr
    reason = json.loads((base / "failed" / "locked.csv.error.json").read_text())["reason"]
    assert reason == "cannot read the file: Permission denied"
    assert ((base / "failed" / "locked.csv").stat().st_mode & 0o777) == 0  # permissions kept


def test_a_drop_folder_that_disappears_and_comes_back_is_watched_again(daemon, folders, logs_json):
    with daemon():
        away = folders.root / "drop-away"
        folders.drop.rename(away)
        wait_for(lambda: logs_json.events("watch_lost"))
        write(away / "while-away.csv", b"1")
        away.rename(folders.drop)  # back, same inode
        wait_for(lambda: logs_json.events("watch_restored"))
        done_soon(folders, "while-away.csv")
        shutil.rmtree(folders.drop)  # gone for good, then a new folder of the same name
        wait_for(lambda: len(logs_json.events("watch_lost")) == 2)
        folders.drop.mkdir()
        wait_for(lambda: len(logs_json.events("watch_restored")) == 2)
        write(folders.drop / "after.csv", b"2")
        done_soon(folders, "after.csv")
    assert "gone" in logs_json.events("watch_lost")[0]["reason"]
