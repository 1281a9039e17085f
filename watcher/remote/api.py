"""Stage 4a, the API: an access token, and signed upload URLs for a batch of file names.

Runs on the uploader's dispatcher thread (and in `check` / `upload`); one requests Session with
urllib3's Retry on its adapters. Every failure leaves as a classified `Fault` whose reason names
the endpoint and never carries a secret, a token or a signed URL's query.
"""

from __future__ import annotations

import calendar
import email.utils
import functools
import ipaddress
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import SplitResult, quote, quote_plus, unquote_plus, urlsplit

import requests
from requests.adapters import HTTPAdapter

from .. import __version__
from ..logs import REDACT
from ..settings import ConfigError, Settings
from .answers import bounded
from .faults import Fault, Kind, classify_api_status, retry_after_seconds, tidy, transport_retry
from .network import Network, explain

log = logging.getLogger(__name__)

DEFAULT_TOKEN_SECONDS = 300.0  # a token answer without expires_in
URL_PATH = "/services/push/v1/customer/apps/{app_id}/upload"
# `GET <path>?<query> HTTP/1.1` stays within this: common front ends (nginx's 8k header
# buffers, many load balancers) answer 414 or 431 beyond it, whatever batch_size says.
MAX_REQUEST_LINE_BYTES = 8 * 1024
ANSWER_BYTES = 4 * 1024 * 1024  # a URL map for 8 KiB of names is some hundred KiB at most
_SENDABLE = re.compile(r"[\x21-\x7e]+")  # what may go in a request line or a header value
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SignedUrl:
    url: str  # exactly as received: never re-encoded, never logged whole
    expires_at: float | None  # local epoch seconds, corrected for the API's clock
    parts: SplitResult | None = None  # urlsplit(url), kept by the check it passed

    def split(self) -> SplitResult:
        """The URL's parts, read-only: split once on the dispatcher's thread when the API client
        made this, rather than again on the transfer thread (urlsplit's cache is too small for
        a ready queue of URLs)."""
        return urlsplit(self.url) if self.parts is None else self.parts


