"""Logging: one line per event on stderr, as text for people or JSON for machines, never a secret.

Pipeline code calls `event(log, "uploaded", file=..., bytes=...)`; the name is the stable `event`
field. Every line, library lines and tracebacks included, passes through `Redactor`, which removes
signed-URL query strings, signature parameters, echoed credentials and every registered secret
value before it is written. The same `REDACT` scrubs every other text that leaves the process:
the sidecars, receipts and status file (`REDACT.doc`) and the commands' output (`ScrubbedStream`).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import unquote, unquote_plus

# A query string, as in every signed URL: `?k=v...`, or `?flag&k=v...` (S3's `?x-id&X-Amz-...`).
# A '?' inside a file name is kept. A backslash ends it, so that JSON text stays valid.
_QUERY = re.compile(r"\?[\w.\-~%]+[=&][^\s\"'<>\\]*")
# A signature parameter wherever it appears, even without a '?' before it.
_SIGNED_PARAM = re.compile(
    r"(?i)\b(?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)"
    r"|signature|awsaccesskeyid)(?:=|%3D)[^&\s\"'<>\\]*"
)
_SIGNED_WORDS = re.compile("signature|credential|security-token|awsaccesskeyid")
_QUOTED = re.compile(r'["\\\x00-\x1f]')  # what json.dumps escapes (ensure_ascii off)
# An echoed `Authorization:` header (any scheme), up to the end of its value.
_AUTH_HEADER = re.compile(r"(?i)(\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)[^\"'\\\r\n}]+")
_BEARER = re.compile(r"(?i)\bbearer\s+[\w\-.~+/]{8,}=*")
_BASIC = re.compile(r"(?i)\bbasic\s+([A-Za-z0-9+/]{4,}={0,2})")
EXACT_FIELDS = frozenset({"file", "moved_to", "object"})  # file names: never rewritten
TOKENS_KEPT = 4  # the current access token and the few before it that may still be echoed


def _basic(match: re.Match[str]) -> str:
    """`Basic <base64 of id:secret>` -> `Basic ***`; an ordinary word after "basic" stays."""
    try:
        decoded = base64.b64decode(match.group(1), validate=True)
    except ValueError:
        return match.group(0)
    return "Basic ***" if b":" in decoded else match.group(0)


class Redactor:
    """Scrubs secrets, echoed credentials and signed-URL queries out of text (thread-safe).

    It holds the configured secrets and only the last `TOKENS_KEPT` access tokens: an older
    token can no longer be in any answer, and every line is scrubbed against all it holds.
    Credentials it was never told about are caught by their shape (`Authorization: ...`,
    `Bearer ...`, `Basic ...`, signature parameters).
    """

    def __init__(self) -> None:
        self._configured: tuple[str, ...] = ()
        self._tokens: deque[str] = deque(maxlen=TOKENS_KEPT)
        # Read unlocked, so replaced whole, in one assignment: both, longest first; and whether
        # one of them has a character that JSON escapes.
        self._state: tuple[tuple[str, ...], bool] = ((), False)
        self._lock = threading.Lock()

    def add(self, values: Iterable[str]) -> None:
        """Configured secrets (the client secret, a fixed token): kept for the process's life."""
        with self._lock:
            fresh = [v for v in values if len(v) >= 4 and v not in self._configured]
            self._configured += tuple(fresh)
            self._refresh()

    def add_token(self, token: str) -> None:
        """A newly fetched access token; the oldest one held is forgotten."""
        if len(token) < 4:
            return
        with self._lock:
            if token not in self._tokens:
                self._tokens.append(token)
                self._refresh()

    def _refresh(self) -> None:
        held = (*self._configured, *self._tokens)
        values = tuple(sorted(set(held), key=len, reverse=True))
        self._state = (values, any(_QUOTED.search(value) for value in held))

    def spotless(self, doc: Any) -> bool:
        """Nothing to scrub in any text of `doc` (keys and values, before any quoting), and no
        secret held that quoting would have escaped: then `doc` may go out as it is."""
        text = "\x00".join(_texts(doc))
        return not self._state[1] and self(text) == text

    def __len__(self) -> int:
        """How many secrets it holds."""
        return len(self._configured) + len(self._tokens)

    def __call__(self, text: str) -> str:
        text = self._known(text)  # first, so that no pattern leaves a piece of a secret behind
        # Each pattern only where its word is: a plain line costs a few substring searches.
        low = text.lower()
        if "authorization" in low:
            text = _AUTH_HEADER.sub(r"\1***", text)
        if "bearer" in low:
            text = _BEARER.sub("Bearer ***", text)
        if "basic" in low:
            text = _BASIC.sub(_basic, text)
        if "?" in text:
            text = _QUERY.sub("?<redacted>", text)
        if _SIGNED_WORDS.search(low):
            text = _SIGNED_PARAM.sub("<redacted>", text)
        return self._known(text)  # and last, so that no pattern's output spells one either

    def _known(self, text: str) -> str:
        """Each secret as itself replaced; a text where one shows only once its escapes are
        undone (`repr`, JSON, percent-encoding, nested) is withheld whole: the escaped spelling
        cannot be cut out of it exactly, and a regex for every spelling was quadratic."""
        secrets = self._state[0]
        for secret in secrets:
            text = text.replace(secret, "***")
        if not secrets or not _ESCAPES.search(text):
            return text  # nothing escaped: most lines
        if any(secret in view for view in escaped_views(text) for secret in secrets):
            return WITHHELD
        return text

    def doc(self, doc: Any, *, names: bool = False) -> Any:
        """A JSON document with every string scrubbed, except file names unless `names`
        (receipts and sidecars are searched by them, and a name is the producer's, never a
        credential). Scrubbed before it is serialised: after, a secret that JSON escapes (a
        quote, a backslash) is no longer found, and one that spells JSON (`null`, a key) breaks
        the line."""
        if isinstance(doc, str):
            return self(doc)
        if isinstance(doc, (list, tuple)):
            return [self.doc(value, names=names) for value in doc]
        if isinstance(doc, dict):
            return {
                (self(key) if names and isinstance(key, str) else key): (
                    value if key in EXACT_FIELDS and not names else self.doc(value, names=names)
                )
                for key, value in doc.items()
            }
        if doc is None or isinstance(doc, (bool, int, float)):
            return doc
        return self(str(doc))  # a Path, say: what JSON would have written


