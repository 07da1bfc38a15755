"""Image files under a folder, and a cache key for a folder from its listing alone.

Imports nothing heavy (no numpy, Pillow or torch): a warm ``make deploy`` fingerprints
DATA / CALIB with it before deciding whether anything must run (pipeline/app/stamp.py).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def walk_images(d: str) -> Iterator[os.DirEntry]:
    """Image files under ``d`` (recursively), as directory entries: os.scandir reads names and
    types in one system call per folder, where Path.rglob + is_file stats every file."""
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir():
                yield from walk_images(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file():
                yield e


_FINGERPRINTS: dict[str, tuple[tuple, str]] = {}   # folder -> (its folders' mtimes, fingerprint)


def forget_listings() -> None:
    """A new run: list data folders again (an image edited in place changes no folder mtime)."""
    _FINGERPRINTS.clear()


def fingerprint_folder(path: Optional[str]) -> Optional[str]:
    """A cache key for a data folder: every image's relative path, size and mtime (an image
    edited in place gets a new mtime), without reading the images: 60,000 files take 0.3 s
    here. Memoized until :func:`forget_listings` (each deploy starts with it) and while the
    folders' own mtimes hold (they change when a file is added, removed or renamed): the
    stages of one run list a folder once."""
    if not path:
        return None
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}. Pass DATA=<folder of class folders>.")
    folders = [root, *sorted(Path(e.path) for e in os.scandir(root) if e.is_dir())]
    state = tuple((str(f), f.stat().st_mtime_ns) for f in folders)
    known = _FINGERPRINTS.get(str(root.resolve()))
    if known and known[0] == state:
        return known[1]
    cut = len(str(root)) + 1   # relative paths by slicing: os.path.relpath costs more than the stat
    rows = []
    for e in walk_images(str(root)):
        st = e.stat()
        rows.append(f"{e.path[cut:]}|{st.st_size}|{st.st_mtime_ns}\n")
    rows.sort()
    h = hashlib.sha256("".join(rows).encode())
    _FINGERPRINTS[str(root.resolve())] = (state, h.hexdigest())
    return h.hexdigest()
