"""`productiv-watcher upload FILE...`: the same client and PUT, once, without the folders.

Service-side faults are retried with backoff up to `max_attempts` rounds (a one-shot command
must end); each file's result is printed, and the exit status is 0 only if all were uploaded.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from ..items import Item, Snapshot, Spot, display, printable
from ..pipeline.fates import Next, decide
from ..pipeline.uploader import refusal
from ..remote.api import ApiClient, SignedUrl
from ..remote.faults import Fault, Kind, backoff_seconds
from ..remote.network import Network
from ..remote.transfer import Transfer
from ..settings import Settings

AGAIN = frozenset({Next.BACK_OFF, Next.FRESH_URL, Next.CHECK_CLOCK, Next.RETRY})  # next round


def upload_files(settings: Settings, paths: list[Path], file_type: str | None) -> int:
    network = Network.from_settings(settings)
    api = ApiClient(settings, network=network)
    transfer = Transfer(
        settings.request_timeout_seconds,
        1,
        settings.content_type,
        network=network,
        min_rate=int(settings.min_upload_rate),
        rate_limit=int(settings.upload_rate_limit),
    )
    results: dict[tuple[Path, str], str] = {}  # by file and the name it is sent under
    pending: list[Item] = []
    named: set[tuple[Path, str]] = set()
    for path in paths:
        try:
            real = path.resolve(strict=True)
            if (real, path.name) in named:
                continue  # the same file under the same name, named twice: sent once
            named.add((real, path.name))
            pending.append(
                Item(
                    Spot(real, display(str(path)), path.name, file_type), Snapshot.of(os.stat(real))
                )
            )
        except OSError as exc:
            results[(path, path.name)] = f"FAILED {display(str(path))}: {exc.strerror}"
    pause = threading.Event()
    try:
        for round_ in range(1, settings.max_attempts + 1):
            tried = (_try(api, transfer, settings, item, results) for item in pending)
            pending = [item for item in tried if item is not None]
            if not pending or round_ == settings.max_attempts:
                break
            pause.wait(
                backoff_seconds(
                    round_,
                    settings.retry_initial_seconds,
                    settings.retry_max_seconds,
                    random.random(),
                )
            )
    finally:
        api.close()
    for item in pending:
        results.setdefault(
            (item.path, item.spot.name),
            f"FAILED {item.spot.rel}: gave up after {settings.max_attempts} attempts",
        )
    for line in results.values():
        print(printable(line))
    return 0 if all(line.startswith("uploaded") for line in results.values()) else 1


def _try(
    api: ApiClient,
    transfer: Transfer,
    settings: Settings,
    item: Item,
    results: dict[tuple[Path, str], str],
) -> Item | None:
    """One try for one file: None when its result is final (uploaded, or failed for good as
    `decide` says), else the file's state for the next round."""
    rel = item.spot.rel
    reason = refusal(item, settings.max_file_size)  # the daemon's rules, before any API call
    if reason is not None:
        results[(item.path, item.spot.name)] = f"FAILED {rel}: {reason}"
        return None
    try:
        answer = api.upload_urls([item.spot.name], item.spot.file_type).get(item.spot.name)
        if not isinstance(answer, SignedUrl):
            raise answer or Fault(Kind.FILE, "the API's answer has no URL for this file name")
        sent = transfer.put(answer, item)
    except Fault as fault:  # the file's own troubles too: gone, changed, not a regular file
        results[(item.path, item.spot.name)] = f"FAILED {rel}: {fault.reason}"
        fate = decide(item, fault.kind, settings.max_attempts)
        return fate.item if fate.next in AGAIN else None
    results[(item.path, item.spot.name)] = (
        f"uploaded {rel} ({item.snapshot.size} bytes, {sent.seconds:.2f} s)"
    )
    return None
