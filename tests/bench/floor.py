"""The floor under issue 12's CPU target: the per-file work the issues require, nothing else.

One thread, no queues, no watch, no API: for each of N x 16 KiB files with a URL signed ahead
of time, the settle rule's two looks, the open and check of the version that settled, the read
with MD5 and SHA-256, the PUT through libcurl's multi interface (4 at a time, the ETag checked
against the MD5), the look after the PUT, a look before the move, the rename into done/ and a
look at it there, the receipt (the daemon's fields, scrubbed) and a JSON log line (scrubbed,
written and flushed); per batch of 50, a look at the folders (could the files move?); every 25
files, the fsync of the journal and of both folders. Its CPU per file is what the daemon's
could come down to if all else it does (the inotify watch, the URL requests, handing files
between threads, the late-write watch, heartbeats, status) were free. Run it beside
`threads.py`, with the same `--files`:

    .venv/bin/python tests/bench/floor.py [--runs 3] [--files 3000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import pycurl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from watcher.logs import REDACT

BATCH = 50
SIZE = 16 * 1024
CONCURRENCY = 4
FSYNC_EVERY = 25


def client(drop: str, done: str, jobs: list[tuple[str, str]]) -> float:
    """Upload and move every (name, URL); the process's CPU seconds per file."""
    REDACT.add(["floor-client-secret"])  # what the daemon's scrubber holds: a secret, a token
    REDACT.add_token("eyJhbGciOi.floor-token.signature_part")
    started = time.process_time()
    with open(f"{done}/receipts.jsonl", "a") as receipts, open(os.devnull, "w") as log:
        Floor(drop, done, receipts, log).run(jobs)
    return (time.process_time() - started) / len(jobs)


class Floor:
    def __init__(self, drop: str, done: str, receipts: TextIO, log: TextIO) -> None:
        self.drop, self.done, self.receipts, self.log = drop, done, receipts, log
        self.multi = pycurl.CurlMulti()
        self.free = []
        for _ in range(CONCURRENCY):
            curl = pycurl.Curl()
            curl.setopt(pycurl.UPLOAD, 1)
            curl.setopt(pycurl.NOSIGNAL, 1)
            curl.setopt(pycurl.HTTPHEADER, ["Expect:"])
            curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
            self.free.append(curl)
        self.running: dict[pycurl.Curl, tuple[str, int, Any, Any, list[bytes]]] = {}

    def run(self, jobs: list[tuple[str, str]]) -> None:
        pending, finished = list(jobs), 0
        while pending or self.running:
            while self.free and pending:
                if len(pending) % BATCH == 0:  # a batch: could its files move afterwards?
                    os.stat(self.drop)
                    os.stat(self.done)
                self.start(self.free.pop(), *pending.pop())
            self.multi.select(0.1)
            while self.multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            while True:
                queued, ok, failed = self.multi.info_read()
                for curl in ok:
                    self.finish(curl)
                    finished += 1
                    if finished % FSYNC_EVERY == 0:
                        self.sync()
                if failed:
                    raise SystemExit(f"a PUT failed: {failed[0][2]}")
                if not queued:
                    break

    def sync(self) -> None:
        """The journal and both folders on disk (the finisher's group commit)."""
        self.receipts.flush()
        os.fsync(self.receipts.fileno())
        for folder in (self.drop, self.done):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)

    def start(self, curl: pycurl.Curl, name: str, url: str) -> None:
        path = f"{self.drop}/{name}"
        os.lstat(path)
        size = os.lstat(path).st_size  # the settle rule's two looks
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        os.fstat(fd)  # the version that settled?
        md5, sha256, headers = hashlib.md5(), hashlib.sha256(), []

        def read(n: int) -> bytes:
            block = os.read(fd, n)
            md5.update(block)
            sha256.update(block)
            return block

        curl.setopt(pycurl.READFUNCTION, read)
        curl.setopt(pycurl.HEADERFUNCTION, headers.append)
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.INFILESIZE_LARGE, size)
        self.running[curl] = (name, fd, md5, sha256, headers)
        self.multi.add_handle(curl)

    def finish(self, curl: pycurl.Curl) -> None:
        name, fd, md5, sha256, headers = self.running.pop(curl)
        self.multi.remove_handle(curl)
        os.fstat(fd)  # changed while it was sent?
        os.close(fd)
        etag = next(h.split(b":", 1)[1] for h in headers if h.lower().startswith(b"etag:"))
        if etag.strip().strip(b'"').decode() != md5.hexdigest():
            raise SystemExit(f"{name}: the ETag is not the MD5 sent")
        source, target = f"{self.drop}/{name}", f"{self.done}/{name}"
        os.lstat(source)  # still the file that was sent?
        os.rename(source, target)
        os.lstat(target)  # and intact where it went?
        status = curl.getinfo(pycurl.RESPONSE_CODE)
        receipt = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "file": name,
            "type": None,
            "bytes": SIZE,
            "sha256": sha256.hexdigest(),
            "etag_verified": True,
            "object": name,
            "status": status,
            "attempts": 1,
            "seconds": 0.01,
            "outcome": "uploaded",
            "moved_to": f"done/{name}",
        }
        self.receipts.write(json.dumps(REDACT.doc(receipt), ensure_ascii=False) + "\n")
        line = {"ts": time.time(), "level": "info", "event": "uploaded", "file": name}
        line |= {"type": None, "bytes": SIZE, "seconds": 0.01, "status": status}
        self.log.write(REDACT(json.dumps(line, ensure_ascii=False)) + "\n")
        self.log.flush()
        self.free.append(curl)


def run(files: int) -> float:
    """A fresh server and fresh files; the client runs in its own process (its CPU alone)."""
    import bench

    with (
        tempfile.TemporaryDirectory(prefix="pw-s3-") as s3root,
        bench.rclone_s3(Path(s3root), bench.BUCKET) as endpoint,
        tempfile.TemporaryDirectory() as work,
    ):
        s3 = bench.s3_client(endpoint)
        drop, done = Path(work, "drop"), Path(work, "done")
        drop.mkdir()
        done.mkdir()
        payload, lines = os.urandom(SIZE), []
        for n in range(files):
            name = f"m-{n:05}.bin"
            (drop / name).write_bytes(payload)
            params = {"Bucket": bench.BUCKET, "Key": name}
            lines.append(f"{name}\t{s3.generate_presigned_url('put_object', Params=params)}")
        listing = Path(work, "jobs")
        listing.write_text("\n".join(lines))
        out = subprocess.run(
            [sys.executable, __file__, "--client", str(drop), str(done), str(listing)],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument(
        "--client", nargs=3, metavar=("DROP", "DONE", "JOBS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.client:
        drop, done, listing = args.client
        lines = Path(listing).read_text().splitlines()
        print(client(drop, done, [(name, url) for name, url in (x.split("\t") for x in lines)]))
        return
    for _ in range(args.runs):
        print(f"floor: {run(args.files) * 1000:.3f} ms CPU per file", flush=True)


if __name__ == "__main__":
    main()
