"""A local stand-in for Productiv's push API and its S3 storage, for the demo and the tests.

It behaves as `productiv-api.md` describes: OAuth client credentials (body or Basic), signed
URLs for repeated `filenames`, and PUTs to SigV2-signed URLs checked by S3's rules (signature
over method, Content-MD5, Content-Type, Expires and path; expiry; Content-Length required;
chunked refused; S3-style XML errors; ETag = MD5). Or, given `presign`, it hands out URLs of a
real S3 server (rclone `serve s3`) signed by boto3. Faults are injected per endpoint, in
process (`Sandbox.inject`) or over HTTP (`POST /_sandbox/faults`), and every request is recorded.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, unquote, unquote_plus, urlsplit

APP_ID = "sandbox-app"
CLIENT_ID = "sandbox-client"
CLIENT_SECRET = "sandbox-secret-0000"  # a sandbox credential, printed on purpose
SCOPE = "https://api.productiv.com/connector.write"
BUCKET = "productiv-data"
ACCESS_KEY = "SANDBOXACCESSKEY"
URL_PREFIX = "/services/push/v1/customer/apps/"
TYPES = ("users", "contracts", "other")
CHUNK = 1024 * 1024
DRAIN_LIMIT = 8 * CHUNK  # a refused PUT's body is read up to this size, then the line is cut

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


@dataclass
class Recorded:
    method: str
    endpoint: str
    path: str  # never the query
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)


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
    ) -> None:
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
        self.presign = presign
        self.requests: list[Recorded] = []
        self.arrived: dict[str, int] = {"token": 0, "urls": 0, "put": 0}  # before any fault
        self._faults: list[Injected] = []
        self._tokens: dict[str, float] = {}
        self._signing_secret = secrets.token_urlsafe(24)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.sandbox = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

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

    def _next_fault(self, endpoint: str) -> Injected | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint == endpoint and fault.count > 0:
                    fault.count -= 1
                    return fault
        return None

    def _record(self, entry: Recorded) -> None:
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
            return 403, "AccessDenied", "Request has expired"
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


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that `stop` can end their keep-alive threads at once."""

    daemon_threads = True
    request_queue_size = 128
    sandbox: Sandbox

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.open_sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._sockets_lock:
            for sock in self.open_sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away is part of the game here


