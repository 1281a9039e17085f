#!/usr/bin/env python3
"""`make systemd-test`: productiv-watcher on a real systemd, installed as the README says.

A fresh clone of the commit under test is bound read-only into a container booted from this
host's own `/` (see machine.py); inside it the README's install steps run unchanged against the
sandbox, a producer account drops files, and each promise the unit makes is checked: upload
without retry loops, the STATUS line, reload, the watchdog, a stop during an upload, invalid
settings, a template instance, a second daemon by hand that stays standby, an upgrade (install.sh
again) and the uninstall. Each check prints
one line, and on failure the journal lines that show why; the run goes on to the next check
unless the rest depends on it. Exit 0: all passed or skipped (the reason is printed); 1: a check
failed.

    sudo python3 tests/systemd_real/run.py
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from machine import Broken, Machine, Skip, preflight
from scenario import SOURCE, Scenario

ROOT = Path(__file__).resolve().parents[2]
BUDGET_SECONDS = 240  # the limit for the whole run
HARD_LIMIT_SECONDS = 420  # a hang is cut here, and everything is torn down


class Report:
    """Prints each step with its start time and duration, and each check's verdict."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.failed: list[str] = []

    def clock(self) -> str:
        return f"[{time.monotonic() - self.started:6.1f}s]"

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        began = time.monotonic()
        print(f"{self.clock()} {title}", flush=True)
        yield
        print(f"{'':9} ({time.monotonic() - began:.1f}s)", flush=True)

    def check(self, name: str, ok: bool, why: str = "", evidence: list[str] | None = None) -> bool:
        if ok:
            print(f"{'':9} ok    {name}", flush=True)
            return True
        self.failed.append(name)
        print(f"{'':9} FAIL  {name}: {why}", flush=True)
        for line in evidence or []:
            print(f"{'':15}| {line}", flush=True)
        return False


def clone(into: Path) -> None:
    """A fresh clone of the checked-out commit (uncommitted changes are not part of the test)."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "--quiet", sha], check=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print(
        f"{'':9} testing commit {sha[:12]}" + (" (uncommitted changes left out)" if dirty else "")
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _too_long(signum: int, frame: FrameType | None) -> None:
    raise Broken(f"the run passed its hard limit of {HARD_LIMIT_SECONDS} s")


def main() -> int:
    try:
        preflight()
    except Skip as why:
        print(f"SKIP make systemd-test: {why}")
        return 0
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(HARD_LIMIT_SECONDS)
    report = Report()
    try:
        with tempfile.TemporaryDirectory(prefix="productiv-source.", dir="/var/tmp") as scratch:
            with report.step("clone the commit under test"):
                clone(Path(scratch) / "source")
            machine = Machine(Path(scratch) / "source", SOURCE)
            try:
                with report.step("boot systemd in a container on an overlay of /"):
                    machine.boot()
                for title, step in Scenario(machine, report).steps():
                    with report.step(title):
                        step()
            except Broken as broken:  # said before the tear down, under the step it ended
                report.failed.append("(the steps after it did not run)")
                print(f"{'':9} STOPPED: {broken}", flush=True)
            finally:
                with report.step("tear down: kill the container by pid, unmount, remove"):
                    machine.close()
    except Skip as why:
        print(f"SKIP make systemd-test: {why}")
        return 0
    except Broken as broken:
        report.failed.append("(stopped early)")
        print(f"{report.clock()} STOPPED: {broken}", flush=True)
    except KeyboardInterrupt as interrupt:
        print(f"{report.clock()} interrupted ({interrupt or 'SIGINT'}): torn down", flush=True)
        return 130
    finally:
        signal.alarm(0)
    total = time.monotonic() - report.started
    report.check(
        f"the whole run within {BUDGET_SECONDS} s",
        total <= BUDGET_SECONDS,
        f"it took {total:.0f} s",
    )
    if report.failed:
        print(f"systemd-test: {len(report.failed)} check(s) failed in {total:.0f} s:")
        for name in report.failed:
            print(f"  - {name}")
        return 1
    print(f"systemd-test: every check passed in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
