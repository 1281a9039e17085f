"""The operator's and the producer's hands for `make systemd-test`: systemctl, the journal, the
config file, dropping files as the producer, and the sandbox's own record of what it received."""

from __future__ import annotations

import json
import re
import shlex
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

from machine import Machine

UNIT = "productiv-watcher.service"
PROGRAM = "/opt/productiv-watcher/venv/bin/productiv-watcher"
ETC = "/etc/productiv-watcher"
CONFIG = f"{ETC}/config.toml"
BASE = "/srv/productiv"
PRODUCER = "alice"  # a producer account in the drop group, with the README's umask 0027


class Reporter(Protocol):
    def check(
        self, name: str, ok: bool, why: str = "", evidence: list[str] | None = None
    ) -> bool: ...


def wait_until(condition: Callable[[], Any], timeout: float) -> Any:
    """Poll until `condition` is truthy or the deadline passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def event_lines(lines: list[str], name: str, naming: str = "") -> list[str]:
    """The daemon's text log lines of one event (`<time> <LEVEL> <event> key=value...`) that
    contain `naming`."""
    return [line for line in lines if line.split()[2:3] == [name] and naming in line]


def tail(lines: list[str], count: int = 15) -> list[str]:
    return lines[-count:] if lines else ["(no journal lines)"]


def set_options(text: str, **values: object) -> str:
    """The config file with each `name = value` set: its (commented) line replaced, or appended."""
    for name, value in values.items():
        line = f"{name} = {json.dumps(value)}"
        text, found = re.subn(rf"^#?\s*{name}\s*=.*$", line, text, count=1, flags=re.M)
        if not found:
            text += line + "\n"
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Driver:
    """Runs things in the machine as an operator would, and reads back what happened."""

    def __init__(self, machine: Machine, report: Reporter) -> None:
        self.m = machine
        self.report = report
        self.sandbox = f"http://127.0.0.1:{free_port()}"  # the container shares our network
        self.cursor = ""

    def mark(self) -> None:
        """Journal lines read by `log` start after this point."""
        self.cursor = self.m.cursor()

    def log(self, unit: str = UNIT) -> list[str]:
        return self.m.journal(unit, self.cursor)

    def show(self, unit: str = UNIT) -> dict[str, str]:
        names = "ActiveState,SubState,Result,MainPID,NRestarts,ExecMainStatus,StatusText"
        out = self.m.run("systemctl", "show", unit, f"--property={names}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_active(self, unit: str = UNIT, timeout: float = 20) -> bool:
        return bool(wait_until(lambda: self.show(unit)["ActiveState"] == "active", timeout))

    def drop(self, files: list[str], base: str = BASE, mkdir: tuple[str, ...] = ()) -> None:
        """As the producer, with umask 0027: `mkdir -p` the folders, write each file."""
        script = ["umask 0027", f"cd {base}/drop"]
        script += [f"mkdir -p {shlex.quote(folder)}" for folder in mkdir]
        script += [f"printf 'id,name\\n1,%s\\n' {shlex.quote(f)} > {shlex.quote(f)}" for f in files]
        self.m.sh("\n".join(script), user=PRODUCER)

    def missing(self, files: list[str], folder: str) -> list[str]:
        return [f for f in files if not self.m.path(f"{folder}/{f}").exists()]

    def puts(self, file: str) -> int:
        """How many PUTs of this file (its path in drop/) the sandbox answered: its object key
        ends in `<type>/<name>`, the type `default` for a file directly in drop/."""
        kind, _, name = file.rpartition("/")
        key = f"/{kind or 'default'}/{name}"
        with urllib.request.urlopen(f"{self.sandbox}/_sandbox/requests", timeout=10) as answer:
            recorded = json.load(answer)
        return sum(1 for r in recorded if r["endpoint"] == "put" and r["path"].endswith(key))

    def inject(self, **fault: object) -> None:
        request = urllib.request.Request(
            f"{self.sandbox}/_sandbox/faults", data=json.dumps(fault).encode(), method="POST"
        )
        urllib.request.urlopen(request, timeout=10).close()

    def edit_config(self, path: str = CONFIG, **values: object) -> None:
        config = self.m.path(path)
        config.write_text(set_options(config.read_text(), **values))

    def all_done(self, label: str, files: list[str], base: str, unit: str) -> None:
        """Check that every file reaches done/, each PUT once, with no `retrying` line."""
        wait_until(lambda: not self.missing(files, f"{base}/done"), 30)
        missing = self.missing(files, f"{base}/done")
        lines = self.log(unit)
        self.report.check(
            f"{label}: all {len(files)} files reach done/",
            not missing,
            f"after 30 s these are not in {base}/done: {', '.join(missing)}",
            tail(lines),
        )
        retrying = event_lines(lines, "retrying")
        self.report.check(
            f"{label}: no `retrying` line",
            not retrying,
            f"{len(retrying)} `retrying` line(s) in the journal of {unit}; the first ones:",
            retrying[:5],
        )
        counts = {f: self.puts(f) for f in files}
        again = ", ".join(f"{f}: {n}" for f, n in sorted(counts.items()) if n != 1)
        self.report.check(
            f"{label}: each file PUT exactly once",
            not again,
            f"PUTs per file as the sandbox counted them: {again}",
        )
