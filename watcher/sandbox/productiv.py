"""A local stand-in for Productiv's push API and its S3 storage, for the demo and the tests.

It behaves as Productiv's push API does (docs/design.md, The sandbox): OAuth client credentials
(body or Basic), signed URLs for repeated `filenames`, and PUTs to SigV2-signed URLs checked by
S3's rules (signature over method, Content-MD5, Content-Type, Expires and path; expiry;
Content-Length required; chunked refused; S3-style XML errors; ETag = MD5 unless injected). Or,
given `presign`, it hands out URLs of a real S3 server (rclone `serve s3`) signed by boto3.
Faults are injected per endpoint, in process (`Sandbox.inject`) or over HTTP
(`POST /_sandbox/faults`), and every request is recorded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from .server import BUCKET, Recorded, SandboxHandler, SandboxServer

APP_ID = "sandbox-app"
CLIENT_ID = "sandbox-client"
CLIENT_SECRET = "sandbox-secret-0000"  # a sandbox credential, printed on purpose
ACCESS_KEY = "SANDBOXACCESSKEY"

Presign = Callable[[str, int], str]  # (object key, lifetime seconds) -> URL
ISSUED: set[str] = set()  # every token any sandbox issued in this process (tests grep for them)


@dataclass
class Injected:
    """One scripted misbehaviour: for the next `count` requests to `endpoint`."""

    endpoint: str  # "token", "urls" or "put"
    count: int = 1
    status: int | None = None  # answer this status (with a body fitting the endpoint)
    drop: bool = False  # close the connection without an answer
    delay: float = 0.0  # wait this long first (longer than the client's timeout = a hang)
    retry_after: str | None = None
    body: str | None = None  # raw body to answer with (e.g. truncated JSON)
    partial: bool = False  # signed URLs: answer for every other name only, plus an unasked one
    echo_auth: bool = False  # the error message repeats the request's Authorization header
    headers: dict[str, str] | None = None  # extra answer headers (an odd Date replaces ours)
    etag: str | None = None  # PUT: store the body, answer this ETag ("": none); a corrupting proxy


def object_key(app_id: str, file_type: str | None, name: str) -> str:
    return f"log-connector-data/productiv-ai/{app_id}/{file_type or 'default'}/{name}"


def sign_v2(secret: str, method: str, md5: str, ctype: str, expires: str, resource: str) -> str:
    to_sign = f"{method}\n{md5}\n{ctype}\n{expires}\n{resource}"
    digest = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class Sandbox:
    """The sandbox server; `with Sandbox(store) as sb:` runs it on a free loopback port."""

    def __init__(
        self,
        store: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        presign: Presign | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        """`tls_cert` (with `tls_key`, unless the key is in the same PEM) serves https."""
        self.store = Path(store)
        self.app_id = APP_ID
        self.client_id = CLIENT_ID
        self.client_secret = CLIENT_SECRET
        self.token_seconds: float | None = 3600.0  # None: answer without expires_in
        self.url_seconds = 900
        self.clock_offset = 0.0  # seconds the sandbox's clock is ahead of the host's
        self.refuse_names: set[str] = set()  # 400 for a request naming any of these
        self.omit_names: set[str] = set()  # left out of the URL answer
        self.extra_names: set[str] = set()  # added to the URL answer, unasked
        self.url_base: str | None = None  # hand out URLs on another base, e.g. "ftp://x"
        self.expire_next = 0  # this many next URLs are minted already expired
        self.expired_message = "Request has expired"  # S3's words; Ceph RGW says nothing ("")
        self.max_request_line: int | None = None  # 431 for a longer signed-URL request line
        self.presign = presign
        self.requests: list[Recorded] = []
        self.arrived: dict[str, int] = {"token": 0, "urls": 0, "put": 0}  # before any fault
        self._faults: list[Injected] = []
        self._tokens: dict[str, float] = {}
        self._signing_secret = secrets.token_urlsafe(24)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        tls = None
        if tls_cert is not None:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(tls_cert, tls_key)
        self._server = SandboxServer((host, port), SandboxHandler, tls)
        self._server.sandbox = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        scheme = "http" if self._server.tls is None else "https"
        return f"{scheme}://{host!s}:{port}"

    def start(self) -> Sandbox:
        self.store.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="sandbox"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The PRODUCTIV_* settings that point the daemon at this sandbox."""
        return {
            "PRODUCTIV_API_URL": self.url,
            "PRODUCTIV_TOKEN_URL": f"{self.url}/oauth2/token",
            "PRODUCTIV_APP_ID": self.app_id,
            "PRODUCTIV_CLIENT_ID": self.client_id,
            "PRODUCTIV_CLIENT_SECRET": self.client_secret,
        }

    # -- scripting and inspection --------------------------------------------------------------

    def inject(self, endpoint: str, count: int = 1, **how: Any) -> None:
        with self._lock:
            self._faults.append(Injected(endpoint, count, **how))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def now(self) -> float:
        return time.time() + self.clock_offset

    def count(self, endpoint: str, status: int | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.endpoint == endpoint and (status is None or r.status == status)
            )

    def object_path(self, name: str, file_type: str | None = None) -> Path:
        return self.store / object_key(self.app_id, file_type, name)

    def stored(self, name: str, file_type: str | None = None) -> bytes:
        return self.object_path(name, file_type).read_bytes()

    def arrive(self, endpoint: str) -> Injected | None:
        """Count a request at `endpoint`; the fault injected for it, if one is due."""
        with self._lock:
            self.arrived[endpoint] += 1
            for fault in self._faults:
                if fault.endpoint == endpoint and fault.count > 0:
                    fault.count -= 1
                    return fault
        return None

    def pause(self, seconds: float) -> None:
        """Hold an answer back, but not past the sandbox's stop."""
        self._closing.wait(seconds)

    def record(self, entry: Recorded) -> None:
        with self._lock:
            if len(self.requests) < 200_000:
                self.requests.append(entry)

    # -- the API -------------------------------------------------------------------------------

    def issue_token(self) -> dict[str, Any]:
        token = secrets.token_urlsafe(24)
        lifetime = self.token_seconds
        with self._lock:
            self._tokens[token] = self.now() + (lifetime or 300.0)
            ISSUED.add(token)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if lifetime is not None:
            answer["expires_in"] = int(lifetime) if float(lifetime).is_integer() else lifetime
        return answer

    def forget_tokens(self) -> None:
        """Every token issued so far is refused from now on (as after a revocation)."""
        with self._lock:
            self._tokens.clear()

    def token_valid(self, token: str) -> bool:
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and self.now() < expiry

    def signed_url(self, file_type: str | None, name: str) -> str:
        key = object_key(self.app_id, file_type, name)
        if self.presign is not None:
            return self.presign(key, self.url_seconds)
        path = f"/{BUCKET}/{quote(key, safe='/')}"
        lifetime = self.url_seconds
        with self._lock:
            if self.expire_next > 0:
                self.expire_next -= 1
                lifetime = -60
        expires = str(int(self.now() + lifetime))
        signature = sign_v2(self._signing_secret, "PUT", "", "", expires, path)
        query = (
            f"AWSAccessKeyId={ACCESS_KEY}&Expires={expires}&Signature={quote(signature, safe='')}"
        )
        return f"{self.url_base or self.url}{path}?{query}"

    def check_put(self, raw_path: str, query: str, headers: Any) -> tuple[int, str, str] | None:
        """S3's checks of a presigned PUT: None when it may proceed, else (status, code, msg)."""
        params = dict(parse_qsl(query, keep_blank_values=True))  # '+' decodes to ' ', as S3 does
        if "Signature" not in params or "Expires" not in params:
            return 403, "AccessDenied", "Query-string authentication requires parameters"
        expected = sign_v2(
            self._signing_secret,
            "PUT",
            headers.get("Content-MD5", ""),
            headers.get("Content-Type", ""),
            params["Expires"],
            raw_path,
        )
        if not hmac.compare_digest(expected, params["Signature"]):
            return (
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match",
            )
        if self.now() > float(params["Expires"]):
            return 403, "AccessDenied", self.expired_message
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            return (
                501,
                "NotImplemented",
                "A header you provided implies functionality that is not implemented",
            )
        if headers.get("Content-Length") is None:
            return 411, "MissingContentLength", "You must provide the Content-Length HTTP header."
        if int(headers["Content-Length"]) > 5 * 1024**3:
            return 400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size"
        return None


def serve(host: str, port: int, store: Path) -> None:
    """`productiv-watcher sandbox`: run until SIGINT/SIGTERM, after printing the settings.

    The signals are blocked (in the server's threads too, which inherit the mask) and taken
    with sigwait: an Event set from a handler could deadlock on the lock its own wait() held
    when the signal came (it did, once in a few hundred runs of the test)."""
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    with Sandbox(store, host, port) as sandbox:
        for name, value in sandbox.env().items():
            print(f"{name}={value}")  # noqa: T201 - this is the command's output
        print(f"# objects are stored in {sandbox.store}", flush=True)  # noqa: T201
        signal.sigwait(stops)
