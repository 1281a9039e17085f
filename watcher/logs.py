"""Logging: one line per event on stderr, as text for people or JSON for machines, never a secret.

Pipeline code calls `event(log, "uploaded", file=..., bytes=...)`; the name is the stable `event`
field. Every line, library lines and tracebacks included, passes through `Redactor`, which removes
signed-URL query strings and any registered secret value before it is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

# A query string of key=value pairs, as in every signed URL; a '?' inside a file name is kept.
_QUERY = re.compile(r"\?[\w.\-~%]+=[^\s\"'<>]*")


class Redactor:
    """Scrubs secrets and signed-URL query strings out of finished log lines (thread-safe)."""

    def __init__(self) -> None:
        self._secrets: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            self._secrets = self._secrets | {v for v in values if len(v) >= 4}

    def __call__(self, text: str) -> str:
        text = _QUERY.sub("?<redacted>", text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


REDACT = Redactor()


def install_redaction() -> None:
    """Scrub every log record as it is created, so that no handler at all (ours, a library's,
    a test runner's) ever holds a secret or a signed query: urllib3 logs whole URLs at DEBUG."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return record  # a malformed call: the formatter still redacts what it prints
        clean = REDACT(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return record

    factory.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def event(
    logger: logging.Logger,
    name: str,
    message: str = "",
    *,
    level: int = logging.INFO,
    **fields: Any,
) -> None:
    """Log one pipeline event with its stable name and structured fields."""
    logger.log(level, message, extra={"event": name, "fields": fields})


@dataclass(frozen=True)
class Detail:
    """A field that JSON lines carry whole (`full`) and text lines show as the `key=value`
    pairs of `brief`: a person reading the start line wants a glance, not escaped JSON."""

    full: Mapping[str, Any]
    brief: Mapping[str, Any]


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def _text_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = ",".join(map(str, value))
    else:
        text = json.dumps(value, default=str) if isinstance(value, dict) else str(value)
    return json.dumps(text, ensure_ascii=False) if re.search(r"[\s\"=]", text) or not text else text


class TextFormatter(logging.Formatter):
    """`2026-11-27T07:15:00.000Z INFO    uploaded file=a.csv bytes=10 seconds=0.1 message`."""

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "event", None) or record.name
        parts = [_timestamp(record), f"{record.levelname:<7}", name]
        fields: dict[str, Any] = getattr(record, "fields", {})
        for key, value in fields.items():
            pairs = value.brief.items() if isinstance(value, Detail) else [(key, value)]
            parts += [f"{k}={_text_value(v)}" for k, v in pairs if v is not None]
        message = record.getMessage()
        if message:
            parts.append(message)
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return REDACT(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback is a field, never extra lines."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
            "logger": record.name,
        }
        for key, value in getattr(record, "fields", {}).items():
            if value is not None:
                doc[key] = value.full if isinstance(value, Detail) else value
        message = record.getMessage()
        if message:
            doc["message"] = message
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return REDACT(json.dumps(doc, ensure_ascii=False, default=str))


def setup(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route all logging (warnings and uncaught exceptions too) to one stderr handler."""
    # No formatter prints them, and each is work (a getpid syscall) on every line.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    install_redaction()
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_crash


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level)


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("watcher").critical(
        "unexpected error", exc_info=(kind, value, tb), extra={"event": "crashed"}
    )


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or args.exc_type is SystemExit:
        return
    logging.getLogger("watcher").critical(
        "thread %s died",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"event": "crashed"},
    )