def _xml_error(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{secrets.token_hex(8)}</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection is closed after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the sandbox is quiet; the daemon's own logs tell the story

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(
            self.server.sandbox.now() if timestamp is None else timestamp, usegmt=True
        )

    # -- plumbing ------------------------------------------------------------------------------

    def _answer(
        self,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any, extra: dict[str, str] | None = None) -> None:
        self._answer(status, json.dumps(doc).encode(), extra=extra)

    def _drain(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _misbehave(self, endpoint: str) -> bool:
        """Apply an injected fault; True when it produced the answer (or none at all)."""
        sandbox = self.server.sandbox
        with sandbox._lock:
            sandbox.arrived[endpoint] += 1
        fault = sandbox._next_fault(endpoint)
        if fault is None:
            return False
        if fault.delay:
            sandbox._closing.wait(fault.delay)
        if fault.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            sandbox._record(Recorded(self.command, endpoint, self._path(), 0))
            return True
        if fault.partial and endpoint == "urls":
            self._urls(self._path(), partial=True)
            return True
        if fault.status is None and fault.body is None:
            return False  # only a delay
        status = fault.status or 200
        extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        if 300 <= status < 400:
            extra["Location"] = f"{sandbox.url}/elsewhere"
        if endpoint != "put" or self.headers.get("Content-Length"):
            self._drain()
        if fault.body is not None:
            body = fault.body.encode()
        elif endpoint == "put":
            body = _xml_error("InternalError" if status >= 500 else "AccessDenied", "injected")
        else:
            body = json.dumps({"message": f"injected {status}"}).encode()
        self._answer(
            status, body, "application/xml" if endpoint == "put" else "application/json", extra
        )
        sandbox._record(Recorded(self.command, endpoint, self._path(), status))
        return True

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    # -- routes --------------------------------------------------------------------------------

    def do_POST(self) -> None:
        if self._path() == "/oauth2/token":
            if not self._misbehave("token"):
                self._token()
        elif self._path() == "/_sandbox/faults":
            doc = json.loads(self._drain() or b"{}")
            self.server.sandbox.inject(**doc)
            self._json(200, {"ok": True})
        else:
            self._drain()
            self._json(404, {"message": "not found"})

    def do_GET(self) -> None:
        path = self._path()
        if path.startswith(URL_PREFIX) and path.endswith("/upload"):
            if not self._misbehave("urls"):
                self._urls(path)
        elif path == "/_sandbox/requests":
            self._json(200, [asdict(r) for r in self.server.sandbox.requests])
        else:
            self._json(404, {"message": "not found"})

    def do_PUT(self) -> None:
        if self._path().startswith(f"/{BUCKET}/"):
            if not self._misbehave("put"):
                self._put()
        else:
            self.close_connection = True
            self._answer(404, _xml_error("NoSuchBucket", "The specified bucket does not exist"))

    # -- endpoints -----------------------------------------------------------------------------

    def _token(self) -> None:
        sandbox = self.server.sandbox
        form = {
            k: v[0] for k, v in parse_qs(self._drain().decode(), keep_blank_values=True).items()
        }
        client_id, secret = form.get("client_id"), form.get("client_secret")
        basic = self.headers.get("Authorization", "")
        status, doc = 200, None
        if basic.startswith("Basic "):
            if client_id or secret:
                status, doc = (
                    400,
                    {
                        "error": "invalid_request",
                        "error_description": "two client authentication methods",
                    },
                )
            else:
                decoded = base64.b64decode(basic[6:]).decode()
                raw_id, _, raw_secret = decoded.partition(":")
                client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        if doc is None and form.get("grant_type") != "client_credentials":
            status, doc = 400, {"error": "unsupported_grant_type"}
        elif doc is None and (client_id != sandbox.client_id or secret != sandbox.client_secret):
            status, doc = (
                401,
                {"error": "invalid_client", "error_description": "client authentication failed"},
            )
        elif doc is None and SCOPE not in form.get("scope", SCOPE).split():
            status, doc = 400, {"error": "invalid_scope"}
        if doc is None:
            doc = sandbox.issue_token()
        sandbox._record(Recorded("POST", "token", "/oauth2/token", status))
        self._json(status, doc, {"Cache-Control": "no-store"})

    def _urls(self, path: str, partial: bool = False) -> None:
        sandbox = self.server.sandbox
        app_id = unquote(path[len(URL_PREFIX) : -len("/upload")])
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        names = query.get("filenames", [])
        file_type = query["type"][0] if query.get("type") else None
        auth = self.headers.get("Authorization", "")
        status, doc = 200, None
        if not auth.startswith("Bearer ") or not sandbox.token_valid(auth[7:]):
            status, doc = 401, {"message": "Unauthorized"}
        elif app_id != sandbox.app_id:
            status, doc = 404, {"message": f"app {app_id} not found"}
        elif file_type is not None and file_type not in TYPES:
            status, doc = 400, {"message": f"invalid type {file_type}"}
        elif not names:
            status, doc = 400, {"message": "filenames is required"}
        else:
            bad = [n for n in names if not n or "/" in n or n in sandbox.refuse_names]
            if bad:
                status, doc = 400, {"message": f"invalid filename: {bad[0]}"}
        if doc is None:
            wanted = [n for n in names if n not in sandbox.omit_names] + sorted(sandbox.extra_names)
            if partial:
                wanted = [*wanted[::2], "not-asked-for.csv"]
            doc = {name: sandbox.signed_url(file_type, name) for name in wanted}
        sandbox._record(Recorded("GET", "urls", path, status, names=names))
        self._json(status, doc)

    def _put(self) -> None:
        sandbox = self.server.sandbox
        raw_path, _, query = self.path.partition("?")
        headers = {k: v for k, v in self.headers.items() if k.lower() in _RECORDED_HEADERS}
        refusal = sandbox.check_put(raw_path, query, self.headers)
        if refusal is not None:
            status, code, message = refusal
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= DRAIN_LIMIT and status != 501:
                self.rfile.read(length)  # so the client reads our answer, not a reset
            else:
                self.close_connection = True
            self._answer(status, _xml_error(code, message), "application/xml")
            sandbox._record(Recorded("PUT", "put", raw_path, status, headers))
            return
        key = unquote(raw_path[len(BUCKET) + 2 :])
        length = int(self.headers["Content-Length"])
        tmp = sandbox.store / f".incoming-{secrets.token_hex(8)}"
        md5 = hashlib.md5()  # noqa: S324 - S3's ETag, not security
        try:
            with tmp.open("wb") as out:
                remaining = length
                while remaining:
                    data = self.rfile.read(min(CHUNK, remaining))
                    if not data:
                        raise ConnectionError("client went away mid-body")
                    md5.update(data)
                    out.write(data)
                    remaining -= len(data)
            final = sandbox.store / key
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except (ConnectionError, OSError):
            tmp.unlink(missing_ok=True)  # S3 never keeps a partial object
            self.close_connection = True
            return
        etag = f'"{md5.hexdigest()}"'
        self._answer(200, b"", "application/xml", {"ETag": etag})
        sandbox._record(Recorded("PUT", "put", raw_path, 200, headers))


_RECORDED_HEADERS = {"content-length", "content-type", "content-md5", "transfer-encoding"}


def serve(host: str, port: int, store: Path) -> None:
    """`productiv-watcher sandbox`: run until SIGINT/SIGTERM, after printing the settings."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with Sandbox(store, host, port) as sandbox:
        for name, value in sandbox.env().items():
            print(f"{name}={value}")  # noqa: T201 - this is the command's output
        print(f"# objects are stored in {sandbox.store}", flush=True)  # noqa: T201
        stop.wait()
