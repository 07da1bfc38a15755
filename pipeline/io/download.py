"""Files from the network, downloaded once into a cache, verified, never fetched again: the
official RepViT weights, public calibration images (pipeline/io/public_sets.py), and
checkpoints from the Hugging Face hub (``hf-hub:<repo>[@revision]``) through huggingface_hub."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.core.hashing import sha256_file
from pipeline.variants import Variant

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class DownloadUnavailable(RuntimeError):
    """The file could not be had (no network, server error): a user can pass a local one."""


class DownloadCorrupt(RuntimeError):
    """Bytes arrived but do not match what is pinned."""


@dataclass(frozen=True)
class Pins:
    """What a downloaded file is checked against; where no digest is pinned, the sha256 of
    the first download is recorded and later uses are checked against it."""
    size: Optional[int] = None           # bytes
    sha256: Optional[str] = None         # full digest
    sha256_prefix: Optional[str] = None  # a recorded prefix, where only that is known
    md5: Optional[str] = None            # full-file md5, where that is what was published


def cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "repvit-pipeline"


def cache_dir() -> Path:
    """Where official weights are kept."""
    return cache_root() / "weights"


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, pins: Pins, recorded: Optional[str]) -> str:
    """sha256 of ``path`` after checking it against every pin there is."""
    size = path.stat().st_size
    if pins.size is not None and size != pins.size:
        raise DownloadCorrupt(f"{path.name}: {size:,} bytes, expected {pins.size:,} (truncated or wrong file)")
    digest = sha256_file(path)
    expected = pins.sha256 or recorded
    if expected and digest != expected:
        raise DownloadCorrupt(f"{path.name}: sha256 {digest} does not match {expected}")
    if pins.sha256_prefix and not digest.startswith(pins.sha256_prefix):
        raise DownloadCorrupt(f"{path.name}: sha256 {digest} does not start with the recorded "
                              f"prefix {pins.sha256_prefix}")
    md5 = _md5(path) if pins.md5 else None
    if md5 != pins.md5:
        raise DownloadCorrupt(f"{path.name}: md5 {md5} does not match the published {pins.md5}")
    return digest


def _progress(done: int, total: Optional[int], name: str) -> None:
    if not sys.stderr.isatty():
        return
    pct = f"{100 * done / total:5.1f}%" if total else f"{done / 1e6:.1f} MB"
    print(f"\r  downloading {name}: {pct}", end="", file=sys.stderr, flush=True)


def record_path(path: Path) -> Path:
    """Where the sha256 of ``path``'s first download is recorded: ``<file>.sha256`` beside it."""
    return path.with_name(path.name + ".sha256")


def recorded_sha256(path: Path) -> Optional[str]:
    """The sha256 recorded for ``path``, if any."""
    record = record_path(path)
    return record.read_text().strip() if record.exists() else None


def fetch_file(url: str, path: Path, pins: Pins, what: str, instead: str,
               timeout: float = 30.0) -> tuple[Path, str]:
    """``path`` and its sha256, downloading ``url`` there if it is missing or fails its pins.

    The file is written under a temporary name and renamed only once verified, so an
    interrupted download never leaves a file that looks complete. Where no sha256 is
    pinned, the digest of the first download is recorded beside the file
    (``<file>.sha256``) and every later use is checked against it. ``what`` names the file
    in messages; ``instead`` says what a user can do when it cannot be downloaded.
    """
    recorded = recorded_sha256(path)
    if path.exists():
        try:
            return path, _check(path, pins, recorded)
        except DownloadCorrupt as e:
            log.warning(f"cached {what} failed verification ({e}); downloading again")
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                done = 0
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    out.write(chunk)
                    done += len(chunk)
                    _progress(done, total, path.name)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadUnavailable(f"could not download {what} from {url} ({reason}). {instead}") from None
        if sys.stderr.isatty():
            print(file=sys.stderr)
        digest = _check(tmp, pins, recorded)
        os.replace(tmp, path)
        if not pins.sha256 and not recorded:
            record_path(path).write_text(digest + "\n")
        return path, digest
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_official(variant: Variant, url: Optional[str] = None, directory: Optional[Path] = None,
                   timeout: float = 30.0) -> tuple[Path, str]:
    """Path and sha256 of ``variant``'s release checkpoint, downloading it if needed."""
    w = variant.weights
    path = (Path(directory) if directory else cache_dir()) / w.file
    return fetch_file(url or w.url, path, Pins(w.size, w.sha256, w.sha256_prefix), f"{variant.title} weights",
                      f"Pass a local file instead: CKPT=/path/to/{w.file} (make) or --ckpt (CLI), "
                      f"or place the file at {path}; CKPT=random runs on untrained weights.", timeout)


# ---------------------------------------------------------------- the Hugging Face hub

HUB_PREFIX = "hf-hub:"
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")   # timm's, newest first


@dataclass
class HubWeights:
    path: Path
    sha256: str
    repo: str
    revision: str        # what was asked for (a branch, tag or commit)
    config: Optional[dict]   # the repo's config.json (timm: architecture, pretrained_cfg)


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """``hf-hub:<org>/<name>[@revision]`` -> (repo id, revision; default ``main``)."""
    body = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{spec!r}: a hub checkpoint is hf-hub:<org>/<name>[@revision], "
                         "e.g. hf-hub:timm/repvit_m1_1.dist_450e_in1k")
    return repo, revision or "main"


def fetch_hub(spec: str) -> HubWeights:
    """A RepViT checkpoint from the Hugging Face hub through huggingface_hub: its cache
    (downloaded once, reused offline), revision pinning (``@<commit or tag>``), offline
    mode (``HF_HUB_OFFLINE=1``) and tokens (``HF_TOKEN``) all work as that library
    documents. The hub checks each LFS file against its sha256 as it downloads it; the
    digest is recomputed here for the report and the cache key."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision = parse_hub_spec(spec)

    def get(filename: str) -> Optional[Path]:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, library_name="repvit-pipeline"))
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise DownloadUnavailable(f"{spec}: {type(e).__name__}: the hub has no such repository or "
                                     "revision (or it needs a token: set HF_TOKEN)") from None
        except LocalEntryNotFoundError:
            raise DownloadUnavailable(
                f"{spec}: {filename} is not in the local hub cache and the hub cannot be reached "
                "(offline, or HF_HUB_OFFLINE=1). Download it once with network, or pass a local "
                "file: CKPT=/path/to/model.safetensors") from None
        except EntryNotFoundError:
            return None
        except (HfHubHTTPError, OSError) as e:
            raise DownloadUnavailable(f"{spec}: could not download {filename} ({e})") from None

    weights = next((p for p in map(get, HUB_WEIGHT_FILES) if p is not None), None)
    if weights is None:
        raise DownloadUnavailable(f"{spec}: the repository has none of {', '.join(HUB_WEIGHT_FILES)}")
    config_path = get("config.json")
    config = json.loads(config_path.read_text()) if config_path else None
    return HubWeights(weights, sha256_file(weights), repo, revision, config)


def hub_meta(config: Optional[dict]) -> dict:
    """Preprocessing, labels and architecture from a timm ``config.json``."""
    if not config:
        return {}
    cfg = config.get("pretrained_cfg") or {}
    meta = {}
    if cfg.get("input_size"):
        meta["input_size"] = int(cfg["input_size"][-1])
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if cfg.get(key) is not None:
            meta[key] = list(cfg[key]) if isinstance(cfg[key], (list, tuple)) else cfg[key]
    if config.get("label_names"):
        meta["classes"] = list(config["label_names"])
    if config.get("architecture"):
        meta["architecture"] = config["architecture"]
    return meta
