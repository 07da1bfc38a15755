"""Local processes under torchrun, the engine of distributed QAT and sharded scoring."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)


def torchrun(module: str, args: list[str], nproc: int) -> int:
    """``python -m module *args`` as ``nproc`` local processes (``--standalone``), one
    thread each unless OMP_NUM_THREADS says otherwise; returns torchrun's exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    log.info(f"    torchrun: {' '.join(cmd[3:])}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(cmd, env=env).returncode
