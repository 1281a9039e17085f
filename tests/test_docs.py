"""The documentation says what the code does: every setting in docs/configuration.md and the
example config, every live setting in the reload list, every event name both in the code's one
list (watcher/events.py) and in docs/logging.md, and no event logged under another name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT
from watcher.events import EVENTS
from watcher.pipeline.fates import LET_GO
from watcher.settings import LIVE_SETTINGS, Settings

CONFIGURATION = ROOT / "docs" / "configuration.md"
README_LIMIT_BYTES = 12 * 1024


def test_every_setting_is_in_the_example_config_and_the_configuration_page():
    example = (ROOT / "deploy" / "config.example.toml").read_text()
    page = CONFIGURATION.read_text()
    for name in Settings.model_fields:
        assert re.search(rf"^#? ?{name} = ", example, re.M), f"{name} missing from the example"
        assert f"`{name}`" in page, f"{name} missing from docs/configuration.md's table"


def test_the_configuration_page_lists_every_setting_a_reload_applies():
    page = CONFIGURATION.read_text()
    [said] = re.findall(r"^## Changing settings at run time\n(.*?)(?=^## |\Z)", page, re.M | re.S)
    for name in LIVE_SETTINGS:
        prefix = name.split("_")[0]
        assert f"`{name}`" in said or f"`{prefix}_*`" in said, (
            f"{name} missing from the reload list"
        )


def logged_event_names() -> set[str]:
    """Every event name the code logs: `event(log, "name", ...)`, `extra={"event": "name"}` and
    the chores' `Trouble("name", ...)`, read from the source."""
    names = set()
    for path in (ROOT / "watcher").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            called = getattr(node.func, "id", getattr(node.func, "attr", ""))
            found = {"event": node.args[1:2], "Trouble": node.args[:1]}.get(called, [])
            for extra in (k.value for k in node.keywords if k.arg == "extra"):
                if isinstance(extra, ast.Dict):
                    pairs = zip(extra.keys, extra.values, strict=True)
                    found += [
                        v for k, v in pairs if isinstance(k, ast.Constant) and k.value == "event"
                    ]
            names |= {n.value for n in found if isinstance(n, ast.Constant)}
    return names


def documented_events() -> set[str]:
    """The names in the first column of docs/logging.md's event table."""
    page = (ROOT / "docs" / "logging.md").read_text()
    table = [line.split("|")[1] for line in page.splitlines() if line.startswith("| `")]
    return {name for cell in table for name in re.findall(r"`([a-z_]+)`", cell)}


def test_every_logged_event_is_in_the_one_list_of_names():
    names = logged_event_names()
    assert {"started", "folder_not_writable", "scan_failed", "metrics"} <= names  # the reader
    assert sorted(names - set(EVENTS)) == []
    assert set(LET_GO.values()) <= set(EVENTS)  # logged by a lookup the source scan cannot see
    assert len(set(EVENTS)) == len(EVENTS)


def test_the_list_of_event_names_and_the_logging_page_agree_both_ways():
    documented = documented_events()
    assert sorted(set(EVENTS) - documented) == [], "in watcher/events.py, not in docs/logging.md"
    assert sorted(documented - set(EVENTS)) == [], "in docs/logging.md, not in watcher/events.py"


def test_the_readme_fits_on_a_few_screens_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < README_LIMIT_BYTES
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README does not link docs/{page.name}"


def test_the_module_map_names_every_module():
    """docs/design.md's map is where a newcomer starts: a module missing from it is hidden."""
    page = (ROOT / "docs" / "design.md").read_text()
    modules = [
        p.relative_to(ROOT / "watcher")
        for p in (ROOT / "watcher").rglob("*.py")
        if p.name not in {"__init__.py", "__main__.py"}
    ]
    assert modules
    assert [str(m) for m in modules if m.name not in page] == []
    packages = {m.parent.name for m in modules if m.parent.name}
    assert [p for p in sorted(packages) if f"{p}/" not in page] == []


# The layers of the package, lowest first: a module imports only from lower layers or its own
# package, so that a newcomer can read it bottom-up (the shared vocabulary at the top level:
# settings, logs, events, items, heartbeats, metrics).
LAYERS = {"": 0, "disk": 1, "remote": 1, "sandbox": 1, "pipeline": 2, "daemon": 3, "commands": 4}


def imported_packages(path: Path) -> set[str]:
    """The watcher subpackages (or "" for a top-level module) a module imports from."""
    package = path.parent.relative_to(ROOT / "watcher").as_posix().replace(".", "")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = [package] if package and node.level == 1 else []
            parts = [*base, *(node.module or "").split(".")]
            head = parts[0] if parts and parts[0] in LAYERS else ""
            if not node.module and node.level == 1 and package:
                head = package
            found.add(head)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("watcher."):
            name = node.module.split(".")[1]
            found.add(name if name in LAYERS else "")
    return found


def test_each_subpackage_imports_only_from_lower_layers():
    wrong = []
    for path in (ROOT / "watcher").rglob("*.py"):
        if path.name in {"__init__.py", "__main__.py"}:
            continue
        own = path.parent.relative_to(ROOT / "watcher").as_posix().replace(".", "")
        for other in imported_packages(path) - {own}:
            if LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports from watcher/{other or '*.py'}")
    assert wrong == []
