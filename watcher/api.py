"""Stage 4a, the API: an access token, and signed upload URLs for a batch of file names.

Runs on the uploader's dispatcher thread (and in `check` / `upload`); one requests Session with
urllib3's Retry on its adapters. Every failure leaves as a classified `Fault` whose reason names
the endpoint and never carries a secret, a token or a signed URL's query.
"""

from __future__ import annotations

import calendar
import email.utils
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from . import __version__
from .faults import Fault, Kind, classify_api_status, retry_after_seconds, transport_retry
from .logs import REDACT
from .network import Network, explain
from .settings import Settings

log = logging.getLogger(__name__)

DEFAULT_TOKEN_SECONDS = 300.0  # a token answer without expires_in
URL_PATH = "/services/push/v1/customer/apps/{app_id}/upload"


@dataclass(frozen=True, slots=True)
class SignedUrl:
    url: str  # exactly as received: never re-encoded, never logged whole
    expires_at: float | None  # local epoch seconds, corrected for the API's clock


def token_needs_refresh(obtained_at: float, lifetime: float, now: float) -> bool:
    """Refresh when less than min(60 s, half the lifetime) remains."""
    return now >= obtained_at + lifetime - min(60.0, lifetime / 2)


def url_problem(url: str) -> str | None:
    """Why a signed URL must not be used, or None: https only, http only to loopback."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "the signed URL is not a valid URL"
    if parts.username is not None or parts.password is not None:
        return "the signed URL carries a user name or password"
    if parts.scheme == "https" and host:
        return None
    if parts.scheme == "http" and _is_loopback(host):
        return None
    return f"the signed URL is not https (scheme {parts.scheme or 'none'}, host {host or 'none'})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_expiry(url: str) -> float | None:
    """When the signer says the URL expires (epoch seconds), from SigV2 or SigV4 parameters."""
    query = parse_qs(urlsplit(url).query)  # read-only: the URL itself is used as received
    try:
        if "Expires" in query:
            return float(query["Expires"][0])
        if "X-Amz-Date" in query and "X-Amz-Expires" in query:
            stamp = query["X-Amz-Date"][0]  # YYYYMMDDTHHMMSSZ (strptime is slow in a hot path)
            if len(stamp) != 16 or stamp[8] != "T" or stamp[15] != "Z":
                return None
            date = (int(stamp[0:4]), int(stamp[4:6]), int(stamp[6:8]))
            clock = (int(stamp[9:11]), int(stamp[11:13]), int(stamp[13:15]))
            return calendar.timegm((*date, *clock)) + float(query["X-Amz-Expires"][0])
    except (ValueError, OverflowError):
        return None
    return None


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
        assert s.client_id is not None and s.client_secret is not None  # settings guarantee it
        secret = s.client_secret.get_secret_value()
        form = {"grant_type": "client_credentials", "scope": s.scope}
        auth = None
        if s.client_auth == "basic":  # RFC 6749 2.3.1: form-encode both before base64
            auth = (quote(s.client_id, safe=""), quote(secret, safe=""))
        else:
            form |= {"client_id": s.client_id, "client_secret": secret}
        response = self._call("token", "POST", s.token_url, data=form, auth=auth)
        token, lifetime = parse_token(_json(response, "token endpoint"))
        REDACT.add([token])
        return token, lifetime

    def upload_urls(self, names: list[str], file_type: str | None) -> dict[str, SignedUrl | Fault]:
        """Signed URLs for these names (a refused URL maps to a FINAL Fault); missing names
        are simply absent. Raises Fault for the whole request."""
        s = self._settings
        url = s.api_url + URL_PATH.format(app_id=quote(s.app_id, safe=""))
        params = [("filenames", name) for name in names]
        if file_type:
            params.append(("type", file_type))
        for first_try in (True, False):
            token = self.token()
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            response = self._call("urls", "GET", url, params=params, headers=headers)
            if response.status_code != 401:
                break
            if not (first_try and self._forget_token(token)):  # one fresh token, one retry
                reason = _api_reason("signed-URL endpoint", response)
                raise Fault(Kind.SERVICE, reason, 401, where="urls")
        body = _json(response, "signed-URL endpoint")
        return parse_urls(body, names, _clock_skew(response, self._clock()))

    def _call(self, endpoint: str, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One HTTP call; raises Fault unless the answer is 2xx (or a 401 the caller handles)."""
        where = "token endpoint" if endpoint == "token" else "signed-URL endpoint"
        parts = urlsplit(url)
        proxy = self._network.proxy_for(parts.scheme, parts.hostname or "", parts.port)
        proxies = {parts.scheme: proxy} if proxy else {}
        try:
            response = self._session.request(
                method, url, timeout=self._timeout, allow_redirects=False, proxies=proxies, **kwargs
            )
        except requests.RequestException as exc:
            why = explain(exc, parts.hostname or "", proxy) or type(exc).__name__
            reason = f"cannot reach the {where}: {why}"
            raise Fault(Kind.SERVICE, reason, where=endpoint) from None
        if response.status_code == 401 and endpoint == "urls":
            return response
        kind = classify_api_status(response.status_code, endpoint)
        if kind is not None:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"), self._clock())
            reason = _api_reason(where, response)
            raise Fault(kind, reason, response.status_code, retry_after, where=endpoint)
        return response


def parse_token(body: Any) -> tuple[str, float]:
    """(access token, lifetime in seconds) from a token answer; Fault when there is none."""
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise Fault(Kind.SERVICE, "the token endpoint answered without an access_token")
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
        answer[name] = SignedUrl(value, None if expiry is None else expiry + skew)
    return answer


def _json(response: requests.Response, where: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise Fault(Kind.SERVICE, f"the {where} answered with a body that is not JSON") from None


def _api_reason(where: str, response: requests.Response) -> str:
    """`<where> answered HTTP 400 (error: message)`, using the API's own words when it has any."""
    detail = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        words = [str(body[k]) for k in ("error", "error_description", "message") if k in body]
        detail = ": ".join(words)[:200]
    if response.status_code == 401 and where == "signed-URL endpoint":
        detail = detail or "token refused even after a fresh one"
    if "invalid_client" in detail:
        detail += "; check client_id and client_secret"
    reason = f"the {where} answered HTTP {response.status_code}"
    return reason + (f" ({detail})" if detail else "")


def _clock_skew(response: requests.Response, now: float) -> float:
    """How far our clock is ahead of the API's (seconds), from its Date header; 0 without one."""
    date = response.headers.get("Date")
    if not date:
        return 0.0
    try:
        return now - email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return 0.0
