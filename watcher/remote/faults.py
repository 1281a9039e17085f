"""What went wrong, whose problem it is, and how long to wait: the retry policy in one place.

Two layers retry, each declared once here:
- the transport (`transport_retry`, the API calls): urllib3 retries a connection blip or a
  500/502/504 a couple of times within one call. GET is idempotent and the token grant is safe to
  repeat. The PUTs (libcurl) are retried in-call only when a reused connection turns out dead
  (libcurl rewinds the body); every other PUT failure goes to the pipeline, and the storage's gate.
- the pipeline (`Fault` + `backoff_seconds`): what still fails is classified into a `Kind`, and the
  uploader branches on that kind alone. 429 and 503 are left to this layer so that a Retry-After
  of minutes is waited out interruptibly (urllib3 would sleep on it, deaf to SIGTERM).
"""

from __future__ import annotations

import email.utils
import enum
import re

from urllib3.util.retry import Retry

RETRY_AFTER_CAP_SECONDS = 900.0  # Retry-After is honoured up to 15 minutes


class Kind(enum.Enum):
    """Whose problem a failure is, which decides what happens to the file."""

    SERVICE = "service"  # the API or storage is unwell: the file stays, everything backs off
    EXPIRED = "expired"  # the signed URL expired: ask for a fresh one, costs no attempt
    FILE = "file"  # this file was refused: costs one attempt, failed/ after max_attempts
    FINAL = "final"  # this file can never be uploaded as it is: failed/ at once
    REFUSED = "refused"  # the signed-URL request was refused (400): split the batch to find why
    GONE = "gone"  # the producer removed the file: forget it
    NOT_REGULAR = "not regular"  # the path is now a link, FIFO, folder...: forget it
    CHANGED = "changed"  # not the version that settled: let it settle again


class Fault(Exception):
    """A classified failure; the message is one human sentence, free of secrets and URL queries."""

    def __init__(
        self,
        kind: Kind,
        reason: str,
        status: int | None = None,
        retry_after: float | None = None,
        where: str = "",
    ) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.where = where  # token, urls, put or move: the retry metric's cause

    @property
    def family(self) -> str:
        """The retry metric's class: 4xx, 5xx, 429, 3xx, or network."""
        if self.status is None:
            return "network"
        return "429" if self.status == 429 else f"{self.status // 100}xx"


def transport_retry() -> Retry:
    """The quick, in-call retries of every HTTP request; the pipeline's backoff comes after."""
    return Retry(
        total=3,
        connect=2,
        read=1,
        status=2,
        other=0,
        redirect=0,
        status_forcelist=(500, 502, 504),
        allowed_methods=frozenset({"GET", "PUT", "POST"}),
        backoff_factor=0.2,
        backoff_max=2.0,
        raise_on_status=False,
        raise_on_redirect=False,
        respect_retry_after_header=False,
    )


def classify_api_status(status: int, endpoint: str) -> Kind | None:
    """Signed-URL or token answer -> None when fine, else whose problem it is.

    400 (and 413/414/431, a URL or header too long) means the API refused something in the
    request: the uploader splits the batch to find which name, or to make the URL shorter.
    Everything else, 404 (unknown app) and 401/403 after a fresh token included, is the
    service's or the configuration's problem: the files are fine and wait.
    """
    if 200 <= status < 300:
        return None
    if endpoint == "urls" and status in (400, 413, 414, 431):
        return Kind.REFUSED
    return Kind.SERVICE


def names_fault(status: int | None) -> bool:
    """Is a refused signed-URL request that named one file only that name's fault?

    400 (the API refused something in it) and 414 (the URL is too long for that server): yes,
    the file fails. 413 and 431 are about the request's size and its header fields (the access
    token), never a name that fits the request line's budget: the API's problem, and failing
    the file for it would send every file of the drop folder to failed/, one by one.
    """
    return status not in (413, 431)


_XML_CODE = re.compile(r"<Code>\s*([^<]*?)\s*</Code>")
_XML_MESSAGE = re.compile(r"<Message>\s*([^<]*?)\s*</Message>")


def s3_error(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 XML error body, empty strings when absent."""
    text = body[:4096].decode("utf-8", "replace")
    code = _XML_CODE.search(text)
    message = _XML_MESSAGE.search(text)
    return (tidy(code.group(1)) if code else "", tidy(message.group(1)) if message else "")


def tidy(words: str, limit: int = 200) -> str:
    """A server's own words made fit for one log field or status line: control characters
    (a newline would forge a line of systemd's notify protocol) become spaces; capped."""
    return " ".join("".join(c if c.isprintable() else " " for c in words[:limit]).split())


def classify_put(status: int, body: bytes, url_expired: bool = False) -> Kind | None:
    """PUT answer -> None when stored, else whose problem it is.

    An expired URL is answered 403 by S3 ("Request has expired") and 400 by rclone's serve s3
    ("The difference between the request time and the server's time exceeds..."), both with
    Code AccessDenied: fetch a fresh URL, no attempt used. RequestTimeTooSkewed is the same
    story told about the clocks. Ceph RGW says only AccessDenied, with an empty Message: when
    the URL's own expiry (by the API's clock) has passed, `url_expired`, AccessDenied is
    taken to mean "expired" whatever the words.
    """
    if 200 <= status < 300:
        return None
    if status < 200 or status == 429 or status >= 500 or 300 <= status < 400:
        return Kind.SERVICE
    code, message = s3_error(body)
    message = message.lower()
    if code == "RequestTimeTooSkewed" or (
        code == "AccessDenied"
        and (url_expired or "expired" in message or "request time" in message)
    ):
        return Kind.EXPIRED
    return Kind.FILE


def put_reason(status: int, body: bytes) -> str:
    code, message = s3_error(body)
    detail = ": ".join(part for part in (code, message) if part)
    return f"storage answered HTTP {status}" + (f" ({detail})" if detail else "")


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from `now` (epoch), from delta-seconds or an HTTP date; capped."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True too
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, OverflowError):
            return None
    return max(0.0, min(seconds, RETRY_AFTER_CAP_SECONDS))


def backoff_seconds(step: int, initial: float, maximum: float, jitter: float) -> float:
    """Capped exponential backoff with jitter: step 1 waits about `initial`, then doubles.

    `jitter` in [0, 1) spreads the wait between half and all of the step, so that several
    daemons (or threads) that failed together do not come back together.
    """
    base: float = min(maximum, initial * 2.0 ** min(step - 1, 32))
    return base * (0.5 + jitter / 2)