@dataclass(frozen=True, slots=True)
class Answer:
    """An API answer, its body read bounded (answers.py): never more than ANSWER_BYTES, nor
    longer than the request timeout, whatever the server sends."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    cut: bool = False  # the body was longer or slower than that


def token_needs_refresh(obtained_at: float, lifetime: float, now: float) -> bool:
    """Refresh when less than min(60 s, half the lifetime) remains."""
    return now >= obtained_at + lifetime - min(60.0, lifetime / 2)


def url_problem(url: str) -> str | None:
    """Why a signed URL must not be used, or None: https only, http only to loopback, and
    only what can be sent at all (printable ASCII, a port from 1 to 65535)."""
    if not _SENDABLE.fullmatch(url):
        return "the signed URL has spaces, control or non-ASCII characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port == 0:  # out of 0-65535 or not a number: .port raises ValueError
            raise ValueError("port 0")
    except ValueError:
        return "the signed URL is not a valid URL (its host or port)"
    if parts.username is not None or parts.password is not None:
        return "the signed URL carries a user name or password"
    if parts.scheme == "https" and host:
        return None
    if parts.scheme == "http" and _is_loopback(host):
        return None
    return f"the signed URL is not https (scheme {parts.scheme or 'none'}, host {host or 'none'})"


@functools.lru_cache(maxsize=64)  # a batch's URLs share their host: parsed once, not per URL
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_EXPIRY_PARAMS = frozenset({"Expires", "X-Amz-Date", "X-Amz-Expires"})


def query_values(query: str, wanted: frozenset[str]) -> dict[str, str]:
    """The first non-blank value of each wanted parameter, decoded as `parse_qs` decodes it,
    without decoding the others (a signed URL's credential and signature: 15 us per URL)."""
    found: dict[str, str] = {}
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        if not equals or not value:
            continue  # as parse_qs: no '=' or a blank value is no value
        key = unquote_plus(key)
        if key in wanted and key not in found:
            found[key] = unquote_plus(value)
    return found


def url_expiry(url: str) -> float | None:
    """When the signer says the URL expires (epoch seconds), from SigV2 or SigV4 parameters."""
    query = query_values(urlsplit(url).query, _EXPIRY_PARAMS)  # the URL itself is used as is
    expiry = None
    try:
        if "Expires" in query:
            expiry = float(query["Expires"])
        elif "X-Amz-Date" in query and "X-Amz-Expires" in query:
            stamp = query["X-Amz-Date"]  # YYYYMMDDTHHMMSSZ (strptime is slow in a hot path)
            if len(stamp) != 16 or stamp[8] != "T" or stamp[15] != "Z":
                return None
            date = (int(stamp[0:4]), int(stamp[4:6]), int(stamp[6:8]))
            clock = (int(stamp[9:11]), int(stamp[11:13]), int(stamp[13:15]))
            expiry = calendar.timegm((*date, *clock)) + float(query["X-Amz-Expires"])
    except (ValueError, OverflowError):
        return None
    return expiry if expiry is not None and math.isfinite(expiry) else None


def name_cost(name: str) -> int:
    """Bytes one name adds to the signed-URL request line: `?filenames=<name>` or `&...`,
    encoded as requests encodes it (UTF-8, then quote_plus)."""
    return len("&filenames=") + len(quote_plus(name.encode("utf-8", "surrogateescape")))


def packed(items: Sequence[T], cost: Callable[[T], int], budget: int) -> list[list[T]]:
    """Consecutive groups, in order, each costing at most `budget`; an item over the budget on
    its own is a group of one (the API client refuses it with a reason)."""
    groups: list[list[T]] = []
    used = budget + 1  # start a new group at the first item
    for item in items:
        price = cost(item)
        if used + price > budget:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += price
    return groups


class ApiClient:
    """Token cache plus the signed-URL call. Thread-safe token refresh; one caller at a time."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        network: Network | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._timeout = (settings.request_timeout_seconds, settings.request_timeout_seconds)
        self._network = network or Network.from_settings(settings)
        self._session = requests.Session()
        # Proxies and CAs as `Network` decides for every client, never requests' own reading
        # of the environment (nor .netrc, REQUESTS_CA_BUNDLE).
        self._session.trust_env = False
        self._session.verify = self._network.ca_file
        self._session.headers["User-Agent"] = f"productiv-watcher/{__version__}"
        adapter = HTTPAdapter(max_retries=transport_retry(), pool_maxsize=2)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_expiry = (0.0, 0.0)  # (obtained_at, lifetime)
        fixed = settings.access_token
        if fixed is not None:
            self._token = fixed.get_secret_value()
            self._token_expiry = (0.0, float("inf"))

    def close(self) -> None:
        self._session.close()

    def token(self) -> str:
        """A valid access token, fetched on first need and shortly before it runs out."""
        with self._lock:
            if self._token is None or token_needs_refresh(*self._token_expiry, self._clock()):
                self._token, lifetime = self._fetch_token()
                self._token_expiry = (self._clock(), lifetime)
            return self._token

    def _forget_token(self, token: str) -> bool:
        """After a 401: drop the token so the next call fetches one; False for a fixed token."""
        with self._lock:
            if self._settings.access_token is not None:
                return False
            if self._token == token:
                self._token = None
            return True

    def _fetch_token(self) -> tuple[str, float]:
        s = self._settings
        if s.client_id is None or s.client_secret is None:  # Settings refuses this: never here
            raise ConfigError("client_id and client_secret are required unless access_token is set")
        secret = s.client_secret.get_secret_value()
        form = {"grant_type": "client_credentials", "scope": s.scope}
        auth = None
        if s.client_auth == "basic":  # RFC 6749 2.3.1: form-encode both before base64
            auth = (quote(s.client_id, safe=""), quote(secret, safe=""))
        else:
            form |= {"client_id": s.client_id, "client_secret": secret}
        response = self._call("token", "POST", s.token_url, data=form, auth=auth)
        token, lifetime = parse_token(_json(response, "token endpoint"))
        REDACT.add_token(token)
        return token, lifetime

    def names_budget(self, file_type: str | None) -> int:
        """Bytes of the request line left for the names (each costs `name_cost`)."""
        path = urlsplit(self._urls_url()).path
        kind = f"&type={file_type}" if file_type else ""
        return MAX_REQUEST_LINE_BYTES - len(f"GET {path}{kind} HTTP/1.1")

    def _urls_url(self) -> str:
        s = self._settings
        return s.api_url + URL_PATH.format(app_id=quote(s.app_id, safe=""))

    def upload_urls(self, names: list[str], file_type: str | None) -> dict[str, SignedUrl | Fault]:
        """Signed URLs for these names (a refused URL maps to a FINAL Fault); missing names
        are simply absent. Raises Fault for the whole request, and before sending it when it
        would be longer than MAX_REQUEST_LINE_BYTES (REFUSED: split; FINAL for one name)."""
        over = sum(map(name_cost, names)) - self.names_budget(file_type)
        if over > 0 and len(names) == 1:
            reason = (
                f"the file name is too long to ask for its signed URL (the request would be"
                f" {over} bytes over the {MAX_REQUEST_LINE_BYTES} that servers accept)"
            )
            raise Fault(Kind.FINAL, reason, where="urls")
        if over > 0:
            reason = f"the signed-URL request would be over {MAX_REQUEST_LINE_BYTES} bytes"
            raise Fault(Kind.REFUSED, reason, where="urls")
        url = self._urls_url()
        params = [("filenames", name) for name in names]
        if file_type:
            params.append(("type", file_type))
        for first_try in (True, False):
            token = self.token()
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            response = self._call("urls", "GET", url, params=params, headers=headers)
            if response.status != 401:
                break
            if not (first_try and self._forget_token(token)):  # one fresh token, one retry
                reason = _api_reason("signed-URL endpoint", response)
                raise Fault(Kind.SERVICE, reason, 401, where="urls")
        body = _json(response, "signed-URL endpoint")
        return parse_urls(body, names, _clock_skew(response, self._clock()))

    def _call(self, endpoint: str, method: str, url: str, **kwargs: Any) -> Answer:
        """One HTTP call; raises Fault unless the answer is 2xx (or a 401 the caller handles)."""
        where = "token endpoint" if endpoint == "token" else "signed-URL endpoint"
        parts = urlsplit(url)
        proxy = self._network.proxy_for(parts.scheme, parts.hostname or "", parts.port)
        proxies = {parts.scheme: proxy} if proxy else {}
        try:
            raw = self._session.request(
                method,
                url,
                timeout=self._timeout,
                allow_redirects=False,
                proxies=proxies,
                stream=True,  # the body is read bounded, below
                **kwargs,
            )
        except requests.RequestException as exc:
            why = explain(exc, parts.hostname or "", proxy) or type(exc).__name__
            reason = f"cannot reach the {where}: {why}"
            raise Fault(Kind.SERVICE, reason, where=endpoint) from None
        body = bounded(raw.raw, ANSWER_BYTES, self._settings.request_timeout_seconds)
        response = Answer(raw.status_code, raw.headers, body.data, cut=not body.whole)
        if response.status == 401 and endpoint == "urls":
            return response
        kind = classify_api_status(response.status, endpoint)
        if kind is not None:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"), self._clock())
            reason = _api_reason(where, response)
            raise Fault(kind, reason, response.status, retry_after, where=endpoint)
        return response


def parse_token(body: Any) -> tuple[str, float]:
    """(access token, lifetime in seconds) from a token answer; Fault when there is none."""
    token = body.get("access_token") if isinstance(body, dict) else None
    token = token.strip() if isinstance(token, str) else None  # a trailing newline is common
    if not token:
        raise Fault(Kind.SERVICE, "the token endpoint answered without an access_token")
    if not _SENDABLE.fullmatch(token):
        reason = (
            "the token endpoint answered with an access_token that cannot be sent in a header"
            " (it has spaces, control or non-ASCII characters)"
        )
        raise Fault(Kind.SERVICE, reason)
    lifetime = body.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)):
        return token, DEFAULT_TOKEN_SECONDS
    if not 0 < lifetime < 10**9:  # nonsense (negative, NaN, infinite): assume the default
        return token, DEFAULT_TOKEN_SECONDS
    return token, float(lifetime)


def parse_urls(body: Any, names: list[str], skew: float) -> dict[str, SignedUrl | Fault]:
    """The usable URL (or the reason it is refused) per requested name; others are ignored.

    `skew` is how far our clock is ahead of the API's, added to each URL's expiry.
    """
    if not isinstance(body, dict):
        raise Fault(Kind.SERVICE, "the signed-URL endpoint answered something other than a map")
    answer: dict[str, SignedUrl | Fault] = {}
    for name in names:
        value = body.get(name)
        if not isinstance(value, str):
            continue
        problem = url_problem(value)
        if problem is not None:
            answer[name] = Fault(Kind.FINAL, problem)
            continue
        expiry = url_expiry(value)
        answer[name] = SignedUrl(value, None if expiry is None else expiry + skew, urlsplit(value))
    return answer


_NOT_JSON = object()


def _parsed(response: Answer) -> Any:
    """The body as JSON, or _NOT_JSON: a body nested too deep for the parser (200,000 '[')
    raises RecursionError, which is no more the caller's problem than a syntax error."""
    try:
        return json.loads(response.body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _json(response: Answer, where: str) -> Any:
    if response.cut:
        reason = (
            f"the {where} answered with a body that did not end within {ANSWER_BYTES} bytes"
            " and the request timeout"
        )
        raise Fault(Kind.SERVICE, reason)
    body = _parsed(response)
    if body is _NOT_JSON:
        raise Fault(Kind.SERVICE, f"the {where} answered with a body that is not JSON")
    return body


def _api_reason(where: str, response: Answer) -> str:
    """`<where> answered HTTP 400 (error: message)`, using the API's own words when it has any."""
    detail = ""
    body = _parsed(response)
    if isinstance(body, dict):
        keys = ("error", "error_description", "message")
        words = [str(body[k]) for k in keys if isinstance(body.get(k), (str, int, float))]
        detail = tidy(": ".join(words))
    if response.status == 401 and where == "signed-URL endpoint":
        detail = detail or "token refused even after a fresh one"
    if "invalid_client" in detail:
        detail += "; check client_id and client_secret"
    reason = f"the {where} answered HTTP {response.status}"
    return reason + (f" ({detail})" if detail else "")


def _clock_skew(response: Answer, now: float) -> float:
    """How far our clock is ahead of the API's (seconds), from its Date header; 0 without one."""
    date = response.headers.get("Date")
    if not date:
        return 0.0
    try:
        return now - email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, OverflowError):
        return 0.0
