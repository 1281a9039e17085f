"""Retention of done/: files that have been there longer than `done_retention_days` go.

Age counts from when a file arrived in done/ (the rename sets its ctime), not from its mtime,
which is the producer's and may be years old. failed/ and the drop folder are never touched.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path


def expired(done_dir: Path, cutoff: float) -> Iterator[Path]:
    """Regular files below done_dir that arrived before `cutoff` (epoch seconds)."""
    for folder, _, names in os.walk(done_dir):
        for name in names:
            path = Path(folder) / name
            try:
                st = os.lstat(path)
            except OSError:  # gone, or unreadable: not this sweep's to judge
                continue
            if stat.S_ISREG(st.st_mode) and st.st_ctime < cutoff:
                yield path


def sweep_interval(days: float) -> float:
    """Hourly, or more often for a retention shorter than a few hours."""
    return min(3600.0, days * 86400 / 4)
