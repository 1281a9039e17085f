"""Behind a corporate proxy with a private CA: a real CONNECT proxy (proxy.py), real TLS on
loopback (certificates from a test CA made by trustme), the sandbox and rclone `serve s3` both
over https. Every call, the token, the signed URLs and the PUTs, must take the same way."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import Daemon, make_settings
from tests.helpers import Folders, cli, wait_for
from tests.proxyserver import Proxy, connect_proxy
from tests.s3server import rclone_s3, s3_client
from watcher.items import Item, Snapshot, Spot
from watcher.remote.api import SignedUrl
from watcher.remote.faults import Fault
from watcher.remote.network import VARIABLES, Network
from watcher.remote.transfer import Transfer
from watcher.sandbox.productiv import Sandbox
from watcher.settings import ConfigError, load

BUCKET = "bucket"
LOGIN = "watcher:s3cret:p@ss"  # what proxy.py demands
LOGIN_IN_URL = "watcher:s3cret%3Ap%40ss"  # the same, as a URL carries it


@dataclass
class Pki:
    ca: Path  # the test CA's certificate: what ca_bundle points at
    cert: Path  # the servers' chain, for 127.0.0.1 and localhost
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(pki.ca))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(pki.cert), append=True)
    server.private_key_pem.write_to_path(str(pki.key))
    return pki


@pytest.fixture(scope="module")
def s3(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("s3")
    with rclone_s3(root, BUCKET, tls=(pki.cert, pki.key)) as endpoint:
        yield endpoint, root / BUCKET


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the proxy variables they mean, and no others."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    with connect_proxy(tmp_path / "proxy", basic_auth=LOGIN) as running:
        yield running


@pytest.fixture
def https_sandbox(tmp_path: Path, pki: Pki, s3: tuple[str, Path]) -> Iterator[Sandbox]:
    """The API over https, handing out URLs of rclone over https (SigV4, minted by boto3)."""
    client = s3_client(s3[0])

    def presign(key: str, seconds: int) -> str:
        params = {"Bucket": BUCKET, "Key": key}
        return str(client.generate_presigned_url("put_object", Params=params, ExpiresIn=seconds))

    with Sandbox(tmp_path / "store", presign=presign, tls_cert=pki.cert, tls_key=pki.key) as sb:
        yield sb


def tls_settings(sandbox: Sandbox, folders: Folders | None, **overrides: Any) -> Any:
    """The token on https://localhost, the signed URLs on https://127.0.0.1 (same server, so
    the proxy's log tells the two calls apart), the PUTs on rclone's https port."""
    port = sandbox.url.rsplit(":", 1)[1]
    return make_settings(
        sandbox, folders, token_url=f"https://localhost:{port}/oauth2/token", **overrides
    )


def drop_three(folders: Folders) -> list[str]:
    (folders.drop / "users").mkdir()
    (folders.drop / "users" / "a.csv").write_bytes(b"a" * 70_000)
    (folders.drop / "b.csv").write_bytes(b"bee")
    (folders.drop / "empty.csv").write_bytes(b"")
    return ["b.csv", "empty.csv", "users/a.csv"]


def hosts(sandbox: Sandbox, s3: tuple[str, Path]) -> tuple[str, str, str]:
    """host:port of the token endpoint, of the signed-URL endpoint and of the storage."""
    port = sandbox.url.rsplit(":", 1)[1]
    return f"localhost:{port}", f"127.0.0.1:{port}", s3[0].removeprefix("https://")


def test_every_call_goes_through_the_proxy_setting_trusting_ca_bundle(
    https_sandbox, s3, proxy, pki, folders, logs_json
):
    names = drop_three(folders)
    settings = tls_settings(
        https_sandbox, folders, proxy=proxy.url(LOGIN_IN_URL), ca_bundle=str(pki.ca)
    )
    with Daemon(settings):
        wait_for(lambda: folders.files(folders.done) == names, timeout=30, what="all in done/")
    assert (s3[1] / "log-connector-data" / "productiv-ai").exists()
    assert not list(folders.drop.rglob("*.csv"))
    token, urls, storage = hosts(https_sandbox, s3)
    seen = proxy.seen()
    assert {f"CONNECT {token}", f"CONNECT {urls}", f"CONNECT {storage}"} <= set(seen), seen
    assert all(line.startswith("CONNECT ") for line in seen), seen  # tunnels, never plain
    assert not logs_json.events("retrying"), json.dumps(logs_json.events("retrying"))
    # The login is masked where the settings are shown, and never written anywhere.
    [started] = logs_json.events("started")
    masked = f"http://watcher:***@127.0.0.1:{proxy.port}"
    assert started["settings"]["proxy"] == masked
    assert started["network"]["https_proxy"] == f"{masked} (setting proxy)"
    assert started["network"]["ca"] == f"certifi + {pki.ca}"
    assert "s3cret" not in logs_json.text


def test_the_environment_proxy_is_used_and_no_proxy_bypasses_it(
    https_sandbox, s3, proxy, pki, folders, logs_json, monkeypatch
):
    monkeypatch.setenv("https_proxy", proxy.url(LOGIN_IN_URL))  # lower case, as curl prefers
    monkeypatch.setenv("NO_PROXY", "example.org, localhost")
    names = drop_three(folders)
    with Daemon(tls_settings(https_sandbox, folders, ca_bundle=str(pki.ca))):
        wait_for(lambda: folders.files(folders.done) == names, timeout=30, what="all in done/")
    token, urls, storage = hosts(https_sandbox, s3)
    seen = proxy.seen()
    assert {f"CONNECT {urls}", f"CONNECT {storage}"} <= set(seen), seen
    assert f"CONNECT {token}" not in seen  # localhost went direct
    assert https_sandbox.count("token", 200) >= 1
    [started] = logs_json.events("started")
    assert started["network"]["https_proxy"].startswith("http://watcher:***@")
    assert started["network"]["no_proxy"] == "example.org, localhost"
    assert "s3cret" not in logs_json.text


def test_plain_http_goes_through_http_proxy_without_a_tunnel(
    sandbox, folders, logs_json, tmp_path, monkeypatch
):
    with connect_proxy(tmp_path / "plain") as plain:
        monkeypatch.setenv("HTTP_PROXY", plain.url())
        (folders.drop / "c.csv").write_bytes(b"sea")
        with Daemon(make_settings(sandbox, folders)):
            wait_for(lambda: (folders.done / "c.csv").exists(), what="c.csv in done/")
        port = sandbox.url.rsplit(":", 1)[1]
        seen = set(plain.seen())
    assert {f"POST 127.0.0.1:{port}", f"GET 127.0.0.1:{port}", f"PUT 127.0.0.1:{port}"} <= seen
    assert sandbox.stored("c.csv") == b"sea"


def test_without_ca_bundle_the_failure_names_the_host_and_what_to_set(
    https_sandbox, proxy, folders, logs_json
):
    (folders.drop / "d.csv").write_bytes(b"dee")
    settings = tls_settings(https_sandbox, folders, proxy=proxy.url(LOGIN_IN_URL))
    with Daemon(settings):
        retrying = wait_for(lambda: logs_json.events("retrying"), what="a retrying line")
    assert retrying[0]["reason"].startswith(
        "cannot reach the token endpoint: certificate verify failed for localhost: "
        "set ca_bundle to your proxy's CA"
    )
    assert (folders.drop / "d.csv").exists()
    assert "SSLError" not in logs_json.text and "s3cret" not in logs_json.text


@pytest.mark.parametrize(
    ("login", "ca", "expected"),
    [
        (LOGIN_IN_URL, False, "certificate verify failed for 127.0.0.1: set ca_bundle"),
        ("watcher:wrong", True, "407 Proxy Authentication Required: check the user name and"),
    ],
)
def test_a_put_that_cannot_pass_says_why(https_sandbox, proxy, pki, tmp_path, login, ca, expected):
    settings = tls_settings(
        https_sandbox, None, proxy=proxy.url(login), ca_bundle=str(pki.ca) if ca else None
    )
    transfer = Transfer(2.0, 1, network=Network.from_settings(settings))
    path = tmp_path / "e.csv"
    path.write_bytes(b"e")
    item = Item(Spot(path, "e.csv", "e.csv", None), Snapshot.of(os.stat(path)))
    with pytest.raises(Fault) as caught:
        transfer.put(SignedUrl(https_sandbox.signed_url(None, "e.csv"), None), item)
    assert caught.value.reason.startswith("PUT to storage failed: ")
    assert expected in caught.value.reason, caught.value.reason
    assert "X-Amz" not in caught.value.reason and "wrong" not in caught.value.reason


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PRODUCTIV_CA_BUNDLE", "/nonexistent/corp.pem", "invalid setting ca_bundle: /nonexis"),
        ("PRODUCTIV_CA_BUNDLE", "{here}", "invalid setting ca_bundle: {here} cannot be read"),
        ("PRODUCTIV_CA_BUNDLE", "{here}/not-pem.pem", "holds no PEM certificate"),
        ("PRODUCTIV_CA_BUNDLE", "{here}/der.pem", "is not PEM (DER?"),
        (
            "PRODUCTIV_PROXY",
            "socks5://u:hidden-pass@proxy:1080",
            "invalid setting proxy: proxy sch",
        ),
        ("PRODUCTIV_PROXY", "http://proxy:3128/path", "invalid setting proxy: is not a proxy"),
        ("HTTPS_PROXY", "socks5://u:hidden-pass@proxy:1080", "invalid environment variable HTTPS"),
        ("http_proxy", "http://proxy:nan", "invalid environment variable http_proxy: is not"),
    ],
)
def test_an_unusable_ca_bundle_or_proxy_is_a_config_error_naming_it(
    sandbox, tmp_path, monkeypatch, variable, value, message
):
    (tmp_path / "not-pem.pem").write_text("hello\n")
    (tmp_path / "der.pem").write_bytes(b"\x30\x82\x01\xff" + bytes(range(256)))
    for name, setting in sandbox.env().items():
        monkeypatch.setenv(name, setting)
    monkeypatch.setenv(variable, value.format(here=tmp_path))
    with pytest.raises(ConfigError) as caught:
        Network.from_settings(load())
    assert message.format(here=tmp_path) in str(caught.value)
    assert "hidden-pass" not in str(caught.value)


def test_check_exits_78_on_an_unusable_proxy_variable(sandbox, folders):
    """The same ConfigError ends the commands with EX_CONFIG, so systemd does not loop."""
    env = {**sandbox.env(), "PRODUCTIV_DROP_DIR": str(folders.drop), "HTTPS_PROXY": "ftp://p"}
    result = cli("check", env=env)
    assert result.returncode == 78, result.stderr
    assert "invalid environment variable HTTPS_PROXY: proxy scheme ftp" in result.stderr
    assert "Traceback" not in result.stderr
