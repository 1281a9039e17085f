"""The test helpers that other tests lean on: if they quietly depended on where the checkout lives,
a clone in a private folder would fail where CI's clone passes."""

from __future__ import annotations

import json
import os
import subprocess

from tests.helpers import ROOT

WHERE = (
    "import json, os, sys, pydantic_core, watcher; print(json.dumps([sys.executable,"
    " watcher.__file__, pydantic_core.__file__, os.access(sys.executable, os.X_OK)]))"
)


def test_the_daemon_run_as_nobody_needs_nothing_from_the_checkout(as_nobody):
    result = subprocess.run(
        [*as_nobody.prefix, as_nobody.python, "-c", WHERE],
        env={**os.environ, **as_nobody.env},
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    executable, package, compiled, runnable = json.loads(result.stdout)
    assert runnable, f"nobody runs {executable} only thanks to setpriv's leftover capabilities"
    assert not executable.startswith(f"{ROOT}{os.sep}")
    for module in (package, compiled):
        assert module.startswith(f"{as_nobody.site}{os.sep}"), module
