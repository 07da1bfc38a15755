"""Cold `make deploy` (and optionally `make compare`) wall time and peak memory, against an
older revision of the pipeline measured in the same run (these machines are noisy: only
the ratio of one run means much).

Each run is a fresh process with a fresh cache and HOME (nothing cached: no weights, no
network, so the untrained fallback as a new user gets it offline), m0.9, int8, 224 px,
the three formats. The older revision is checked out with `git worktree` into a temporary
folder and run with this checkout's virtual environment. Runs alternate: base, this, base,
this. Peak RSS is the largest of the deploy's processes (getrusage of the children).
Per-stage seconds come from each report.json.

    python bench/bench_deploy_time.py                 # against d94366f, 1 round
    python bench/bench_deploy_time.py --base HEAD~3 --rounds 2 --compare
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, command: list[str], artifacts: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of ``python -m pipeline <command>`` in ``tree``."""
    home = artifacts / "home"
    home.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor")}
    cmd = [sys.executable, "-m", "pipeline", *command, "--ckpt", "official", "--artifacts", str(artifacts)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {tree} failed:\n{err[-3000:]}")
    import resource

    # The largest RSS of any process this one waited for: measured() gives each run a
    # wrapper process of its own, so this is that run's peak.
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024


def measured(tree: Path, command: list[str]) -> dict:
    """One cold run in a child process of its own (so its peak RSS is its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        code = ("import json, sys; sys.path.insert(0, %r); from bench_deploy_time import run; "
                "from pathlib import Path; s, gb = run(Path(%r), %r, Path(%r)); "
                "json.dump({'seconds': s, 'peak_gb': gb}, open(%r, 'w'))"
                % (str(ROOT / "bench"), str(tree), command, str(Path(tmp) / "artifacts"), str(out)))
        subprocess.run([sys.executable, "-c", code], check=True)
        result = json.loads(out.read_text())
        reports = sorted((Path(tmp) / "artifacts").glob("*/report.json"))
        if reports and command[0] == "deploy":
            rep = json.loads(reports[0].read_text())
            result["stages"] = {s["name"]: s["seconds"] for s in rep["stages"]}
        return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="d94366f", help="revision to measure against")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--compare", action="store_true", help="also a cold `make compare` with the default QUANTS")
    args = ap.parse_args()
    commands = {"deploy": ["deploy", "--variant", "m0.9", "--quant", "int8"]}
    if args.compare:
        commands["compare"] = ["compare", "--variant", "m0.9",
                               *sum((["--quant", q] for q in ("fp32", "fp16", "int8", "w8", "pal6", "pal4")), [])]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            results = {name: {"base": [], "this": []} for name in commands}
            for r in range(args.rounds):
                for name, command in commands.items():
                    for label, tree in (("base", base), ("this", ROOT)):
                        res = measured(tree, command)
                        results[name][label].append(res)
                        print(f"  round {r + 1} {name:7} {label}: {res['seconds']:6.1f} s, "
                              f"peak RSS {res['peak_gb']:.2f} GB", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\nmeasured: cold runs, nothing cached, {os.cpu_count()} cores ({cpu}), base {args.base}, "
          f"{args.rounds} round(s), medians")
    import statistics

    for name, by in results.items():
        b = statistics.median(x["seconds"] for x in by["base"])
        t = statistics.median(x["seconds"] for x in by["this"])
        print(f"  {name:7} base {b:6.1f} s, this {t:6.1f} s: ratio {t / b:.2f}; peak RSS base "
              f"{max(x['peak_gb'] for x in by['base']):.2f} GB, this {max(x['peak_gb'] for x in by['this']):.2f} GB")
        for label in ("base", "this"):
            stages = by[label][-1].get("stages")
            if stages:
                print(f"    {label} stages: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
