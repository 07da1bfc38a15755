"""Public calibration images for deploys that bring none of their own: a small ImageNet-style
set, downloaded once, verified like the weights, extracted into the cache.

Imported before torch (the inputs stamp asks where a set is): standard library only.

Pins: the archives' full-file md5 is the one torchvision's ``Imagenette`` dataset verifies
(torchvision 0.17+); the byte sizes are fastai's ``checks.txt`` records of the same files.
No sha256 is published: the first download's is recorded and reported.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.io.download import (HUB_PREFIX, DownloadCorrupt, Pins, cache_root, fetch_file, record_path,
                                  recorded_sha256)


@dataclass(frozen=True)
class PublicSet:
    name: str
    url: str
    pins: Pins
    images: str           # the folder of the archive that is used: one sub-folder per ImageNet wnid
    about: str


IMAGENETTE = ("Imagenette (fast.ai): the training split of 10 ImageNet-1k classes (tench, English "
              "springer, cassette player, chain saw, church, French horn, garbage truck, gas pump, golf "
              "ball, parachute), 9,469 photos; ImageNet's images, under ImageNet's terms of access")

PUBLIC_SETS: dict[str, PublicSet] = {s.name: s for s in [
    PublicSet("imagenette-320", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
              Pins(size=341_663_724, md5="3df6f0d01a2c9592104656642f5e78a3"),
              "imagenette2-320/train", IMAGENETTE + ", shorter side 320 px"),
    PublicSet("imagenette-160", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
              Pins(size=99_003_388, md5="e793b78cc4c9e9a4ccc0c1155377a412"),
              "imagenette2-160/train", IMAGENETTE + ", shorter side 160 px (for inputs of at "
              "most 152 px at crop 0.95: larger inputs would be upscaled)"),
]}


def sets_dir() -> Path:
    return cache_root() / "calibration"


def folder_of(name: str, directory: Optional[Path] = None) -> Path:
    """Where ``name``'s images are extracted (whole or not at all)."""
    return (Path(directory) if directory else sets_dir()) / name


def extracted(name: str, directory: Optional[Path] = None) -> Optional[Path]:
    folder = folder_of(name, directory)
    return folder if folder.is_dir() else None


def name_of(folder: str | Path) -> Optional[str]:
    """The public set whose extracted folder ``folder`` is, if it is one."""
    folder = Path(folder)
    return folder.name if folder.name in PUBLIC_SETS and folder.parent == sets_dir() else None


def wanted(calib: Optional[str], eval_: Optional[str], public_calib: Optional[str],
           checkpoint: str) -> Optional[str]:
    """The public set a deploy calibrates on: CALIB when it names one; otherwise
    ``data.public_calib`` for official or hub weights when neither CALIB nor DATA gives
    images (a user's own checkpoint comes with its own data; ``random`` needs none)."""
    if calib:
        return calib if calib in PUBLIC_SETS else None
    if eval_ or not public_calib:
        return None
    return public_calib if checkpoint == "official" or checkpoint.startswith(HUB_PREFIX) else None


def fetch_public_set(name: str, url: Optional[str] = None, directory: Optional[Path] = None,
                     timeout: float = 30.0) -> Path:
    """The folder of ``name``'s images (one sub-folder per wnid), downloading and extracting
    the archive the first time. The archive is verified (size, md5; its sha256 recorded),
    only its ``images`` folder is extracted (tar's ``data`` filter: no links out, no absolute
    paths), into a temporary folder renamed into place, then the archive is deleted (an
    interrupted extraction keeps it, verified, for the next run)."""
    s = PUBLIC_SETS[name]
    folder = folder_of(name, directory)
    if folder.is_dir():
        return folder
    archive = folder.parent / Path(s.url).name
    fetch_file(url or s.url, archive, s.pins, f"the public calibration set {name}",
               f"Pass your own images instead: CALIB=<folder of training images>, or set "
               f"data.public_calib=null to calibrate on natural sample photos (docs/calibration.md: what that costs); "
               f"or place the archive at {archive}.", timeout)
    digest = recorded_sha256(archive)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        prefix = s.images.rstrip("/") + "/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)]
            if not members:
                raise DownloadCorrupt(f"{archive.name} has no {s.images}/ folder: not the {name} archive")
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():   # else a concurrent deploy put the same set in place first
                raise
    except (tarfile.TarError, DownloadCorrupt) as e:
        _discard(archive)   # refused: fetched afresh next time
        raise e if isinstance(e, DownloadCorrupt) else DownloadCorrupt(
            f"{archive.name} is not a readable tar.gz ({e})") from None
    finally:
        # An interrupted extraction keeps the verified archive: the next run extracts it again.
        if tmp.exists():
            shutil.rmtree(tmp)
    if digest:   # the archive's, recorded beside the folder it became
        record_path(folder).write_text(digest + "\n")
    _discard(archive)
    return folder


def _discard(archive: Path) -> None:
    for f in (archive, record_path(archive)):
        f.unlink(missing_ok=True)


def archive_sha256(name: str, directory: Optional[Path] = None) -> Optional[str]:
    return recorded_sha256(folder_of(name, directory))
