"""Late writes' decisions: is a file in done/ the version uploaded, changed, or gone?

Pure functions of two snapshots (latewrite.py's thread stats; these judge), tested from tables
in tests/test_late_write.py.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from pathlib import Path

from ..items import Snapshot, Spot


class Look(enum.Enum):
    SAME = "same"
    CHANGED = "changed"  # written to since it was uploaded
    GONE = "gone"  # removed, or another file under its name: forgotten


def baseline(uploaded: Snapshot, moved: Snapshot) -> Snapshot:
    """The version in done/ to compare with from now on. The rename into done/ changed its
    ctime, so the first look there is the baseline, provided its content's marks (identity,
    size, mtime) are those uploaded; otherwise it was written to before that look, and the
    uploaded version itself is the baseline, which then differs."""
    same = (moved.dev, moved.ino, moved.size, moved.mtime_ns) == (
        uploaded.dev,
        uploaded.ino,
        uploaded.size,
        uploaded.mtime_ns,
    )
    return moved if same else uploaded


def first_look(uploaded: Snapshot, moved: Snapshot) -> tuple[Snapshot, Look]:
    """A file just moved into done/: its baseline, and how it looks against it already."""
    base = baseline(uploaded, moved)
    return base, compare(base, moved)


def compare(base: Snapshot, now: Snapshot | None) -> Look:
    """A recent file as found now, against its baseline."""
    if now is None or (now.dev, now.ino) != (base.dev, base.ino):
        return Look.GONE
    return Look.SAME if now == base else Look.CHANGED


@dataclass(frozen=True, slots=True)
class Recent:
    """A file in done/ under watch: where it is, what it was uploaded as, until when."""

    path: Path  # in done/
    spot: Spot  # as it was uploaded: the object's name and type, its drop-folder name
    base: Snapshot
    until: float  # monotonic
    again: int = 0  # uploads again so far

    def late_spot(self) -> Spot:
        return replace(self.spot, path=self.path)