WITHHELD = "*** (withheld whole: a secret was in it, escaped)"
_ESCAPES = re.compile(r"[\\%+]")  # a text without any has no escaped view
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))", re.S)
_LETTERS = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
ESCAPE_LEVELS = 4  # JSON in JSON, an exception's repr inside another's: levels of escaping undone


def escaped_views(text: str) -> list[str]:
    r"""The text as it reads with its escapes undone, one level after another (JSON, repr and
    ascii() escapes: `\\`, `\'`, `\n`, `\xe9`, `\u00e9`, a surrogate pair, a bytes repr's UTF-8),
    and percent-decoded (a form, a URL, in either case): where an escaped secret shows as itself.
    Each view is linear in the text; a text with no backslash, `%` or `+` has none."""
    views: list[str] = []
    if "%" in text or "+" in text:
        views += [unquote(text, errors="surrogateescape"), unquote_plus(text)]
    for start in [text, *views]:
        level = start
        for _ in range(ESCAPE_LEVELS):
            if "\\" not in level:
                break
            level = _ESCAPE.sub(_unescaped, level)
            views += [level, *_recoded(level)]
    return views


def _unescaped(match: re.Match[str]) -> str:
    hexes = match.group(1) or match.group(2) or match.group(3)
    if hexes is not None:
        return chr(min(int(hexes, 16), 0x10FFFF))
    return _LETTERS.get(match.group(4), match.group(4))


def _recoded(text: str) -> list[str]:
    r"""The same text with each surrogate pair joined (JSON's spelling of an astral character),
    and each run of \xNN bytes read as UTF-8 (a bytes repr): one of them may spell the secret.
    Run by run, so that the rest of the text (an en dash, a name with a lone surrogate) does
    not keep them from it."""
    return [_PAIR.sub(_joined, text), _BYTES.sub(_as_utf8, text)]


