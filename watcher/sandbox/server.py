"""The sandbox's HTTP side: a threaded server on loopback and the request handler that plays
Productiv's token and signed-URL endpoints and S3's PUT, as `productiv.Sandbox` scripts it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import socket
import ssl
import threading
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

if TYPE_CHECKING:
    from .productiv import Sandbox

BUCKET = "productiv-data"
URL_PREFIX = "/services/push/v1/customer/apps/"
TYPES = ("users", "contracts", "other")
SCOPE = "https://api.productiv.com/connector.write"
CHUNK = 1024 * 1024
DRAIN_LIMIT = 8 * CHUNK  # a refused PUT's body is read up to this size, then the line is cut


@dataclass
class Recorded:
    method: str
    endpoint: str
    path: str  # never the query
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)


class SandboxServer(ThreadingHTTPServer):
    """Tracks open connections so that `stop` can end their keep-alive threads at once."""

    daemon_threads = True
    request_queue_size = 128
    sandbox: Sandbox

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(address, handler)
        self.tls = tls
        self.open_sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()

    def get_request(self) -> tuple[Any, Any]:
        """With TLS, the handshake waits for the request's own thread (`finish_request`), so
        a client that never completes it cannot stall the accepting thread."""
        request, address = super().get_request()
        if self.tls is not None:
            request = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        return request, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(SandboxHandler.timeout)
            request.do_handshake()  # a refused certificate ends here, in handle_error
        super().finish_request(request, client_address)

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


class SandboxHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection is closed after this
    server: SandboxServer

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
        extra = extra or {}
        if "Date" in extra:
            self.send_response_only(status)  # the injected Date instead of ours
        else:
            self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
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
        fault = sandbox.arrive(endpoint)
        if fault is None:
            return False
        if fault.delay:
            sandbox.pause(fault.delay)
        if fault.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            sandbox.record(Recorded(self.command, endpoint, self._path(), 0))
            return True
        if fault.partial and endpoint == "urls":
            self._urls(self._path(), partial=True)
            return True
        if fault.etag is not None and endpoint == "put":
            self._put(fault.etag)
            return True
        if fault.status is None and fault.body is None:
            return False  # only a delay
        status = fault.status or 200
        extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        extra.update(fault.headers or {})
        if 300 <= status < 400:
            extra["Location"] = f"{sandbox.url}/elsewhere"
        if endpoint != "put" or self.headers.get("Content-Length"):
            self._drain()
        if fault.body is not None:
            body = fault.body.encode()
        elif fault.echo_auth:
            echoed = f"refused, Authorization: {self.headers.get('Authorization', 'none')}"
            body = json.dumps({"message": echoed}).encode()
        elif endpoint == "put":
            body = _xml_error("InternalError" if status >= 500 else "AccessDenied", "injected")
        else:
            body = json.dumps({"message": f"injected {status}"}).encode()
        sandbox.record(Recorded(self.command, endpoint, self._path(), status))
        self._answer(
            status, body, "application/xml" if endpoint == "put" else "application/json", extra
        )
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
        sandbox.record(Recorded("POST", "token", "/oauth2/token", status))
        self._json(status, doc, {"Cache-Control": "no-store"})

    def _urls(self, path: str, partial: bool = False) -> None:
        sandbox = self.server.sandbox
        app_id = unquote(path[len(URL_PREFIX) : -len("/upload")])
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        names = query.get("filenames", [])
        file_type = query["type"][0] if query.get("type") else None
        auth = self.headers.get("Authorization", "")
        status, doc = 200, None
        if sandbox.max_request_line and len(self.requestline) > sandbox.max_request_line:
            status, doc = 431, {"message": "Request Header Fields Too Large"}
        elif not auth.startswith("Bearer ") or not sandbox.token_valid(auth[7:]):
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
        sandbox.record(Recorded("GET", "urls", path, status, names=names))
        self._json(status, doc)

    def _put(self, etag: str | None = None) -> None:
        """Store the body as S3 does; answer its MD5 as ETag, or `etag` when injected ("": none)."""
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
            sandbox.record(Recorded("PUT", "put", raw_path, status, headers))
            self._answer(status, _xml_error(code, message), "application/xml")
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
        etag = f'"{md5.hexdigest()}"' if etag is None else etag
        # recorded before the answer, as the token and URL calls are: a client that has its
        # answer finds the request in `requests` (a test counting PUTs raced the recording)
        sandbox.record(Recorded("PUT", "put", raw_path, 200, headers))
        self._answer(200, b"", "application/xml", {"ETag": etag} if etag else {})


_RECORDED_HEADERS = {"content-length", "content-type", "content-md5", "transfer-encoding"}
