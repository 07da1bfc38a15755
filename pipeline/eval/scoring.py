"""An artifact scored on the scored images in its own runtime: in this process, or sharded
over processes (and machines) with torchrun, the engine QAT's DDP already uses.

A sharded run writes a job folder (``job.json``: format, artifact, preprocessing facts,
the memory-mapped pixels, batch size). Each torchrun rank scores the contiguous slice
that RANK / WORLD_SIZE give it and writes ``scores.<rank>.npy``; the caller concatenates
them in rank order. On several machines the same module runs under a multi-node torchrun
(``torchrun --nnodes=M --node_rank=i ... -m pipeline.eval.scoring <job folder>``) with the job
folder on a shared file system.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.core.torchrun import torchrun


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` rows (sizes differ by at most one)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def predict_all(runtime, pixels: np.ndarray, batch_size: int, progress: Optional[Callable[[int], None]] = None
                ) -> np.ndarray:
    out = []
    for s in range(0, len(pixels), batch_size):
        out.append(runtime.predict(np.asarray(pixels[s:s + batch_size])))
        if progress:
            progress(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def score_shard(job_dir: Path, rank: int, world: int) -> None:
    from pipeline.core.allocator import keep_freed_memory
    from pipeline.runtimes import open_runtime

    keep_freed_memory()
    job = json.loads((Path(job_dir) / "job.json").read_text())
    pixels = np.load(job["pixels"], mmap_mode="r")
    part = shard(len(pixels), rank, world)
    # One thread per process: the processes are the parallelism.
    rt = open_runtime(job["format"], Path(job["artifact"]), job["meta"], threads=1,
                      compile=job.get("compile", False), batch_size=job["batch_size"],
                      simulation=job.get("simulation", "int8"))
    np.save(Path(job_dir) / f"scores.{rank}.npy", predict_all(rt, pixels[part], job["batch_size"]))


def score(fmt: str, artifact: Path, meta: dict, pixels_path: Path, batch_size: int, processes: int,
          job_dir: Path, progress: Optional[Callable[[int], None]] = None, runtime=None,
          compile: bool = False, simulation: str = "int8") -> np.ndarray:
    """Every row of ``pixels_path`` through ``artifact``: in this process (``processes`` 1;
    ``runtime``, the artifact already opened, if given), else under torchrun with
    ``processes`` local processes (``compile``/``simulation``: each process's Core ML simulation)."""
    pixels = np.load(pixels_path, mmap_mode="r")
    if processes <= 1:
        from pipeline.runtimes import open_runtime

        return predict_all(runtime or open_runtime(fmt, artifact, meta, compile=compile, batch_size=batch_size,
                                                   simulation=simulation),
                           pixels, batch_size, progress)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "job.json").write_text(json.dumps({"format": fmt, "artifact": str(artifact), "meta": meta,
                                                  "pixels": str(pixels_path), "batch_size": batch_size,
                                                  "compile": compile, "simulation": simulation}))
    code = torchrun("pipeline.eval.scoring", [str(job_dir)], processes)
    if code != 0:
        raise RuntimeError(f"sharded scoring of {fmt} failed (torchrun exit {code}); run again, "
                           "or set validate.processes: 1")
    scores = np.concatenate([np.load(job_dir / f"scores.{r}.npy") for r in range(processes)])
    if progress:
        progress(len(scores))
    return scores


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: torchrun [...] -m pipeline.eval.scoring <job folder>", file=sys.stderr)
        return 2
    score_shard(Path(argv[0]), int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