_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_BYTES = re.compile("[\x80-\xff]+")


def _joined(match: re.Match[str]) -> str:
    return match.group(0).encode("utf-16", "surrogatepass").decode("utf-16")


def _as_utf8(match: re.Match[str]) -> str:
    return match.group(0).encode("latin-1").decode("utf-8", "replace")


def _texts(doc: Any) -> Iterator[str]:
    """Every text in a document, keys too, as a line of it would show it unquoted."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield str(key)
            yield from _texts(value)
    elif isinstance(doc, (list, tuple)):
        for value in doc:
            yield from _texts(value)
    elif isinstance(doc, str):
        yield doc
    elif doc is not None and not isinstance(doc, (bool, int, float)):
        yield str(doc)


class ScrubbedStream(io.TextIOBase):
    """A command's stdout, scrubbed as it is written: every printed line passes `REDACT`."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(REDACT(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


REDACT = Redactor()


def install_redaction() -> None:
    """Scrub every log record as it is created, so that no handler at all (ours, a library's,
    a test runner's) ever holds a secret or a signed query: urllib3 logs whole URLs at DEBUG."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not record.msg and not record.args:
            return record  # an event's line is all fields, scrubbed by the formatter
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


@functools.lru_cache(maxsize=4)
def _second(epoch: int) -> str:
    """A whole second as lines show it: formatted once for all the lines within it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))


def _timestamp(record: logging.LogRecord) -> str:
    return f"{_second(int(record.created))}.{int(record.msecs):03d}Z"


def _text_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = ",".join(map(str, value))
    else:
        text = (
            json.dumps(value, default=str, ensure_ascii=False)
            if isinstance(value, dict)
            else str(value)
        )
    return json.dumps(text, ensure_ascii=False) if re.search(r"[\s\"=]", text) or not text else text


class TextFormatter(logging.Formatter):
    """`2026-11-27T07:15:00.000Z INFO    uploaded file=a.csv bytes=10 seconds=0.1 message`."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        brief = {k: v.brief if isinstance(v, Detail) else v for k, v in fields.items()}
        shown = [brief, record.getMessage(), *self._traceback(record)]
        if REDACT.spotless(shown):
            return self._line(record, lambda value: value)
        # each value scrubbed before it is quoted (quoting escapes a secret's quotes), then all
        return REDACT(self._line(record, lambda value: REDACT.doc(value, names=True)))

    def _traceback(self, record: logging.LogRecord) -> list[str]:
        return [self.formatException(record.exc_info)] if record.exc_info else []

    def _line(self, record: logging.LogRecord, scrub: Callable[[Any], Any]) -> str:
        name = getattr(record, "event", None) or record.name
        parts = [_timestamp(record), f"{record.levelname:<7}", name]
        fields: dict[str, Any] = getattr(record, "fields", {})
        for key, value in fields.items():
            pairs = value.brief.items() if isinstance(value, Detail) else [(key, value)]
            parts += [f"{k}={_text_value(scrub(v))}" for k, v in pairs if v is not None]
        message = record.getMessage()
        if message:
            parts.append(scrub(message))
        # each part on its own: a text withheld whole is that part, never the line's head
        return "\n".join([" ".join(parts), *map(scrub, self._traceback(record))])


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
        if REDACT.spotless(doc):
            return json.dumps(doc, ensure_ascii=False, default=str)
        # scrubbed value by value: a secret JSON escapes is found, one that spells JSON is no harm
        # (the line's own keys are ours; a value's keys are scrubbed too)
        scrubbed = {key: REDACT.doc(value, names=True) for key, value in doc.items()}
        return json.dumps(scrubbed, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route all logging (warnings and uncaught exceptions too) to one stderr handler."""
    # No formatter prints them, and each is work (a getpid syscall) on every line.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    # Nor where a line was logged from: finding it walks the stack on every line (the logging
    # HOWTO's "Optimization" section names this switch; 11 % of a line's cost, measured).
    logging._srcfile = None
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
