"""Fused vs unfused RepViT latency on this CPU, batch 1, measured alternating in one
process (these machines are noisy: only the ratio is meaningful). Prints a table."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.eval.timing import cpu_name
from pipeline.models import create_model, reparameterize


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", nargs="+", default=["m0.9", "m1.5"])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"measured: PyTorch {torch.__version__} eager, {cpu_name()}, {args.threads} thread(s), "
          f"batch 1, 224x224, {args.runs} alternating runs after warm-up")
    print(f"{'variant':8} {'unfused ms':>11} {'fused ms':>9} {'fused/unfused':>14}")
    for name in args.variants:
        model = create_model(name, seed=0).eval()
        fused = reparameterize(model)
        x = torch.randn(1, 3, 224, 224)
        for m in (model, fused, model, fused):
            m(x)
        times = {"unfused": [], "fused": []}
        for _ in range(args.runs):
            for key, m in (("unfused", model), ("fused", fused)):
                t = time.perf_counter()
                m(x)
                times[key].append((time.perf_counter() - t) * 1e3)
        u, f = statistics.median(times["unfused"]), statistics.median(times["fused"])
        print(f"{name:8} {u:>11.2f} {f:>9.2f} {f / u:>14.2f}")


if __name__ == "__main__":
    main()
