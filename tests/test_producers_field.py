"""Producers are other accounts, with their own umasks: what they make must either work or be
named, once, with a fix that works (the daemon runs as `nobody` in the drop group)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess

import pytest

from tests.helpers import cli, done_soon, wait_for
from tests.unprivileged import field, installed_layout


def test_a_type_folder_made_with_umask_0077_is_named_once_with_a_fix_that_works(sandbox, as_nobody):
    with field(as_nobody) as f:
        installed_layout(f)
        other = f.folders.drop / "other"  # `mkdir other` by a producer with umask 0077
        other.mkdir()
        os.chown(other, f.producer, f.drop_gid)
        other.chmod(0o2700)
        f.produce(other / "hidden.csv", b"cannot be seen")
        f.start(sandbox, PRODUCTIV_RESCAN_SECONDS="0.5")
        [problem] = wait_for(lambda: f.events("folder_not_writable"))
        assert problem["folder"] == str(other) and problem["mode"] == "drwx--S---"
        assert "cannot list it" in problem["reason"]
        assert problem["fix"].startswith(f"chmod g+rwx {other}")
        wait_for(lambda: f.status().get("folders"))
        shown = cli("status", env={"PRODUCTIV_DROP_DIR": str(f.folders.drop)})
        assert f"FOLDER: files wait: {other}" in shown.stdout, shown.stdout

        subprocess.run(problem["fix"].split(" (")[0], shell=True, check=True)  # as it says
        (other / "hidden.csv").chmod(0o640)  # the file, made with 0077 too, as README says
        done_soon(f.folders, "other/hidden.csv", timeout=10)
        f.stop()
    assert len(f.events("folder_not_writable")) == 1  # once, not once per rescan
    assert not f.events("scan_failed")
    assert [e["folder"] for e in f.events("folder_writable")] == [str(other)]


@pytest.mark.long
def test_a_folder_a_producer_plants_at_the_lock_and_canary_names_is_moved_aside(sandbox, as_nobody):
    """A producer's 0555 folder with a file in it cannot be emptied by the service: at the lock's
    name the daemon exited 78 at every start (systemd gives up), at the canary's it judged a
    canary never made and said the watch was deaf at every check."""
    with field(as_nobody) as f:
        installed_layout(f)

        def planted(name: str) -> None:
            folder = f.folders.drop / name
            folder.mkdir()
            f.produce(folder / "x.csv", b"theirs")
            os.chown(folder, f.producer, f.drop_gid)
            folder.chmod(0o555)

        planted(".productiv-watcher.lock")
        child = f.start(sandbox, PRODUCTIV_CANARY_SECONDS="0.3")
        assert child.proc.poll() is None, child.stderr
        planted(".productiv-watcher-canary.tmp")
        canary = f.folders.drop / ".productiv-watcher-canary"

        def swapped() -> bool:  # the daemon makes its canary anew meanwhile: try until it lands
            with contextlib.suppress(FileNotFoundError):
                canary.unlink()
            with contextlib.suppress(NotADirectoryError, FileExistsError):
                os.rename(f.folders.drop / ".productiv-watcher-canary.tmp", canary)
                return True
            return False

        wait_for(swapped, what="a folder at the canary's name")
        wait_for(lambda: f.events("canary_planted"), what="the canary's name cleared")
        f.produce(f.folders.drop / "a.csv", b"a")
        done_soon(f.folders, "a.csv", timeout=10)
        f.stop()
        asides = [p for p in f.folders.drop.iterdir() if ".planted-" in p.name]
        assert len(asides) == 2 and all((a / "x.csv").read_bytes() == b"theirs" for a in asides)
    [lock] = f.events("lock_planted")
    aside = r"moved aside to \.productiv-watcher{}\.planted-[0-9a-f]{{16}}$"
    assert "was a folder" in lock["message"]
    assert re.search(aside.format(r"\.lock"), lock["message"]), lock["message"]
    messages = [e["message"] for e in f.events("canary_planted")]
    assert any(re.search(aside.format("-canary"), m) for m in messages), messages
    assert not f.events("watch_deaf")
