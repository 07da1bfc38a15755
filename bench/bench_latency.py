"""Host latency of the shipped artifacts (int8 and fp16 vs fp32), batch 1, each pair
measured alternating in one process (these machines are noisy: only ratios in one run mean
anything); how each int8 artifact executes (LiteRT delegate partitions and the ops left
outside XNNPACK; onnxruntime's ops in float between DequantizeLinear and QuantizeLinear;
OpenVINO's layers by runtime precision; ExecuTorch's delegate partitions), onnxruntime's
per-op time split from its profiler and OpenVINO's per-layer split from its performance
counters; onnxruntime int8 with ``export.onnx.gelu: sigmoid``, OpenVINO int8 against
onnxruntime int8, and the ExecuTorch XNNPACK int8 .pte against the int8 .tflite (both
XNNPACK). Also the wall time of `make deploy` cold and warm.

The weights are the seeded untrained ones of `CKPT=random`, with BatchNorm statistics
randomized so that every layer is active (pipeline/models/init.py): speed as with trained
weights, accuracy meaningless."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import latency_artifacts  # noqa: E402
from pipeline.app.report import execution_line  # noqa: E402
from pipeline.eval.timing import alternate_latency, cpu_name  # noqa: E402
from pipeline.formats.tflite import execution as tflite_execution  # noqa: E402
from pipeline.runtimes import open_runtime  # noqa: E402
from pipeline.runtimes.ort import INPUT, OnnxRuntime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class SpinningOnnx(OnnxRuntime):
    """onnxruntime with its default thread spinning (the pipeline turns it off: on a
    shared 2-core machine the spinning threads of one session slow the other, so these
    rows are timed in blocks, one session at a time, not run by run)."""

    def __init__(self, path: Path, meta: dict, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = threads, 3
        self.sessions = [ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])]
        self.meta = meta


def blocked_latency(runtimes: list, pixels, runs: int, block: int = 20) -> list[float]:
    """Medians of each runtime timed alone in blocks of ``block`` runs, blocks alternating
    (3 warm-up calls before each block let the other session's threads go to sleep)."""
    import statistics

    from pipeline.eval.timing import time_calls

    calls = [rt.invoker(pixels) for rt in runtimes]
    times = [[] for _ in runtimes]
    for _ in range(max(1, runs // block)):
        for call, t in zip(calls, times):
            t.extend(time_calls([call], 3, block)[0])
    return [statistics.median(t) for t in times]


def onnx_op_split(path: Path, meta: dict, pixel, threads: int, warmup: int = 5,
                  runs: int = 20) -> dict[str, float]:
    """Milliseconds per run by op type, from onnxruntime's profiler."""
    import onnxruntime as ort

    from pipeline.io.data import normalized

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = threads, 3
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "profile")
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = normalized(pixel, meta)
        for _ in range(warmup + runs):
            sess.run(None, {INPUT: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    events = [e for e in events if e["ts"] >= starts[warmup]]   # warm-up runs left out
    split: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            split[op] = split.get(op, 0.0) + e["dur"] / runs / 1e3
    return split


def openvino_layer_split(path: Path, meta: dict, pixel, threads: int, warmup: int = 10,
                         runs: int = 30) -> dict[str, float]:
    """Milliseconds per run by layer type and the precision its kernel ran in (``Convolution
    i8``), from OpenVINO's per-layer performance counters (``PERF_COUNT``), at the inference
    precision the IR names; the key ``(outside layers)`` is the call's wall time the
    counters do not cover."""
    from pipeline.runtimes.openvino import OpenVINORuntime

    runtime = OpenVINORuntime(path, meta, threads, properties={"PERF_COUNT": True})
    call = runtime.invoker(pixel)
    split: dict[str, float] = {}
    for i in range(warmup + runs):
        start = time.perf_counter()
        call()
        wall = (time.perf_counter() - start) * 1e3
        if i < warmup:
            continue
        for p in runtime.request.get_profiling_info():
            if p.status == p.Status.EXECUTED:
                key = f"{p.node_type} {p.exec_type.rsplit('_', 1)[-1].lower()}"
                ms = p.real_time.total_seconds() * 1e3
                split[key] = split.get(key, 0.0) + ms / runs
                wall -= ms
        split["(outside layers)"] = split.get("(outside layers)", 0.0) + wall / runs
    return split


def print_split(name: str, split: dict[str, float], top: int = 7) -> None:
    total = sum(split.values())
    parts = ", ".join(f"{k} {v:.2f} ({100 * v / total:.0f}%)"
                      for k, v in sorted(split.items(), key=lambda kv: -kv[1])[:top])
    print(f"  {name}: total {total:.2f} ms: {parts}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", default="m0.9")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", nargs="+", default=["onnx", "tflite", "openvino", "executorch"])
    ap.add_argument("--no-deploy-timing", action="store_true")
    args = ap.parse_args()
    reports, path_of, meta, pixel = latency_artifacts(args.variant, ("fp32", "fp16", "int8"), tuple(args.formats))
    if "onnx" in args.formats:   # export.onnx.gelu: sigmoid, an int8 artifact of its own
        _, sigmoid_path, _, _ = latency_artifacts(args.variant, ("int8",), ("onnx",), ("export.onnx.gelu=sigmoid",),
                                                  "bench-latency-gelu-sigmoid")

    def has(scheme: str, fmt: str) -> bool:
        return any(a["format"] == fmt and a.get("path") for a in reports[scheme][0]["artifacts"])

    print(f"measured: {cpu_name()}, RepViT-{args.variant.upper()} (untrained weights, BatchNorm "
          f"randomized: speed only), {meta['input_size']}px, batch 1, {args.runs} alternating runs "
          "per pair (spinning rows: blocks of 20), medians of the runtime's own call (input "
          "already converted)")
    print(f"{'runtime':22} {'threads':>7} {'scheme':6} {'ms':>7} {'fp32 ms':>8} {'ratio':>6}")
    rows = [("onnxruntime", "onnx", None), ("onnxruntime, spinning", "onnx", SpinningOnnx),
            ("LiteRT", "tflite", None), ("OpenVINO (f32 / int8)", "openvino", None),
            ("ExecuTorch (XNNPACK)", "executorch", None)]
    for label, fmt, runtime in [r for r in rows if r[1] in args.formats]:
        for threads in args.threads:
            for q in [q for q in ("fp16", "int8") if has(q, fmt)]:
                make = runtime or (lambda p, m, t, f=fmt: open_runtime(f, p, m, t))
                timer = blocked_latency if runtime else alternate_latency
                t32, tq = timer([make(path_of("fp32", fmt), meta, threads),
                                 make(path_of(q, fmt), meta, threads)], pixel, runs=args.runs)
                print(f"{label:22} {threads:>7} {q:6} {tq:7.2f} {t32:8.2f} {tq / t32:6.2f}")
    if "onnx" in args.formats:
        print("\nonnxruntime int8 with export.onnx.gelu: sigmoid (x * sigmoid(1.702 x)) against fp32 "
              "and against exact-GELU int8, alternating in one run:")
        for threads in args.threads:
            t32, tq, tsig = alternate_latency([open_runtime("onnx", p, meta, threads) for p in (
                path_of("fp32", "onnx"), path_of("int8", "onnx"), sigmoid_path("int8", "onnx"))], pixel, runs=args.runs)
            print(f"  {threads} thread(s): fp32 {t32:.2f} ms, int8 exact GELU {tq:.2f} ms ({tq / t32:.2f}), "
                  f"int8 sigmoid GELU {tsig:.2f} ms ({tsig / t32:.2f})")
    pairs = [(("executorch", "ExecuTorch"), ("tflite", "LiteRT"), "int8 on XNNPACK, ExecuTorch's .pte against LiteRT's .tflite"),
             (("openvino", "OpenVINO"), ("onnx", "onnxruntime"), "int8 across runtimes, the same model")]
    for (fa, na), (fb, nb), title in pairs:
        if {fa, fb} <= set(args.formats):
            print(f"\n{title}, alternating in one run:")
            for threads in args.threads:
                ta, tb = alternate_latency([open_runtime(f, path_of("int8", f), meta, threads) for f in (fa, fb)],
                                           pixel, runs=args.runs)
                print(f"  {threads} thread(s): {na} {ta:.2f} ms, {nb} {tb:.2f} ms ({na} / {nb} {ta / tb:.2f})")

    print("\nhow the int8 artifacts execute:")
    if "tflite" in args.formats:
        print(f"  tflite: {execution_line(tflite_execution(path_of('int8', 'tflite')))[0]}")
    for a in reports["int8"][0]["artifacts"]:
        if a["format"] != "tflite" and a["export"].get("execution"):
            print(f"  {a['format']}: {execution_line(a['export']['execution'])[0]}")
    print("  LiteRT per-op times: not available from LiteRT's Python API (the XNNPACK partition is "
          "one node); TFLite's benchmark_model --enable_op_profiling=true gives them on a device.")

    print("\nonnxruntime per-op time split (its profiler, ms per run):")
    for threads in args.threads if "onnx" in args.formats else ():
        for scheme in ("fp32", "int8"):
            print_split(f"{scheme} {threads} thread(s)", onnx_op_split(path_of(scheme, "onnx"), meta, pixel, threads))
    print("\nOpenVINO per-layer time split (its performance counters, ms per run, layer type and "
          "the precision its kernel ran in):")
    for threads in args.threads if "openvino" in args.formats else ():
        for scheme in ("fp32", "int8"):
            print_split(f"{scheme} {threads} thread(s)",
                        openvino_layer_split(path_of(scheme, "openvino"), meta, pixel, threads))

    if args.no_deploy_timing:
        return
    # make deploy wall time, cold (fresh cache) and warm (everything cached)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["make", "-s", "deploy", f"PY={sys.executable}", f"VARIANT={args.variant}", "QUANT=int8",
               "CKPT=random", f"ARTIFACTS={tmp}"]
        times = []
        for _ in range(2):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
    print(f"\nmake deploy VARIANT={args.variant} QUANT=int8: cold {times[0]:.1f} s, warm {times[1]:.2f} s "
          f"(measured wall time, this machine)")


if __name__ == "__main__":
    main()
