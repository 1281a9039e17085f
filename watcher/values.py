"""Checks of setting values that pydantic cannot make alone: a proxy URL, a PEM bundle.

Pure, and below both settings.py (which refuses a bad value at start) and remote/network.py
(which uses the proxy), so that neither has to import the other.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import unquote, urlsplit


def with_scheme(url: str) -> str:
    """`proxy.corp:3128` means `http://proxy.corp:3128`, as it does for curl and requests."""
    url = url.strip()
    return url if "://" in url else f"http://{url}"


def proxy_problem(url: str) -> str | None:
    """Why `url` cannot be a proxy, or None. http:// and https:// proxies only: SOCKS would need
    PySocks for requests and is refused by urllib3."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return "is not a proxy URL (http://[user:password@]host:port)"
    if parts.scheme not in ("http", "https"):
        return f"proxy scheme {parts.scheme} is not supported: use an http:// or https:// proxy"
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        return "is not a proxy URL (http://[user:password@]host:port, nothing after the port)"
    return None


def masked_proxy(url: str) -> str:
    """The proxy URL with its password (or a lone user name, often a token) shown as ***."""
    parts = urlsplit(url)
    if parts.username is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = "***" if parts.password is None else f"{parts.username}:***"
    return parts._replace(netloc=f"{user}@{host}").geturl()


def proxy_secrets(url: str) -> list[str]:
    """What `masked_proxy` hides, as written and percent-decoded: for the log scrubber."""
    parts = urlsplit(url)
    secret = parts.password if parts.password is not None else parts.username
    return sorted({secret, unquote(secret)}) if secret else []


def pem_problem(path: Path) -> str | None:
    """Why `path` cannot be the `ca_bundle` (missing, unreadable, no PEM certificate), or None."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    except UnicodeDecodeError:
        return f"{path} is not PEM (DER? convert it: openssl x509 -inform der -in {path.name})"
    if "-----BEGIN CERTIFICATE-----" not in text:
        return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        ssl.create_default_context(cadata=text)
    except ssl.SSLError as exc:
        return f"{path} holds a certificate that cannot be loaded ({exc.reason or exc})"
    return None
