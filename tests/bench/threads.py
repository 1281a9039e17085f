"""Where the daemon's CPU goes in the burst: CPU per file of each of its threads.

The burst of bench.py (1,000 x 16 KiB, URLs minted before the drop, 4 at a time), with the CPU
of each thread read from /proc/<pid>/task/*/stat before and after; the threads are named from
`py-spy dump` (`pip install py-spy`). Per-thread CPU is far less sensitive to other load on the
machine than the burst's wall-clock ratio. `CODE=<a checkout>` measures that checkout's daemon
(with this checkout's harness), so two versions can be run alternately in the same hour:

    .venv/bin/python tests/bench/threads.py [--runs 3] [--files 1000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return cpu


def thread_names(pid: int) -> dict[int, str]:
    """Python's names of a process's threads, by thread id (from `py-spy dump`)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    dump = subprocess.run(
        [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, check=True
    ).stdout
    return {int(tid): name for tid, name in re.findall(r'Thread (\d+) \(\w+\): "([^"]+)"', dump)}


def burst(files: int) -> None:
    with bench.stage() as stage, bench.folders() as (drop, staging):
        payload = os.urandom(16 * 1024)
        names = [f"m-{n:05}.bin" for n in range(files)]
        for name in names:
            (staging / name).write_bytes(payload)
        stage.mint(names, stage.endpoint)
        with bench.daemon(stage.sandbox, drop) as d:
            time.sleep(0.3)  # every thread started
            named = thread_names(d.proc.pid)
            before, total = thread_cpu(d.proc.pid), d.cpu_seconds()
            t0 = time.monotonic()
            for name in names:
                os.rename(staging / name, drop / name)
            d.wait(lambda: d.count("uploaded") == files, 300)
            after, total = thread_cpu(d.proc.pid), d.cpu_seconds() - total
            last = max(t for t, e in d.events if e.get("event") == "uploaded")
    per_thread: dict[str, float] = {}
    for tid, cpu in after.items():
        name = named.get(tid, f"thread {tid}")
        per_thread[name] = per_thread.get(name, 0.0) + (cpu - before.get(tid, 0.0)) * 1000 / files
    shown = sorted(per_thread.items(), key=lambda kv: -kv[1])
    print(
        f"{files / (last - t0 - bench.SETTLE):.0f} files/s, daemon {total * 1000 / files:.2f}"
        " ms/file: " + ", ".join(f"{name} {ms:.2f}" for name, ms in shown if ms >= 0.005),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    if "CODE" in os.environ:
        bench.ROOT = Path(os.environ["CODE"])  # the daemon runs from there (`python -m watcher`)
    for _ in range(args.runs):
        burst(args.files)


if __name__ == "__main__":
    main()
