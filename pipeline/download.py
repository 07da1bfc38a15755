"""Official RepViT weights: downloaded once into a cache, verified, never fetched again."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .variants import Variant, Weights

CHUNK = 1 << 20


class WeightsUnavailable(RuntimeError):
    """The weights could not be had (no network, server error): a user can pass a file."""


class WeightsCorrupt(RuntimeError):
    """Bytes arrived but do not match what is pinned."""


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "repvit-pipeline" / "weights"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, w: Weights, recorded: Optional[str]) -> str:
    """sha256 of ``path`` after checking it against every pin there is."""
    size = path.stat().st_size
    if w.size is not None and size != w.size:
        raise WeightsCorrupt(f"{path.name}: {size:,} bytes, expected {w.size:,} (truncated or wrong file)")
    digest = sha256_file(path)
    expected = w.sha256 or recorded
    if expected and digest != expected:
        raise WeightsCorrupt(f"{path.name}: sha256 {digest} does not match {expected}")
    if w.sha256_prefix and not digest.startswith(w.sha256_prefix):
        raise WeightsCorrupt(f"{path.name}: sha256 {digest} does not start with the recorded "
                             f"prefix {w.sha256_prefix}")
    return digest


def _progress(done: int, total: Optional[int], name: str) -> None:
    if not sys.stderr.isatty():
        return
    pct = f"{100 * done / total:5.1f}%" if total else f"{done / 1e6:.1f} MB"
    print(f"\r  downloading {name}: {pct}", end="", file=sys.stderr, flush=True)


def fetch_official(variant: Variant, url: Optional[str] = None, directory: Optional[Path] = None,
                   timeout: float = 30.0) -> tuple[Path, str]:
    """Path and sha256 of ``variant``'s release checkpoint, downloading it if needed.

    The file is written under a temporary name and renamed only once verified, so an
    interrupted download never leaves a file that looks complete. Where no checksum is
    pinned, the digest of the first download is recorded beside the file
    (``<file>.sha256``) and every later use is checked against it.
    """
    w = variant.weights
    directory = Path(directory) if directory else cache_dir()
    path, record = directory / w.file, directory / (w.file + ".sha256")
    recorded = record.read_text().strip() if record.exists() else None
    if path.exists():
        try:
            return path, _check(path, w, recorded)
        except WeightsCorrupt as e:
            print(f"warning: cached weights failed verification ({e}); downloading again",
                  file=sys.stderr)
            path.unlink()
    url = url or w.url
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=w.file + ".", suffix=".part", dir=directory)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                done = 0
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    out.write(chunk)
                    done += len(chunk)
                    _progress(done, total, w.file)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise WeightsUnavailable(
                f"could not download {variant.title} weights from {url} ({reason}). "
                f"Pass a local file instead: CKPT=/path/to/{w.file} (make) or --ckpt (CLI), "
                f"or place the file at {path}; CKPT=random runs on untrained weights.") from None
        if sys.stderr.isatty():
            print(file=sys.stderr)
        digest = _check(tmp, w, recorded)
        os.replace(tmp, path)
        if not w.sha256 and not recorded:
            record.write_text(digest + "\n")
        return path, digest
    finally:
        if tmp.exists():
            tmp.unlink()
