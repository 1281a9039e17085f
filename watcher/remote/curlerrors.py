"""A PUT that libcurl could not complete, as one `Fault` with one human sentence.

libcurl's own error strings may carry the URL, and with it the signed query (a credential), so
the reasons are built from the error code and the facts libcurl reports beside it (the proxy's
CONNECT answer, the OS error, OpenSSL's verify result); of the message only OpenSSL's words after
"SSL certificate problem:" are kept, as the API client's reasons keep them.
"""

from __future__ import annotations

import http
import os
from dataclasses import dataclass

import pycurl

from .faults import Fault, Kind, tidy
from .network import UNTRUSTED_CODES, certificate_reason

CODE_NAMES = {
    value: name[2:]
    for name, value in vars(pycurl).items()
    if name.startswith("E_")
    and isinstance(value, int)
    and name != "E_OK"
    and not name.startswith(("E_MULTI_", "E_CALL_MULTI"))  # the multi's codes reuse 1, 3...
}
UNUSABLE_URL = frozenset({pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_URL_MALFORMAT})
TLS_VERIFY = frozenset({pycurl.E_PEER_FAILED_VERIFICATION, pycurl.E_SSL_CACERT})
TOO_LARGE = 100  # CURLE_TOO_LARGE (libcurl 8.6): pycurl has no name for it yet
TLS_PREFIXES = ("SSL certificate problem: ", "SSL: ")


@dataclass(frozen=True, slots=True)
class Failure:
    """What libcurl says about a transfer that failed (getinfo, right after it ended)."""

    code: int
    message: str  # libcurl's error buffer: may hold the URL, never shown whole
    host: str
    proxy: str  # host:port of the proxy, "" when direct
    connect_code: int = 0  # the proxy's answer to CONNECT
    os_errno: int = 0
    verify_result: int = 0  # OpenSSL's verify code for the storage's certificate
    proxy_verify_result: int = 0  # ... for an https:// proxy's
    timeout_seconds: float = 0.0
    connected: bool = False  # a connection was made: the URL itself was usable


def curl_fault(failure: Failure) -> Fault:
    """The fault for a failed transfer: FINAL for a URL libcurl refuses before connecting,
    SERVICE otherwise (the network, the proxy or the storage is unwell; the file is fine and
    waits). An answer that is not HTTP also ends as UNSUPPORTED_PROTOCOL: after connecting,
    it is the storage's (or a middlebox's) fault, never the file's."""
    code = failure.code
    if code in UNUSABLE_URL and not failure.connected:
        reason = f"the signed URL cannot be used: libcurl refused it ({CODE_NAMES[code]})"
        return Fault(Kind.FINAL, reason, where="put")
    return Fault(Kind.SERVICE, f"PUT to storage failed: {detail(failure)}", where="put")


PLAIN = {
    pycurl.E_COULDNT_RESOLVE_PROXY: "cannot resolve the proxy {proxy}",
    pycurl.E_COULDNT_RESOLVE_HOST: "cannot resolve {host}",
    pycurl.E_COULDNT_CONNECT: "cannot connect to {target}{os_error}",
    pycurl.E_GOT_NOTHING: "{host} closed the connection without an answer",
    pycurl.E_SEND_ERROR: "the connection to {host}{via} broke{os_error}",
    pycurl.E_RECV_ERROR: "the connection to {host}{via} broke{os_error}",
    pycurl.E_UNSUPPORTED_PROTOCOL: "{host}{via} answered something that is not HTTP/1.1",
    pycurl.E_FTP_WEIRD_SERVER_REPLY: "{host}{via} answered something that is not HTTP/1.1",
    TOO_LARGE: "{host}{via} answered a header block too large to read",
}


def detail(f: Failure) -> str:
    """The cause, for an operator: the host or proxy it concerns and what to do when known."""
    via = f" through the proxy {f.proxy}" if f.proxy else ""
    if f.code in TLS_VERIFY:
        where = f"the proxy {f.proxy}" if f.proxy_verify_result else f.host
        result = f.proxy_verify_result or f.verify_result
        return certificate_reason(where, openssl_words(f.message), result in UNTRUSTED_CODES)
    if f.proxy and f.connect_code >= 300:
        status = f"{f.connect_code} {_phrase(f.connect_code)}".strip()
        if f.connect_code == 407:
            status += ": check the user name and password in the proxy setting"
        return f"cannot connect to {f.host}{via}: {status}"
    if f.code == pycurl.E_OPERATION_TIMEDOUT:  # the only timeout set: CONNECTTIMEOUT
        return f"cannot connect to {f.host}{via} within {f.timeout_seconds:g} s"
    template = PLAIN.get(f.code, "{name} (libcurl error {code}) with {host}{via}")
    return template.format(
        name=CODE_NAMES.get(f.code, "error"),
        code=f.code,
        host=f.host,
        via=via,
        proxy=f.proxy,
        target=f"the proxy {f.proxy}" if f.proxy else f.host,
        os_error=f" ({os.strerror(f.os_errno)})" if f.os_errno else "",
    )


def openssl_words(message: str) -> str:
    """OpenSSL's reason from libcurl's TLS message ("unable to get local issuer certificate")."""
    for prefix in TLS_PREFIXES:
        if prefix in message:
            words = tidy(message.split(prefix, 1)[1])
            if "/" not in words and "?" not in words:  # never a URL, whatever libcurl says
                return words
    return "unknown reason"


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
