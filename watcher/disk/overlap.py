"""Which of the daemon's folders overlap: one folder under two names, or one inside another.

Compared as the folders really are, not as text: `done_dir = /x/y/../drop` is the drop folder, and
a symlink or a bind mount is another name for a folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path, PurePath

from ..items import Identity


@dataclass(frozen=True, slots=True)
class Place:
    """Where a folder really is: its resolved path, and the (dev, inode) of each folder from
    it (when it exists) up to `/`, innermost first."""

    path: PurePath
    chain: tuple[Identity, ...]
    exists: bool


def place(path: Path) -> Place:
    """Resolves `..` and symlinks; the identities also catch a bind mount of the same folder."""
    real = Path(os.path.realpath(path))
    chain = []
    for folder in (real, *real.parents):
        try:
            st = os.stat(folder)
        except OSError:
            continue
        chain.append((st.st_dev, st.st_ino))
    return Place(real, tuple(chain), real.is_dir())


def overlapping(places: Mapping[str, Place]) -> list[tuple[str, str, bool]]:
    """(inner, outer, same folder) for each pair of folders that are one, or one inside the
    other, in either direction and under any name."""
    found = []
    for (a, pa), (b, pb) in combinations(places.items(), 2):
        if pa.path == pb.path or (pa.exists and pb.exists and pa.chain[0] == pb.chain[0]):
            found.append((b, a, True))  # "done_dir ... is the same folder as drop_dir ..."
        elif pa.path.is_relative_to(pb.path) or (pb.exists and pb.chain[0] in pa.chain):
            found.append((a, b, False))
        elif pb.path.is_relative_to(pa.path) or (pa.exists and pa.chain[0] in pb.chain):
            found.append((b, a, False))
    return found


def overlaps(folders: list[tuple[str, Path]]) -> list[str]:
    """One sentence per pair of folders that are the same or nested, by where they really are:
    the daemon would upload its own output, its journal, or delete what it must keep."""
    given = dict(folders)
    places = {name: place(path) for name, path in folders}

    def show(name: str) -> str:
        real = places[name].path
        return f"{name} {given[name]}" + ("" if real == given[name] else f" (= {real})")

    return [
        f"{show(inner)} is {'the same folder as' if same else 'inside'} {show(outer)}: "
        "drop, done, failed and state folders must be separate, none inside another"
        for inner, outer, same in overlapping(places)
    ]
