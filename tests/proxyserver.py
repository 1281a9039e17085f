"""A real CONNECT proxy for tests: proxy.py (PyPI) on loopback, with a plugin that records the
target of every request it forwards or tunnels, at the moment it arrives."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXY = shutil.which("proxy", path=str(Path(sys.executable).parent))


@dataclass
class Proxy:
    port: int
    record: Path

    def url(self, login: str = "") -> str:
        return f"http://{login + '@' if login else ''}127.0.0.1:{self.port}"

    def seen(self) -> list[str]:
        """`CONNECT host:port` (or `PUT host:port`...) per request, oldest first."""
        return self.record.read_text().splitlines() if self.record.exists() else []

    def forget(self) -> None:
        self.record.unlink(missing_ok=True)


@contextmanager
def connect_proxy(folder: Path, basic_auth: str | None = None) -> Iterator[Proxy]:
    """proxy.py until the block ends; `basic_auth` ("user:password") makes it demand a login."""
    assert PROXY, "proxy.py is installed by the test extras"
    folder.mkdir(parents=True, exist_ok=True)
    port_file, record = folder / "port", folder / "seen"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROXY_RECORD": str(record)}
    command = [PROXY, "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    command += ["--num-workers", "1", "--num-acceptors", "1", "--log-level", "WARNING"]
    command += ["--plugins", "tests.proxy_plugin.RecordTargets"]
    command += ["--basic-auth", basic_auth] if basic_auth else []
    proc = subprocess.Popen(
        command, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("proxy.py did not start")
            time.sleep(0.02)
        yield Proxy(int(port_file.read_text()), record)
    finally:
        proc.terminate()
        proc.wait(10)
