"""keep_freed_memory: large blocks come from the heap, which keeps freed pages mapped,
instead of fresh mmaps that the kernel faults in again for every tensor."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Where a 16 MB block lands: below the program break (the heap) or not (its own mmap).
PROBE = """
import ctypes, sys
sys.path.insert(0, sys.argv[2])
from pipeline.core.allocator import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_ssize_t]
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()   # once per process; again is a no-op
block = libc.malloc(16 << 20)
print("heap" if block < libc.sbrk(0) else "mmap")
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("mode, where", [("default", "mmap"), ("keep", "heap")])
def test_large_blocks_come_from_the_heap(mode, where):
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == where
