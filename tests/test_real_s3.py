"""The PUT against an S3 server nobody here wrote: rclone `serve s3` checks SigV4 presigned URLs
for real (signature, expiry, Content-Length). boto3 mints the URLs the sandbox hands out."""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_settings
from tests.helpers import Folders, wait_for
from tests.s3server import rclone_s3, s3_client
from watcher.sandbox.productiv import Sandbox

BUCKET = "bucket"


@pytest.fixture
def rclone(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with rclone_s3(tmp_path / "s3", BUCKET) as endpoint:
        yield endpoint, tmp_path / "s3" / BUCKET


def presigner(endpoint: str) -> Callable[[str, int], str]:
    client = s3_client(endpoint)

    def presign(key: str, seconds: int) -> str:
        return str(
            client.generate_presigned_url(
                "put_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=seconds
            )
        )

    return presign


@pytest.fixture
def s3_sandbox(tmp_path: Path, rclone: tuple[str, Path]) -> Iterator[tuple[Sandbox, Path]]:
    endpoint, bucket = rclone
    with Sandbox(tmp_path / "store", presign=presigner(endpoint)) as sandbox:
        yield sandbox, bucket


def stored(bucket: Path, sandbox: Sandbox, name: str, file_type: str | None = None) -> bytes:
    return (
        bucket
        / "log-connector-data"
        / "productiv-ai"
        / sandbox.app_id
        / (file_type or "default")
        / name
    ).read_bytes()


def test_uploads_land_byte_identical_in_a_real_s3_server(s3_sandbox, folders: Folders, logs_json):
    sandbox, bucket = s3_sandbox
    big = folders.drop / "users" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    (folders.drop / "empty.csv").write_bytes(b"")
    with Daemon(make_settings(sandbox, folders)):
        wait_for(
            lambda: (
                (folders.done / "users" / "big.bin").exists()
                and (folders.done / "empty.csv").exists()
            )
        )
    assert stored(bucket, sandbox, "big.bin", "users") == bytes(range(256)) * 8192
    assert stored(bucket, sandbox, "empty.csv") == b""
    assert "X-Amz-Signature" not in logs_json.text


def test_an_awkward_name_keeps_exactly_its_name(s3_sandbox, folders: Folders, logs_json):
    sandbox, bucket = s3_sandbox
    names = ["a b+c%20d#e?f&g=h;'ü.csv", unicodedata.normalize("NFD", "résumé.csv"), "-leading.csv"]
    for name in names:
        (folders.drop / name).write_bytes(name.encode())
    with Daemon(make_settings(sandbox, folders)):
        wait_for(lambda: all((folders.done / n).exists() for n in names))
    for name in names:
        assert stored(bucket, sandbox, name) == name.encode()


def test_an_expired_url_is_answered_by_a_fresh_one(tmp_path, rclone, folders: Folders, logs_json):
    endpoint, bucket = rclone
    real = presigner(endpoint)
    minted: list[str] = []

    def presign_first_one_stale(key: str, seconds: int) -> str:
        if minted:
            url = real(key, seconds)
        else:
            url = real(key, 1)
            time.sleep(2.1)  # by the time the daemon uses it, S3 finds it expired
        minted.append(url)
        return url

    with Sandbox(tmp_path / "store", presign=presign_first_one_stale) as sandbox:
        (folders.drop / "late.csv").write_bytes(b"late")
        with Daemon(make_settings(sandbox, folders, max_attempts=1)):
            wait_for(lambda: (folders.done / "late.csv").exists(), timeout=20)
    assert len(minted) == 2
    assert stored(bucket, sandbox, "late.csv") == b"late"
    assert folders.files(folders.failed) == []
    assert not logs_json.events("failed")


def test_a_real_s3_servers_etag_is_checked_and_verified(s3_sandbox, folders: Folders, logs_json):
    """rclone's ETag for a single PUT is the body's MD5, as S3's is: the receipts say verified."""
    sandbox, _ = s3_sandbox
    (folders.drop / "some.bin").write_bytes(bytes(range(256)) * 4096)
    (folders.drop / "empty.csv").write_bytes(b"")
    with Daemon(make_settings(sandbox, folders)):
        wait_for(lambda: all((folders.done / n).exists() for n in ("some.bin", "empty.csv")))
    journal = (folders.root / "state" / "receipts.jsonl").read_text().splitlines()
    assert [json.loads(line)["etag_verified"] for line in journal] == [True, True]
