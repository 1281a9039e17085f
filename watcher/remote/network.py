"""Proxies and trusted CAs, decided once for every HTTP call: token, signed URLs and PUTs.

Both clients are told explicitly (requests with `trust_env = False`, the PUT engine by a proxy
manager per proxy), so neither reads the environment on its own and they cannot disagree. Which
proxy a URL goes through is one pure function, `choose_proxy`: the `proxy` setting, else the
environment's HTTPS_PROXY / HTTP_PROXY (lower-case first, as curl and requests read them), and
never for a host that NO_PROXY names. The trusted CAs are certifi's bundle, plus `ca_bundle` when
it is set (in addition, not instead), joined once at start into one in-memory file that both
clients read by path.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import certifi
from urllib3.exceptions import ProxyError

from ..logs import REDACT
from ..settings import ConfigError, Settings
from ..values import masked_proxy, proxy_problem, proxy_secrets, with_scheme

PROXY_VARIABLES = {"https": ("https_proxy", "HTTPS_PROXY"), "http": ("http_proxy", "HTTP_PROXY")}
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
VARIABLES = frozenset({*NO_PROXY_VARIABLES, *(n for ns in PROXY_VARIABLES.values() for n in ns)})
DEFAULT_PORTS = {"https": 443, "http": 80}
CACHE_LIMIT = 1024  # routes remembered; URLs naming endless hosts cannot grow it further
# OpenSSL's "I do not know who signed this": the case a TLS-inspecting proxy causes.
UNTRUSTED_CODES = frozenset({18, 19, 20, 21})


def choose_proxy(
    scheme: str, host: str, port: int | None, setting: str | None, env: Mapping[str, str]
) -> str | None:
    """The proxy URL for a request to scheme://host:port, or None to go direct.

    NO_PROXY (from `env`) wins, also over the `proxy` setting, as it does for curl and requests;
    then the setting; then the scheme's variable. Loopback is not special: only NO_PROXY bypasses.
    """
    no_proxy = next((env[name] for name in NO_PROXY_VARIABLES if env.get(name)), "")
    if bypassed(host, port or DEFAULT_PORTS.get(scheme), no_proxy):
        return None
    if setting:
        return setting
    for name in PROXY_VARIABLES.get(scheme, ()):
        if env.get(name):
            return with_scheme(env[name])
    return None


def bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether NO_PROXY names this host: `*`; a name and its subdomains (`corp`, `.corp` and
    `*.corp` alike); an IP or a CIDR range (IPv4 and IPv6); any of them with `:port`."""
    host = host.lower().rstrip(".")
    for entry in no_proxy.replace(" ", "").lower().split(","):
        if entry == "*":
            return True
        if entry:
            name, entry_port = _split_entry(entry)
            if (entry_port is None or entry_port == port) and _names(name, host):
                return True
    return False


