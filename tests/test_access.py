"""`check` judges the folders for the service's user, not for root: the pure judgement from
tables, the same judgement against the kernel's (as nobody), and `check --as-user` end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cli
from watcher.disk.access import MOVE, STICKY, Seen, User, blocker, fix, permits, problem, refusal

NOBODY, NOGROUP = 65534, 65534
ALICE, DROP = 1001, 2001
SERVICE = User("svc", 999, frozenset({999, DROP}), "test")


def seen(mode: int, owner: int = ALICE, group: int = DROP, path: str = "/d") -> Seen:
    return Seen(Path(path), 0o040000 | mode, owner, group)


@pytest.mark.parametrize(
    ("mode", "owner", "group", "need", "allowed"),
    [
        (0o2770, ALICE, DROP, "rwx", True),  # what install.sh makes: the drop group works
        (0o2750, ALICE, DROP, "rwx", False),  # a producer's umask 0027: the loop
        (0o2750, ALICE, DROP, "rx", True),
        (0o700, 999, DROP, "rwx", True),  # the service's own
        (0o077, 999, DROP, "rwx", False),  # the owner's bits decide for the owner
        (0o707, ALICE, DROP, "rwx", False),  # ... and the group's for a member
        (0o777, ALICE, 5, "rwx", True),  # others
        (0o770, ALICE, 5, "x", False),
        (0o000, ALICE, 5, "rwx", None),  # root: anything (checked below)
    ],
)
def test_permits_is_the_kernels_rule_without_acls(mode, owner, group, need, allowed):
    if allowed is None:
        assert permits(seen(mode, owner, group), User("root", 0, frozenset({0}), ""), need)
    else:
        assert permits(seen(mode, owner, group), SERVICE, need) is allowed


def test_blocker_names_the_first_folder_on_the_way():
    top, mid = seen(0o755, 0, 0, "/srv"), seen(0o750, 0, 0, "/srv/p")
    last = seen(0o2770, 0, DROP, "/srv/p/drop")
    assert blocker([top, mid, last], SERVICE) == (mid, "x")  # cannot even reach it
    assert blocker([top, last], SERVICE) is None
    assert blocker([top, seen(0o2750, 0, DROP, "/srv/drop")], SERVICE)[1] == "rwx"


@pytest.mark.parametrize(
    ("folder", "need", "expected"),
    [
        (seen(0o2750, ALICE, DROP), "rwx", "chmod g+rwx /d"),
        (seen(0o500, 999, DROP), "rwx", "chmod u+rwx /d"),
        (seen(0o750, 0, 0), "x", "chmod o+x /d"),
        (seen(0o755, ALICE, 0), "rwx", "chgrp productiv-drop /d && chmod g+rwx /d"),
    ],
)
def test_the_fix_is_the_smallest_command(folder, need, expected):
    assert fix(folder, SERVICE, need, "productiv-drop") == expected


# -- moving a file: the daemon's question before each PUT -----------------------------------

ME, OTHER, GROUP, ELSE = 1000, 2000, 500, 600
NO_WRITE_GROUP = "no write permission for its group"


@pytest.mark.parametrize(
    ("mode", "owner", "group", "file_owner", "uid", "gids", "expected"),
    [
        (0o700, ME, GROUP, None, ME, {GROUP}, None),  # the daemon's own folder
        (0o500, ME, GROUP, None, ME, {GROUP}, "no write permission for its owner"),
        (0o2770, OTHER, GROUP, None, ME, {GROUP}, None),  # the drop folder: 2770, the drop group
        (0o2750, OTHER, GROUP, None, ME, {GROUP}, NO_WRITE_GROUP),  # a producer's umask 0027
        (0o2760, OTHER, GROUP, None, ME, {GROUP}, "no search permission for its group"),
        (0o2730, OTHER, GROUP, None, ME, {GROUP}, None),  # write + search is enough
        (0o2770, OTHER, GROUP, None, ME, {ELSE}, "no write and search permission for others"),
        (0o777, OTHER, GROUP, None, ME, {ELSE}, None),
        (0o070, ME, GROUP, None, ME, {GROUP}, "no write and search permission for its owner"),
        (0o700, OTHER, GROUP, None, 0, set(), None),  # root moves anything
        (0o1777, OTHER, GROUP, OTHER, ME, {GROUP}, STICKY),  # /tmp-like
        (0o1777, OTHER, GROUP, ME, ME, {GROUP}, None),  # its own file
        (0o1777, ME, GROUP, OTHER, ME, {GROUP}, None),  # its own folder
        (0o1770, OTHER, GROUP, None, ME, {GROUP}, None),  # sticky destination: a new name
        (0o1750, OTHER, GROUP, ME, ME, {GROUP}, NO_WRITE_GROUP),
    ],
)
def test_who_may_move_a_file_out_of_a_folder(mode, owner, group, file_owner, uid, gids, expected):
    user = User("me", uid, frozenset(gids), "test")
    assert refusal(seen(mode, owner, group), user, MOVE, file_owner) == expected


@pytest.mark.parametrize(
    ("folder", "fix_text"),
    [
        (seen(0o500, ME, GROUP), "chmod u+wx /d"),
        (seen(0o2750, OTHER, GROUP), "chmod g+wx /d"),
        (seen(0o2770, OTHER, ELSE), "chgrp"),
        (seen(0o1777, OTHER, GROUP), "chmod -t /d"),  # refused for the sticky bit alone
    ],
)
def test_what_to_do_about_a_folder_that_refuses_a_move_says_the_command(folder, fix_text):
    me = User("me", ME, frozenset({GROUP}), "test")
    assert fix(folder, me, MOVE, "productiv-drop").startswith(fix_text)


# -- against the kernel, as nobody -------------------------------------------------------------


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder nobody can reach (pytest's tmp_path sits below a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="pw-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOGROUP), "--clear-groups"]
    return subprocess.run([*prefix, *command], capture_output=True, text=True, check=False)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
@pytest.mark.parametrize(
    ("owner", "group", "mode"),
    [
        (NOBODY, NOGROUP, 0o700),
        (0, NOGROUP, 0o2770),
        (0, NOGROUP, 0o2750),
        (0, 0, 0o777),
        (0, 0, 0o775),
        (NOBODY, 0, 0o077),
        (0, NOGROUP, 0o1770),  # sticky: creating and removing one's own file still works
    ],
)
def test_the_judgement_agrees_with_the_kernel(open_tmp, owner, group, mode):
    folder = open_tmp / "f"
    folder.mkdir()
    os.chown(folder, owner, group)
    folder.chmod(mode)
    nobody = User("nobody", NOBODY, frozenset({NOGROUP}), "test")
    judged = permits(Seen(folder, folder.stat().st_mode, owner, group), nobody, "rwx")
    real = as_nobody("sh", "-c", f"ls {folder} && touch {folder}/x && rm {folder}/x")
    assert judged is (real.returncode == 0), real.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_check_and_the_kernel_agree_on_a_sticky_drop_folder(open_tmp):
    users = open_tmp / "users"
    users.mkdir()
    os.chown(users, 0, NOGROUP)
    users.chmod(0o3770)  # the group may write, but a producer's file is not nobody's to move
    (users / "a.csv").write_bytes(b"x")
    nobody = User("nobody", NOBODY, frozenset({NOGROUP}), "test")
    text = problem("drop_dir/users", users, nobody, "nogroup", moved_out=True)
    assert text is not None and STICKY in text and text.endswith(f"fix: chmod -t {users}")
    assert problem("done_dir/users", users, nobody, "nogroup") is None  # files only arrive
    real = as_nobody("mv", str(users / "a.csv"), str(open_tmp / "a.csv"))
    assert real.returncode != 0 and "Operation not permitted" in real.stderr


# -- check --as-user, end to end --------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give folders to other users")
def test_check_lists_the_folders_the_service_user_cannot_work_in_and_how_to_fix_them(
    open_tmp, sandbox
):
    drop = open_tmp / "drop"
    for folder in (drop, drop / "users", drop / "contracts", open_tmp / "done"):
        folder.mkdir()
        os.chown(folder, NOBODY, NOGROUP)
        folder.chmod(0o2770)
    os.chown(drop / "users", 0, NOGROUP)  # a producer's subfolder, made with umask 0027
    (drop / "users").chmod(0o2750)
    os.chown(open_tmp, NOBODY, NOGROUP)  # failed/ and state/ will be made at start
    env = {**sandbox.env(), "PRODUCTIV_DROP_DIR": str(drop)}

    first = cli("check", "--as-user", "nobody", env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "folders: judged for nobody (uid 65534" in first.stdout
    [line] = [s for s in first.stdout.splitlines() if "FAIL" in s]
    assert line.startswith(f"folders: FAIL drop_dir/users {drop / 'users'}: nobody cannot")
    assert "root:nogroup drwxr-s---" in line
    assert f"failed_dir {open_tmp / 'failed'} will be created at start" in first.stdout
    assert "1 problem(s)" in first.stdout
    assert cli("check", env=env).returncode == 0  # root itself could: that is not the question

    subprocess.run(line.split("fix: ", 1)[1], shell=True, check=True)  # the advice, as given
    second = cli("check", "--as-user", "nobody", env=env)
    assert second.returncode == 0 and "all good" in second.stdout, second.stdout
    real = as_nobody("sh", "-c", f"touch {drop}/users/x && mv {drop}/users/x {open_tmp}/done/")
    assert real.returncode == 0, real.stderr


@pytest.mark.parametrize(
    ("mode", "owner", "blocks"),
    [
        (0o3770, 0, True),  # a shared folder kept sticky by root: producers' files stay put
        (0o1777, ALICE, True),
        (0o3770, 999, False),  # the service's own folder: it may move anyone's files
        (0o2770, 0, False),
    ],
)
def test_a_sticky_folder_blocks_moving_other_users_files_unless_the_service_owns_it(
    mode, owner, blocks
):
    from watcher.disk.access import ANOTHER_USER, STICKY, refusal

    def sticky_blocks(seen: Seen, user: User) -> bool:  # for a producer's file, bits aside
        return refusal(seen, user, "", ANOTHER_USER) == STICKY

    assert sticky_blocks(seen(mode, owner), SERVICE) is blocks
    assert not sticky_blocks(seen(mode, owner), User("root", 0, frozenset({0}), ""))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give folders to other users")
def test_check_names_a_sticky_drop_folder_and_its_fix_lets_the_service_move_files_out(
    open_tmp, sandbox
):
    drop = open_tmp / "drop"
    drop.mkdir()
    os.chown(drop, 0, NOGROUP)  # an existing shared folder, sticky so that users keep theirs
    drop.chmod(0o3770)
    for folder in (open_tmp / "done", open_tmp / "failed", open_tmp / "state"):
        folder.mkdir()
        os.chown(folder, NOBODY, NOGROUP)
    env = {**sandbox.env(), "PRODUCTIV_DROP_DIR": str(drop)}
    first = cli("check", "--as-user", "nobody", env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    [line] = [s for s in first.stdout.splitlines() if "FAIL" in s]
    assert line.startswith(f"folders: FAIL drop_dir {drop}: nobody cannot move other users'")
    assert "root:nogroup drwxrws--T" in line and line.endswith(f"fix: chmod -t {drop}")

    subprocess.run(line.split("fix: ", 1)[1], shell=True, check=True)  # the advice, as given
    second = cli("check", "--as-user", "nobody", env=env)
    assert second.returncode == 0 and "all good" in second.stdout, second.stdout
    (drop / "theirs.csv").write_text("a producer's")  # root's: another user's file
    real = as_nobody("mv", str(drop / "theirs.csv"), str(open_tmp / "done"))
    assert real.returncode == 0, real.stderr
