"""Loaded by proxy.py itself (`--plugins tests.proxy_plugin.RecordTargets`), not by pytest."""

from __future__ import annotations

import os

from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin


class RecordTargets(HttpProxyBasePlugin):
    """Appends `METHOD host:port` to $PROXY_RECORD for each request it lets through (after
    the login check): every plain request, also the later ones on a kept-alive connection,
    and one line per CONNECT tunnel (what goes through a tunnel is not the proxy's to see)."""

    def handle_client_request(self, request: HttpParser) -> HttpParser:
        method = (request.method or b"?").decode()
        host = (request.host or b"?").decode()
        with open(os.environ["PROXY_RECORD"], "a", encoding="utf-8") as out:
            out.write(f"{method} {host}:{request.port}\n")
        return request