def _split_entry(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port`, or a bare IPv6 address (several colons: no port)."""
    if entry.startswith("["):
        name, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    elif entry.count(":") == 1:
        name, _, port = entry.partition(":")
    else:
        name, port = entry, ""
    return name, int(port) if port.isdigit() else None


def _names(name: str, host: str) -> bool:
    name = name.removeprefix("*").lstrip(".").rstrip(".")
    try:
        network = ipaddress.ip_network(name, strict=False)
    except ValueError:
        return bool(name) and (host == name or host.endswith("." + name))
    try:
        return ipaddress.ip_address(host) in network
    except ValueError:
        return False


def explain(exc: BaseException, host: str, proxy: str | None) -> str | None:
    """One sentence for a TLS or proxy failure of a call to `host`, or None for any other error.

    Built from the causes' own words (OpenSSL's verify message, the proxy's status line), never
    from the exceptions' text, which carries the URL and its signed query."""
    chain = list(_causes(exc))
    through_proxy = proxy is not None and any(isinstance(c, ProxyError) for c in chain)
    where = f"the proxy {host_port(proxy)}" if through_proxy and proxy else host
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            untrusted = cause.verify_code in UNTRUSTED_CODES
            return certificate_reason(where, cause.verify_message or "unknown reason", untrusted)
    if through_proxy and proxy:
        detail = _detail(chain)
        if "407" in detail:
            detail += ": check the user name and password in the proxy setting"
        return f"cannot connect to {host} through the proxy {host_port(proxy)}: {detail}"
    return None


def certificate_reason(where: str, why: str, untrusted: bool) -> str:
    """The sentence for a certificate that failed verification, with OpenSSL's words: any PUT
    engine (libcurl gives the same words in its error buffer) says it alike."""
    if untrusted:
        why = f"set ca_bundle to your proxy's CA ({why})"
    return f"certificate verify failed for {where}: {why}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (urllib3's `.reason`, args, cause, context)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        cause = todo.pop(0)
        if id(cause) in seen or len(seen) > 32:
            continue
        seen.add(id(cause))
        yield cause
        inner = [getattr(cause, "reason", None), cause.__cause__, cause.__context__, *cause.args]
        todo += [c for c in inner if isinstance(c, BaseException)]


def _detail(chain: list[BaseException]) -> str:
    for cause in reversed(chain):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror  # "Connection refused"
        if type(cause) is OSError:
            return str(cause)  # http.client: "Tunnel connection failed: 407 Proxy Auth..."
    return type(chain[-1]).__name__


def host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or DEFAULT_PORTS.get(parts.scheme, 80)}"


def ca_file(ca_bundle: Path | None) -> str:
    """The path both clients verify with: certifi's bundle, or certifi's plus `ca_bundle`.

    The joined copy is an in-memory file (memfd) read through /proc/self/fd: private to the
    process, nothing to clean up, and no /tmp cleaner can delete it under a long-running daemon.
    """
    if ca_bundle is None:
        return certifi.where()
    try:
        extra = ca_bundle.read_bytes()
    except OSError as exc:
        raise ConfigError(f"invalid setting ca_bundle: {ca_bundle}: {exc.strerror}") from None
    fd = os.memfd_create("productiv-watcher-ca.pem")  # close-on-exec
    with open(fd, "wb", closefd=False) as out:
        out.write(Path(certifi.where()).read_bytes() + b"\n" + extra)
    return f"/proc/self/fd/{fd}"


class Network:
    """The proxy decision per (scheme, host, port), cached, and the CA file: one per process,
    shared by the API client and the PUT engine (thread-safe: the cache only ever gains
    entries that any thread would compute alike)."""

    def __init__(
        self, proxy: str | None, env: Mapping[str, str], ca_file: str, ca_bundle: Path | None
    ) -> None:
        self.proxy = proxy
        self.env = {k: v for k, v in env.items() if k in VARIABLES and v}
        self.ca_file = ca_file
        self.ca_bundle = ca_bundle
        self._routes: dict[tuple[str, str, int | None], str | None] = {}

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> Network:
        """Read the environment once; a proxy variable that is not a proxy URL is a ConfigError,
        and credentials in any proxy URL are registered with the log scrubber."""
        env = {k: v for k, v in (os.environ if environ is None else environ).items() if v}
        proxy = settings.proxy.get_secret_value() if settings.proxy else None
        for name in sorted(VARIABLES - set(NO_PROXY_VARIABLES)):
            if name in env:
                problem = proxy_problem(with_scheme(env[name]))
                if problem:
                    raise ConfigError(f"invalid environment variable {name}: {problem}")
                REDACT.add(proxy_secrets(with_scheme(env[name])))
        REDACT.add(proxy_secrets(proxy or ""))
        return cls(proxy, env, ca_file(settings.ca_bundle), settings.ca_bundle)

    def proxy_for(self, scheme: str, host: str, port: int | None) -> str | None:
        key = (scheme, host, port)
        try:
            return self._routes[key]
        except KeyError:
            if len(self._routes) >= CACHE_LIMIT:
                self._routes.clear()
            chosen = self._routes[key] = choose_proxy(scheme, host, port, self.proxy, self.env)
            return chosen

    def proxy_for_url(self, url: str) -> str | None:
        parts = urlsplit(url)
        return self.proxy_for(parts.scheme, parts.hostname or "", parts.port)

    def describe(self) -> dict[str, str]:
        """For the `started` line: where each proxy comes from, masked, and which CAs count."""
        view = {"ca": "certifi" + (f" + {self.ca_bundle}" if self.ca_bundle else "")}
        for scheme, names in PROXY_VARIABLES.items():
            source = next((n for n in names if n in self.env), None)
            if self.proxy:
                view[f"{scheme}_proxy"] = f"{masked_proxy(self.proxy)} (setting proxy)"
            elif source:
                url = masked_proxy(with_scheme(self.env[source]))
                view[f"{scheme}_proxy"] = f"{url} ({source})"
        no_proxy = next((self.env[n] for n in NO_PROXY_VARIABLES if n in self.env), None)
        if no_proxy:
            view["no_proxy"] = no_proxy
        return view
