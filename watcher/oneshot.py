"""`productiv-watcher upload FILE...`: the same client and PUT, once, without the folders.

Service-side faults are retried with backoff up to `max_attempts` rounds (a one-shot command
must end); each file's result is printed, and the exit status is 0 only if all were uploaded.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from .api import ApiClient, SignedUrl
from .faults import Fault, Kind, backoff_seconds
from .items import Item, Snapshot, Spot, display
from .network import Network
from .settings import Settings
from .transfer import FileChanged, FileGone, NotRegular, Transfer
from .uploader import refusal


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
    results: dict[Path, str] = {}
    pending: list[Item] = []
    for path in paths:
        try:
            real = path.resolve(strict=True)
            pending.append(
                Item(
                    Spot(real, display(str(path)), path.name, file_type), Snapshot.of(os.stat(real))
                )
            )
        except OSError as exc:
            results[path] = f"FAILED {display(str(path))}: {exc.strerror}"
    pause = threading.Event()
    try:
        for round_ in range(1, settings.max_attempts + 1):
            pending = [item for item in pending if not _try(api, transfer, settings, item, results)]
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
            item.path, f"FAILED {item.spot.rel}: gave up after {settings.max_attempts} attempts"
        )
    for line in results.values():
        print(line)
    return 0 if all(line.startswith("uploaded") for line in results.values()) else 1


def _try(
    api: ApiClient, transfer: Transfer, settings: Settings, item: Item, results: dict[Path, str]
) -> bool:
    """One try for one file; True when its result is final (uploaded or failed for good)."""
    rel = item.spot.rel
    reason = refusal(item, settings.max_file_size)  # the daemon's rules, before any API call
    if reason is not None:
        results[item.path] = f"FAILED {rel}: {reason}"
        return True
    try:
        answer = api.upload_urls([item.spot.name], item.spot.file_type).get(item.spot.name)
        if not isinstance(answer, SignedUrl):
            raise answer or Fault(Kind.FILE, "the API's answer has no URL for this file name")
        sent = transfer.put(answer, item)
    except Fault as fault:
        final = fault.kind in (Kind.FINAL, Kind.REFUSED)
        results[item.path] = f"FAILED {rel}: {fault.reason}"
        return final
    except (FileGone, FileChanged, NotRegular) as exc:
        results[item.path] = f"FAILED {rel}: {exc or 'the file disappeared'}"
        return True
    results[item.path] = f"uploaded {rel} ({item.snapshot.size} bytes, {sent.seconds:.2f} s)"
    return True
