"""Producers are other accounts, with their own umasks: what they make must either work or be
named, once, with a fix that works (the daemon runs as `nobody` in the drop group)."""

from __future__ import annotations

import os
import subprocess

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
