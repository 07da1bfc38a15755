"""Host timing: one latency loop, scoring throughput, and the CPU it ran on."""
from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_throughput(images: int, seconds: float, runtime: str, batch_size: int) -> dict:
    """Scoring speed as measured (wall clock of the scoring loop alone: no runtime
    loading, no latency timing), what ImageNet-scale estimates scale by."""
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds else None,
            "method": "measured", "details": f"{runtime}, batch {batch_size}, {cpu_name()}, {os.cpu_count()} cores"}


def time_calls(calls: list, warmup: int, runs: int) -> list[list[float]]:
    """Milliseconds of each of ``calls`` (one inference each, input already converted),
    ``runs`` times, the calls taking turns run by run after ``warmup`` rounds: a noisy
    machine slows them alike, so only the ratios of one call mean much. The one latency
    loop of the pipeline (validation, the accuracy-aware pass, the benches)."""
    for _ in range(warmup):
        for call in calls:
            call()
    times = [[] for _ in calls]
    for _ in range(runs):
        for call, t in zip(calls, times):
            start = time.perf_counter()
            call()
            t.append((time.perf_counter() - start) * 1e3)
    return times


def measure_latency(call, warmup: int, runs: int) -> dict:
    """Median and p90 milliseconds of ``call()``."""
    (times,) = time_calls([call], warmup, runs)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}


def alternate_latency(runtimes: list, pixels: np.ndarray, warmup: int = 10, runs: int = 50) -> list[float]:
    """Median milliseconds of one inference on ``pixels`` for each runtime (its
    ``invoker``), the runtimes taking turns run by run (``time_calls``)."""
    return [statistics.median(t) for t in time_calls([rt.invoker(pixels) for rt in runtimes], warmup, runs)]
