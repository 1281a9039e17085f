"""The proxy and CA decisions as plain functions, from tables: no network, no environment."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import certifi
import pytest
import trustme
from pydantic import SecretStr
from urllib3.exceptions import MaxRetryError, ProxyError, SSLError

from tests.conftest import make_settings
from watcher.logs import REDACT
from watcher.remote.network import (
    Network,
    bypassed,
    ca_file,
    choose_proxy,
    explain,
)
from watcher.settings import load
from watcher.values import masked_proxy, proxy_secrets

P = "http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("url", "setting", "env", "expected"),
    [
        ("https://s3.aws.com/b/k", None, {}, None),
        ("https://s3.aws.com/b/k", None, {"HTTPS_PROXY": P}, P),
        ("https://s3.aws.com/b/k", None, {"https_proxy": P, "HTTPS_PROXY": "http://x:1"}, P),
        ("https://s3.aws.com/b/k", None, {"HTTPS_PROXY": "proxy.corp:3128"}, P),  # no scheme
        ("https://s3.aws.com/b/k", None, {"HTTP_PROXY": P}, None),  # the other scheme's
        ("http://127.0.0.1:9/b/k", None, {"HTTP_PROXY": P}, P),  # loopback is not special
        ("http://127.0.0.1:9/b/k", None, {"http_proxy": P, "HTTPS_PROXY": "http://x:1"}, P),
        ("https://s3.aws.com/b/k", "http://set:8080", {"HTTPS_PROXY": P}, "http://set:8080"),
        ("http://127.0.0.1:9/b/k", "http://set:8080", {}, "http://set:8080"),  # both schemes
        ("https://s3.aws.com/b/k", "http://set:8080", {"NO_PROXY": "aws.com"}, None),
        ("https://s3.aws.com/b/k", None, {"HTTPS_PROXY": P, "no_proxy": "s3.aws.com"}, None),
        ("https://s3.aws.com/b/k", None, {"HTTPS_PROXY": P, "no_proxy": "", "NO_PROXY": "*"}, None),
        ("https://s3.aws.com/b/k", None, {"HTTPS_PROXY": P, "no_proxy": "x", "NO_PROXY": "*"}, P),
    ],
)
def test_which_proxy_a_url_takes(url, setting, env, expected):
    network = Network(setting, env, certifi.where(), None)
    assert network.proxy_for_url(url) == expected
    assert network.proxy_for_url(url) == expected  # and again, from the cache


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "expected"),
    [
        ("s3.amazonaws.com", 443, "", False),
        ("s3.amazonaws.com", 443, "*", True),
        ("s3.amazonaws.com", 443, "localhost, *", True),
        ("s3.amazonaws.com", 443, "amazonaws.com", True),
        ("s3.amazonaws.com", 443, ".amazonaws.com", True),
        ("s3.amazonaws.com", 443, "*.amazonaws.com", True),
        ("amazonaws.com", 443, ".amazonaws.com", True),
        ("notamazonaws.com", 443, "amazonaws.com", False),
        ("S3.AmazonAWS.com.", 443, "amazonaws.COM", True),
        ("s3.amazonaws.com", 443, "s3.amazonaws.com:443", True),
        ("s3.amazonaws.com", 8443, "s3.amazonaws.com:443", False),
        ("10.1.2.3", 443, "10.0.0.0/8", True),
        ("11.1.2.3", 443, "10.0.0.0/8", False),
        ("10.1.2.3", 443, "10.1.2.3", True),
        ("10.1.2.3", 80, "10.1.2.3:443", False),
        ("127.0.0.1", 9000, "localhost", False),
        ("::1", 443, "::1", True),
        ("fd00::5", 443, "fd00::/8", True),
        ("fd00::5", 443, "[fd00::5]:443", True),
        ("fd00::5", 80, "[fd00::5]:443", False),
        ("api.corp", 443, " , ,api.corp ", True),
        ("api.corp", 443, "10.0.0.0/8", False),
    ],
)
def test_no_proxy_rules(host, port, no_proxy, expected):
    assert bypassed(host, port, no_proxy) is expected


def test_the_default_port_counts_for_a_no_proxy_entry_with_a_port():
    env = {"HTTPS_PROXY": P, "NO_PROXY": "api.corp:443"}
    assert choose_proxy("https", "api.corp", None, None, env) is None
    assert choose_proxy("https", "api.corp", 8443, None, env) == P


@pytest.mark.parametrize(
    ("url", "masked", "secrets"),
    [
        ("http://proxy:3128", "http://proxy:3128", []),
        ("http://user:pa%40ss@proxy:3128", "http://user:***@proxy:3128", ["pa%40ss", "pa@ss"]),
        ("http://user:pass@proxy:3128", "http://user:***@proxy:3128", ["pass"]),
        ("https://tok3n@proxy", "https://***@proxy", ["tok3n"]),
    ],
)
def test_proxy_credentials_are_masked_and_known_to_the_scrubber(url, masked, secrets):
    assert masked_proxy(url) == masked
    assert proxy_secrets(url) == secrets


def test_the_settings_mask_the_proxy_password_and_scrub_it(sandbox):
    url = "http://watcher:Secret-Pw%21@proxy.corp:3128"
    settings = make_settings(sandbox, None, proxy=url)
    assert settings.public_view()["proxy"] == "http://watcher:***@proxy.corp:3128"
    assert "Secret-Pw" not in repr(settings)
    assert {"Secret-Pw%21", "Secret-Pw!"} <= set(settings.secret_values())
    Network.from_settings(settings, {"HTTP_PROXY": "http://u:Env-Secret@p:1"})
    assert REDACT(f"failed via {url} and Env-Secret") == (
        "failed via http://watcher:***@proxy.corp:3128 and ***"
    )


def test_the_ca_file_is_certifi_alone_or_certifi_and_ca_bundle(tmp_path: Path):
    assert ca_file(None) == certifi.where()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "corp.pem"))
    joined = ca_file(tmp_path / "corp.pem")
    text = Path(joined).read_text()
    assert text.startswith(Path(certifi.where()).read_text())
    assert ca.cert_pem.bytes().decode() in text
    subjects = [c["subject"] for c in ssl.create_default_context(cafile=joined).get_ca_certs()]
    assert (
        len(subjects) == len(ssl.create_default_context(cafile=certifi.where()).get_ca_certs()) + 1
    )


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code, error.verify_message = code, message
    return error


def wrapped(inner: BaseException, proxy_stage: bool = False) -> MaxRetryError:
    """As urllib3 raises them: the cause inside SSLError (or ProxyError) inside MaxRetryError
    whose text carries the URL, query and all."""
    middle = ProxyError("Unable to connect to proxy", inner) if proxy_stage else SSLError(inner)
    return MaxRetryError(None, "/b/k?X-Amz-Signature=abc", middle)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "proxy", "expected"),
    [
        (
            wrapped(verify_error(20, "unable to get local issuer certificate")),
            None,
            "certificate verify failed for s3.corp: set ca_bundle to your proxy's CA "
            "(unable to get local issuer certificate)",
        ),
        (
            wrapped(verify_error(19, "self-signed certificate in certificate chain")),
            P,
            "certificate verify failed for s3.corp: set ca_bundle to your proxy's CA "
            "(self-signed certificate in certificate chain)",
        ),
        (
            wrapped(verify_error(10, "certificate has expired")),
            None,
            "certificate verify failed for s3.corp: certificate has expired",
        ),
        (
            wrapped(verify_error(20, "unable to get local issuer certificate"), proxy_stage=True),
            "https://proxy.corp",
            "certificate verify failed for the proxy proxy.corp:443: set ca_bundle to your "
            "proxy's CA (unable to get local issuer certificate)",
        ),
        (
            wrapped(OSError("Tunnel connection failed: 407 Proxy Authentication Required"), True),
            P,
            "cannot connect to s3.corp through the proxy proxy.corp:3128: Tunnel connection "
            "failed: 407 Proxy Authentication Required: check the user name and password in "
            "the proxy setting",
        ),
        (
            wrapped(ConnectionRefusedError(111, "Connection refused"), proxy_stage=True),
            P,
            "cannot connect to s3.corp through the proxy proxy.corp:3128: Connection refused",
        ),
        (wrapped(ConnectionRefusedError(111, "Connection refused")), None, None),
    ],
)
def test_tls_and_proxy_failures_are_explained(exc, proxy, expected):
    assert explain(exc, "s3.corp", proxy) == expected


def test_a_proxy_setting_without_a_scheme_is_http(sandbox):
    settings = make_settings(sandbox, None, proxy=SecretStr("proxy.corp:3128"))
    assert settings.proxy is not None
    assert settings.proxy.get_secret_value() == "http://proxy.corp:3128"


def test_a_world_readable_config_holding_a_proxy_password_is_warned_about(
    tmp_path, caplog, monkeypatch
):
    for name in [n for n in os.environ if n.startswith("PRODUCTIV_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "config.toml"
    config.write_text(
        'app_id = "a"\naccess_token = "t0ken"\nproxy = "http://u:Pr0xy-pass@proxy:3128"\n'
    )
    config.chmod(0o600)
    load(config)
    assert "readable by others" not in caplog.text
    config.chmod(0o644)
    load(config)
    assert "readable by others" in caplog.text and "Pr0xy-pass" not in caplog.text
