"""sha256 of a file, memoized by its stat (path, size, mtime, inode): a checkpoint is hashed
once per process however many stages ask (the load stage's cache key, then the load)."""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20
_DIGESTS: dict[tuple, str] = {}


def sha256_file(path: str | Path) -> str:
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def sha256_state(model) -> str:
    """sha256 of a module's class and its tensors (names, shapes, dtypes, bytes): equal
    digests, equal models, for reusing work on the same weights within a process. (torch
    is imported here: a warm deploy hashes files without it.)"""
    import torch

    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
