"""A deploy's inputs stamp: one digest of everything that can change what a deploy writes,
computed without importing torch or a converter.

Every stage's cache key is made of its recipe section, the checkpoint's and data folders'
fingerprints, library versions and the pipeline's source (pipeline/core/runner.py). The stamp
covers the same inputs, read more cheaply: the merged recipe as written (its ``extends``
chain and ``--set`` overrides), the checkpoint's and labels' path, size and mtime, the
data folders' listings (pipeline/io/listing.py), every file of the pipeline package, and the
names (with versions) of every installed distribution. The published report records the
stamp of the run that wrote it; a deploy whose stamp matches has nothing to do, and
returns without importing torch (about 1.7 s here) or asking each stage for its key.

Where an input cannot be fingerprinted without the work itself (official weights or a
public calibration set not yet downloaded, a Hugging Face branch that may have moved) there is no stamp: the stages run
as usual, each cached by its own key.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from pipeline.core.config import apply_sets, load_layers
from pipeline.io.download import HUB_PREFIX, cache_dir
from pipeline.io.listing import fingerprint_folder
from pipeline.io.public_sets import extracted, wanted
from pipeline.resources import RESOURCES
from pipeline.variants import get_variant

PACKAGE = RESOURCES.parent


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def source_digest() -> str:
    """Every file of the pipeline package (code, resources), by relative path and content."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(PACKAGE)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def installed() -> list[str]:
    """The installed distributions, from their metadata folders' names (name-version)."""
    names = set()
    for entry in sys.path:
        if os.path.isdir(entry):
            names.update(n for n in os.listdir(entry) if n.endswith((".dist-info", ".egg-info")))
    return sorted(names)


def inputs_stamp(recipe: Path, sets: list[str]) -> Optional[dict]:
    """``{"digest", "variant", "quant"}`` of a deploy of ``recipe`` with ``sets``, or None where
    an input cannot be fingerprinted before running (see the module docstring)."""
    data, origins = load_layers(recipe)
    data = apply_sets(data, origins, list(sets))
    load, folders = data.get("load") or {}, data.get("data") or {}
    variant = get_variant(str(load.get("variant", "m0.9")))
    checkpoint = str(load.get("checkpoint", "official"))
    files = {}
    if checkpoint == "official":
        weights = cache_dir() / variant.weights.file
        if not weights.is_file():
            return None      # the run tries to download them (an untrained fallback is not final)
        files["checkpoint"] = _stat(weights)
    elif checkpoint.startswith(HUB_PREFIX):
        return None          # a branch or tag may point to new weights
    elif checkpoint != "random":
        files["checkpoint"] = _stat(Path(checkpoint))
    if load.get("labels"):
        files["labels"] = _stat(Path(load["labels"]))
    calib = folders.get("calib")
    public = wanted(calib, folders.get("eval"), folders.get("public_calib"), checkpoint)
    if public:
        folder = extracted(public)
        if folder is None:
            return None      # the run downloads it (or, as a default, falls back to sample photos)
        calib = str(folder)
    payload = {"recipe": data, "files": files,
               "folders": {"eval": fingerprint_folder(folders.get("eval")), "calib": fingerprint_folder(calib)},
               "source": source_digest(), "installed": installed(), "python": sys.version}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return {"digest": digest, "variant": variant.name, "quant": str(data.get("quant", "fp32"))}
