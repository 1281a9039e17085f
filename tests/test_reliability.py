"""Attacks on the promise that no file is ever lost, half-sent or sent under a wrong name:
kill -9 mid-run, long outages, disk trouble, skewed clocks, hostile names and file kinds."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import unicodedata
from pathlib import Path

import pytest

from tests.conftest import Captured
from tests.helpers import Child, Folders, daemon_env, done_soon, wait_for, write
from watcher.sandbox.productiv import Sandbox


def child_env(sandbox: Sandbox, folders: Folders, **extra: str) -> dict[str, str]:
    """`daemon_env`, settling and retrying briskly (a long outage is many retries)."""
    brisk = {"PRODUCTIV_SETTLE_SECONDS": "0.2", "PRODUCTIV_RETRY_MAX_SECONDS": "0.2"}
    return daemon_env(sandbox, folders, **{**brisk, **extra})


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_kill_9_at_random_moments_loses_nothing_and_duplicates_nothing(sandbox, folders):
    rng = random.Random(20261127)
    originals: dict[str, bytes] = {}
    for n in range(300):
        rel = f"{'users/' if n % 3 == 0 else ''}f{n:03}.csv"
        originals[rel] = rng.randbytes(rng.randint(0, 40_000))
        write(folders.drop / rel, originals[rel])
    sandbox.inject("put", count=10**6, delay=0.01)  # slow enough that kills land mid-run
    kills = 0
    for _ in range(6):
        child = Child(child_env(sandbox, folders))
        wait_for(lambda c=child: " ready " in c.stderr or c.proc.poll() is not None)
        time.sleep(rng.uniform(0.05, 0.8))  # a random moment of the run: the point of the test
        child.proc.send_signal(signal.SIGKILL)
        child.close()
        kills += 1
        if not folders.files(folders.drop):
            break
    assert kills >= 3, "the run finished before enough kills landed"
    with_retries = Child(child_env(sandbox, folders))
    try:
        wait_for(lambda: " ready " in with_retries.stderr)
        wait_for(lambda: not folders.files(folders.drop), timeout=60)
        with_retries.send_signal(signal.SIGTERM)
        assert with_retries.wait(15) == 0
    finally:
        with_retries.close()
    assert folders.files(folders.done) == sorted(originals)  # each exactly once, under its name
    assert {rel: (folders.done / rel).read_bytes() for rel in originals} == originals
    for rel, data in originals.items():
        file_type = "users" if rel.startswith("users/") else None
        assert sandbox.stored(rel.rsplit("/", 1)[-1], file_type) == data
    assert not folders.failed.exists() or folders.files(folders.failed) == []
    assert not list((sandbox.store).rglob(".incoming-*"))  # no partial object kept


@pytest.mark.long
def test_a_long_outage_keeps_memory_and_log_volume_flat(sandbox, folders):
    for n in range(400):
        write(folders.drop / f"f{n:03}.csv", b"x" * 100)
    sandbox.inject("urls", count=10**6, status=503)
    child = Child(child_env(sandbox, folders))
    try:
        wait_for(lambda: sandbox.count("urls") > 0)
        begun = time.monotonic()
        wait_for(lambda: " retrying " in child.stderr, what="into the outage")
        early = rss_kib(child.proc.pid)
        time.sleep(4.0)  # an observation window of the outage
        grown = rss_kib(child.proc.pid) - early
        retries = sum(" retrying " in line for line in child.lines)
        elapsed = time.monotonic() - begun
        sandbox.clear()
        wait_for(lambda: len(folders.files(folders.done)) == 400, timeout=60)
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        child.close()
    assert grown < 4096, f"RSS grew by {grown} KiB during the outage"
    # One line per backoff step (about one per 0.1-0.2 s here), never one per waiting file.
    assert retries <= elapsed / 0.1 + 5 and retries < 400
    assert " recovered " in child.stderr
    assert folders.files(folders.failed) == [] if folders.failed.exists() else True


def test_a_done_folder_that_refuses_files_keeps_them_in_drop(sandbox, as_nobody, nobody_tmp):
    """As `nobody`, so that permissions apply (root writes anywhere). A file that could not be
    moved once uploaded is not uploaded at all (issue 10): it waits, unsent, for done/."""
    base = nobody_tmp
    folders = Folders(base, base / "drop", base / "done", base / "failed")
    for folder in (folders.drop, folders.done, folders.failed, base / "state"):
        folder.mkdir()
        as_nobody.own(folder)
    env = {
        **child_env(
            sandbox,
            folders,
            PRODUCTIV_RETRY_INITIAL_SECONDS="0.2",
            PRODUCTIV_RETRY_MAX_SECONDS="0.4",
        ),
        **as_nobody.env,
    }
    child = Child(env, command=as_nobody.argv, cwd=Path("/"))
    try:
        wait_for(lambda: " ready " in child.stderr)
        folders.done.chmod(0o555)  # done/ stops taking files: read-only for its owner
        write(folders.drop / "a.csv", b"kept").chmod(0o644)
        wait_for(lambda: " folder_not_writable " in child.stderr, timeout=20)
        assert (folders.drop / "a.csv").read_bytes() == b"kept"
        assert list(folders.done.iterdir()) == []
        assert sandbox.count("put") == 0  # not sent: it could not have been moved
        folders.done.chmod(0o755)
        wait_for(lambda: (folders.done / "a.csv").exists(), timeout=20)
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        child.close()
    [problem] = [line for line in child.lines if " folder_not_writable " in line]
    assert f"folder={folders.done} " in problem and "no write permission" in problem
    assert sandbox.count("put") == sandbox.count("put", 200) == 1  # sent once, when movable
    assert not [line for line in child.lines if " retrying " in line]  # not an outage
    assert (folders.done / "a.csv").read_bytes() == b"kept"


def test_a_full_disk_keeps_the_file_in_drop_until_there_is_room(sandbox, tmp_path, daemon_factory):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        folders = Folders(mnt, mnt / "drop", mnt / "done", mnt / "failed")
        for folder in (folders.drop, folders.done, folders.failed):
            folder.mkdir()
        write(folders.drop / "too-big.csv", b"x" * 100)
        filler = mnt / "filler"
        with pytest.raises(OSError), filler.open("wb") as out:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
        daemon, logs_json = daemon_factory(folders, max_file_size=10)
        with daemon:
            wait_for(lambda: len(logs_json.events("retrying")) >= 2)
            assert folders.files(folders.drop) == ["too-big.csv"]
            # (a sidecar may flicker: created, refused its bytes, removed again)
            assert not [f for f in folders.files(folders.failed) if not f.endswith(".error.json")]
            filler.unlink()
            wait_for(lambda: (folders.failed / "too-big.csv.error.json").exists())
        assert "No space left" in logs_json.events("retrying")[0]["reason"]
        assert (folders.failed / "too-big.csv").read_bytes() == b"x" * 100
        assert folders.files(folders.failed) == ["too-big.csv", "too-big.csv.error.json"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("offset", [3600.0, -3600.0])
def test_uploads_work_whichever_way_the_apis_clock_is_off(daemon, folders, sandbox, offset):
    sandbox.clock_offset = offset
    sandbox.token_seconds = 2  # and tokens must be refreshed meanwhile
    with daemon():
        for n in range(3):
            write(folders.drop / f"f{n}.csv", f"{n}".encode())
            done_soon(folders, f"f{n}.csv")
            time.sleep(0.7)  # spread the uploads over more than one token lifetime
    assert sandbox.count("token") >= 2
    assert sandbox.count("put", 403) == 0


HOSTILE = [
    unicodedata.normalize("NFC", "café-é.csv"),
    unicodedata.normalize("NFD", "café-é.csv"),
    "with spaces .csv",
    "100% sure.csv",
    "#hash#.csv",
    "what?.csv",
    "a&b=c.csv",
    "plus+plus.csv",
    "-leading-dash.csv",
    "line\nbreak.csv",
    "quote\"'.csv",
    "x" * 251 + ".csv",  # 255 bytes
    "ü" * 125 + ".csv",  # 254 bytes of UTF-8
]


def test_hostile_names_upload_under_exactly_their_name(
    daemon, folders, sandbox, logs_json: Captured
):
    for name in HOSTILE:
        write(folders.drop / name, name.encode())
    bad = os.fsdecode(b"latin1-\xe9.csv")
    write(folders.drop / bad, b"x")
    with daemon():
        done_soon(folders, *HOSTILE, timeout=30)
        wait_for(lambda: (folders.failed / (bad + ".error.json")).exists())
    for name in HOSTILE:
        assert sandbox.stored(name) == name.encode(), name
    asked = {n for r in sandbox.requests for n in r.names}
    assert asked == set(HOSTILE)  # the NFC and NFD names stay two different names
    assert len(logs_json.text.splitlines()) == len(logs_json.events())  # one line per event


def test_hard_links_are_two_files(daemon, folders, sandbox):
    write(folders.drop / "one.csv", b"shared")
    os.link(folders.drop / "one.csv", folders.drop / "two.csv")
    with daemon():
        done_soon(folders, "one.csv", "two.csv")
    assert sandbox.stored("one.csv") == sandbox.stored("two.csv") == b"shared"


def test_a_file_replaced_during_upload_is_sent_again_as_the_new_version(daemon, folders, sandbox):
    sandbox.inject("put", count=1, delay=1.0)
    write(folders.drop / "swap.csv", b"old version")
    with daemon() as service:
        wait_for(lambda: service.uploader.sending == 1)
        write(folders.drop / ".swap.tmp", b"new version")
        os.replace(folders.drop / ".swap.tmp", folders.drop / "swap.csv")
        wait_for(lambda: sandbox.count("put", 200) == 2)
        done_soon(folders, "swap.csv")
    assert sandbox.stored("swap.csv") == b"new version"
    assert (folders.done / "swap.csv").read_bytes() == b"new version"


def test_a_fifo_never_blocks_the_pipeline(daemon, folders, sandbox):
    os.mkfifo(folders.drop / "pipe.csv")  # opening it for reading would block forever
    with daemon():
        write(folders.drop / "after.csv", b"x")
        done_soon(folders, "after.csv")
    assert (folders.drop / "pipe.csv").exists()


@pytest.mark.long
def test_a_backlog_and_a_burst_all_go_through(daemon, folders, sandbox):
    for n in range(2000):
        write(folders.drop / f"b{n:05}.csv", b"b")
    with daemon(batch_size=100, upload_concurrency=4):
        for n in range(500):
            write(folders.drop / "users" / f"u{n:04}.csv", b"u")
        # a counter first: listing done/ at every poll cost more than the daemon's work
        wait_for(lambda: sandbox.arrived["put"] >= 2500, timeout=120)
        wait_for(lambda: len(folders.files(folders.done)) == 2500, timeout=30)
    assert folders.files(folders.drop) == []
    assert sandbox.count("put", 200) == 2500


def test_a_file_swapped_for_a_symlink_before_its_put_is_never_followed(
    daemon, folders, sandbox, tmp_path
):
    secret = write(tmp_path / "outside.txt", b"must never leave this host")
    sandbox.inject("urls", count=1, delay=1.0)  # time to swap while the URL is being fetched
    write(folders.drop / "a.csv", b"fine")
    with daemon() as service:
        wait_for(lambda: sandbox.arrived["urls"] == 1 and len(service.stabiliser) == 0)
        os.unlink(folders.drop / "a.csv")
        os.symlink(secret, folders.drop / "a.csv")
        wait_for(lambda: sandbox.count("urls") == 1)
        time.sleep(0.5)  # an observation window for a PUT that must not happen
    assert sandbox.count("put") == 0
    assert (folders.drop / "a.csv").is_symlink()


def test_done_and_failed_files_keep_their_permissions(daemon, folders, sandbox):
    write(folders.drop / "private.csv", b"x").chmod(0o600)
    write(folders.drop / "shared.csv", b"x").chmod(0o664)
    with daemon():
        done_soon(folders, "private.csv", "shared.csv")
    assert (folders.done / "private.csv").stat().st_mode & 0o777 == 0o600
    assert (folders.done / "shared.csv").stat().st_mode & 0o777 == 0o664
