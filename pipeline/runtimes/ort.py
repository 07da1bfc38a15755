"""onnxruntime: the .onnx artifact as an app on any CPU runs it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io.data import normalized

INPUT = "input"   # the input's name in every .onnx the pipeline writes


class OnnxRuntime:
    """``lanes`` > 1: that many one-thread sessions in place of one ``threads``-thread
    session, and ``predict`` splits each batch over them, run side by side. onnxruntime runs
    some ops between its int8 convolutions on one thread (DequantizeLinear, QLinearMul: its
    profiler, m0.9), so a batch of 16 scored 221 images/s on two one-thread sessions against
    196 on one two-thread session (six runs each, medians; identical logits). ``invoker``
    (latency, one image) runs the first session: time latency on a runtime without lanes."""
    method, outputs = "measured", "logits"

    def __init__(self, path: Path, meta: dict, threads: int = 1, lanes: int = 1):
        import onnxruntime as ort

        self.sessions = [session(path, 1) for _ in range(lanes)] if lanes > 1 else [session(path, threads)]
        self.meta = meta
        self.name = f"onnxruntime {ort.__version__} CPU" + (f" ({lanes} one-thread sessions)" if lanes > 1 else "")

    def predict(self, pixels):
        x = normalized(pixels, self.meta)
        parts = np.array_split(x, max(1, min(len(self.sessions), len(x))))
        if len(parts) == 1:
            return self.sessions[0].run(None, {"input": x})[0]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(parts)) as pool:   # onnxruntime lets go of the GIL while it runs
            return np.concatenate(list(pool.map(lambda sp: sp[0].run(None, {"input": sp[1]})[0],
                                                zip(self.sessions, parts))))

    def invoker(self, pixels):
        feed = {"input": normalized(pixels, self.meta)}
        return lambda: self.sessions[0].run(None, feed)


def session(path: Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Spinning threads made 2 threads 3-4x slower than 1 on shared 2-core machines.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path)
    return np.concatenate([sess.run(None, {INPUT: x[i:i + 16]})[0] for i in range(0, len(x), 16)])
