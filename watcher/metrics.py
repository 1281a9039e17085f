"""Optional Prometheus metrics (`pip install productiv-watcher[metrics]`), with the official
prometheus-client: an HTTP endpoint (`metrics_port`, loopback by default) and/or a file for
node_exporter's textfile collector (`metrics_textfile`). Without either setting every call here
is a no-op and prometheus-client is not even imported.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import ConfigError, Settings

PORT_ERRORS = (errno.EADDRINUSE, errno.EACCES)  # the port's fault; anything else: the host's


class Metrics:
    """Counters are fed by the stages; gauges are read from the service when scraped."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.metrics_port is not None or settings.metrics_textfile is not None
        self._port = settings.metrics_port
        self._host = settings.metrics_host
        self._textfile = settings.metrics_textfile
        self._server: Any = None
        if not self.enabled:
            return
        try:
            import prometheus_client as prom
        except ImportError:
            raise ConfigError(
                "invalid setting metrics_port/metrics_textfile: prometheus-client is not installed "
                "(pip install 'productiv-watcher[metrics]')"
            ) from None
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self._uploaded = prom.Counter(
            "productiv_watcher_files_uploaded",
            "Files uploaded and moved to done/",
            ["type"],
            registry=r,
        )
        self._failed = prom.Counter(
            "productiv_watcher_files_failed", "Files moved to failed/", ["type"], registry=r
        )
        self._bytes = prom.Counter(
            "productiv_watcher_bytes_uploaded", "Bytes of uploaded files", registry=r
        )
        self._retries = prom.Counter(
            "productiv_watcher_retries",
            "Retries, by where the fault was (token, urls, put, move) and its class",
            ["cause", "class"],
            registry=r,
        )
        self._late = prom.Counter(
            "productiv_watcher_late_writes",
            "Files written to after their upload, in done/ (each settles and goes again)",
            registry=r,
        )
        self._deleted = prom.Counter(
            "productiv_watcher_files_deleted", "done/ files removed by retention", registry=r
        )
        self._duration = prom.Histogram(
            "productiv_watcher_upload_seconds",
            "Duration of a file's PUT",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
            registry=r,
        )

    def gauges(self, readers: dict[str, tuple[str, Callable[[], float]]]) -> None:
        """name -> (help, function read at every scrape)."""
        if not self.enabled:
            return
        for name, (text, read) in readers.items():
            self._prom.Gauge(
                f"productiv_watcher_{name}", text, registry=self.registry
            ).set_function(read)

    def start(self) -> None:
        """Listen on metrics_host:metrics_port; ConfigError (exit 78) naming the setting if not."""
        if not self.enabled or self._port is None:
            return
        try:
            self._server, _ = self._prom.start_http_server(
                self._port, addr=self._host, registry=self.registry
            )
        except (OSError, ValueError, UnicodeError) as exc:
            name = "metrics_port" if getattr(exc, "errno", None) in PORT_ERRORS else "metrics_host"
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                f"invalid setting {name}: cannot serve metrics on {self._host} port {self._port}"
                f" ({reason})"
            ) from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def write_textfile(self) -> None:
        """Rewrite the textfile atomically (prometheus-client writes a temporary, then renames);
        raises OSError, which the caller logs."""
        if self.enabled and self._textfile is not None:
            Path(self._textfile).parent.mkdir(parents=True, exist_ok=True)
            self._prom.write_to_textfile(str(self._textfile), self.registry)

    # -- events from the stages -------------------------------------------------------------

    def uploaded(self, file_type: str | None, size: int, seconds: float) -> None:
        if self.enabled:
            self._uploaded.labels(file_type or "none").inc()
            self._bytes.inc(size)
            self._duration.observe(seconds)

    def failed(self, file_type: str | None) -> None:
        if self.enabled:
            self._failed.labels(file_type or "none").inc()

    def retried(self, cause: str, family: str) -> None:
        if self.enabled:
            self._retries.labels(cause or "other", family).inc()

    def late_write(self) -> None:
        if self.enabled:
            self._late.inc()

    def deleted(self) -> None:
        if self.enabled:
            self._deleted.inc()
