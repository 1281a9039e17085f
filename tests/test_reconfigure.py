"""One way to change settings at run time: each component's `reconfigure(settings)`, the
reload that calls them all, and the folders resolved once into `Paths` (no asserts)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

import watcher
from tests.conftest import Captured, Daemon, Folders, make_settings, wait_for
from watcher.daemon.service import Service
from watcher.pipeline.stability import Stabiliser
from watcher.pipeline.watching import locate
from watcher.pipeline.workqueue import WorkQueue
from watcher.remote.breakers import Gates
from watcher.sandbox.productiv import Sandbox
from watcher.settings import ConfigError, Paths, Settings


def settings(**values: object) -> Settings:
    return Settings(app_id="a", access_token="t", **values)  # type: ignore[arg-type]


# -- Paths -----------------------------------------------------------------------------------


def test_the_folders_are_resolved_once_and_none_is_left_unset(tmp_path):
    paths = Paths.of(settings(drop_dir=tmp_path / "drop"))
    assert paths == Paths(
        tmp_path / "drop", tmp_path / "done", tmp_path / "failed", tmp_path / "state"
    )
    chosen = settings(drop_dir=tmp_path / "in", done_dir=tmp_path / "out", state_dir="/srv/s")
    assert (Paths.of(chosen).done, Paths.of(chosen).state) == (tmp_path / "out", Path("/srv/s"))
    with pytest.raises(ConfigError, match=r"^invalid setting drop_dir: Field required$"):
        Paths.of(settings(state_dir=tmp_path / "state"))


def test_production_code_has_no_assert_statement():
    """`python -O` strips them: a check that matters is an `if` with an explicit error."""
    package = Path(watcher.__file__).parent
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Assert)
    ]
    assert found == []


# -- each component's reconfigure ------------------------------------------------------------


def test_the_stabiliser_takes_a_new_settle_time(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"x")
    now = [0.0]
    work = WorkQueue(lambda: now[0], lambda spots: None)
    stabiliser = Stabiliser(10.0, work, lambda: now[0])
    stabiliser.reconfigure(settings(settle_seconds=1.0))
    spot = locate(str(path), str(tmp_path), None, ())
    assert spot is not None
    stabiliser.notice([spot])
    assert stabiliser.step(now[0]) == 1.0  # looked at again once the new settle time is up
    now[0] = 1.0
    stabiliser.step(now[0])
    assert [item.path for item in work.take_batch(10, timeout=0)] == [path]


def test_the_gates_take_new_backoff_settings_from_their_next_step():
    gates = Gates(1.0, 8.0, jitter=lambda: 1.0)
    gates.reconfigure(settings(retry_initial_seconds=3.0, retry_max_seconds=5.0))
    assert [gates.delay(step) for step in (1, 2, 3)] == [3.0, 5.0, 5.0]


def test_the_chores_take_a_new_status_interval(sandbox: Sandbox, folders: Folders):
    service = Service(make_settings(sandbox, folders))
    try:
        service.operations.reconfigure(make_settings(sandbox, folders, status_seconds=40.0))
        service.operations.publish("running")
    finally:
        service.mover.close()
        service.drop.close()
        service.api.close()
    doc = json.loads((folders.root / "state" / "status.json").read_text())
    assert doc["every_seconds"] == 40.0 and doc["drop_dir"] == str(folders.drop)


# -- the reload, end to end ------------------------------------------------------------------


def test_a_reload_reconfigures_every_component_at_once(
    sandbox: Sandbox, folders: Folders, logs_json: Captured
):
    before = make_settings(sandbox, folders, settle_seconds=60.0)
    after = make_settings(
        sandbox,
        folders,
        settle_seconds=0.1,  # the stabiliser
        retry_initial_seconds=40.0,  # the gates
        retry_max_seconds=80.0,
        status_seconds=30.0,  # the chores
        batch_size=7,  # the uploader
    )
    with Daemon(before, reload=lambda: after) as service:
        service.request_reload()
        wait_for(lambda: logs_json.events("reloaded"), what="the reload")
        sandbox.inject("put", count=1, status=503)
        (folders.drop / "a.csv").write_bytes(b"x")  # settles in 0.1 s now, not 60
        [retrying] = wait_for(lambda: logs_json.events("retrying"), what="the storage's backoff")
        status = folders.root / "state" / "status.json"
        wait_for(lambda: json.loads(status.read_text())["every_seconds"] == 30.0, 20, "status")
    [reloaded] = logs_json.events("reloaded")
    assert set(reloaded["applied"]) == {
        "settle_seconds",
        "retry_initial_seconds",
        "retry_max_seconds",
        "status_seconds",
        "batch_size",
    }
    assert retrying["what"] == "storage" and 20.0 <= retrying["seconds"] <= 40.0
    assert os.path.exists(folders.drop / "a.csv")  # waits out the new backoff in drop/
