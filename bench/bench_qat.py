"""Does quantization-aware training recover what post-training int8 loses? Measured on the
trained reference (../shared/data/reference: RepViT-M0.9, CIFAR-10, 64x64; ``--checkpoint`` for another, e.g. bench/make_second_reference.py's).

Both runs go through the pipeline itself with the accuracy-aware pass off
(``quantize.max_drop=null``), so the rows compare PTQ and QAT int8 alone: the same
calibration images, the same per-format int8 tools, QAT trained on CIFAR-10 training
images and everything scored on test images. Goals (issue: faithful int8): QAT agrees
with float on at least 99% of test images in every format, within 0.1 top-1 points of
float; the older one, QAT recovers at least half of the PTQ drop, is printed too. Never fails on a miss: it reports it.

QAT at training scale needs a GPU; the rest runs anywhere. So the two halves can run on
different machines: ``--train-only DIR`` (on the GPU machine) runs load, reparam and qat
and writes the QAT models and their facts to DIR; ``--qat-models DIR`` (here) scores those
models instead of training, through the same quantize, export and validate stages. The
imported models' sha256 digests are part of the qat stage's cache key."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import (ROOT, add_checkpoint_option, disagreements_by_margin, model_title,  # noqa: E402
                          reference_run, require_shared)
from pipeline.app.deploy import RunOptions, deploy, resolve_recipe  # noqa: E402
from pipeline.core.hashing import sha256_file  # noqa: E402


def goal_met(ptq_drop: float, qat_drop: float) -> str:
    if ptq_drop <= 0.1:
        return "yes (PTQ already within 0.1)" if qat_drop <= 0.1 else "NO (worse than PTQ)"
    recovered = (ptq_drop - qat_drop) / ptq_drop
    ok = recovered >= 0.5 and qat_drop <= 0.1
    return f"{'yes' if ok else 'NO'} (recovered {100 * recovered:.0f}%)"


def train_only(opts: RunOptions, out: Path) -> None:
    """Run the recipe's stages up to qat; copy the QAT models and facts to ``out``."""
    from pipeline.core.runner import Cache, facts_of, run_stages
    from pipeline.app.plan import plan

    recipe = resolve_recipe(opts)
    records = run_stages(plan(["load", "reparam", "qat"], recipe.sections), recipe.sections,
                         Cache(opts.artifacts / "cache"))
    out.mkdir(parents=True, exist_ok=True)
    for model in sorted(records["qat"].dir.glob("model.*.pt")):
        shutil.copy(model, out / model.name)
    (out / "facts.json").write_text(json.dumps(facts_of(records["qat"].dir), indent=1))


def import_qat_models(folder: Path) -> None:
    """Make the qat stage copy the models in ``folder`` (``--train-only``'s output) instead
    of training; their digests key its cache entries."""
    from pipeline import stages

    models = sorted(folder.glob("model.*.pt"))
    if not models:
        raise SystemExit(f"--qat-models {folder}: no model.<format>.pt files there")
    digests = {m.name: sha256_file(m) for m in models}
    facts = json.loads((folder / "facts.json").read_text())

    def run(cfg, inputs, out_dir, data, scratch, coreml=None):
        missing = [f for f in cfg.formats if f"model.{f}.pt" not in digests]
        if missing:
            raise SystemExit(f"--qat-models {folder}: no model for {', '.join(missing)}")
        for f in cfg.formats:
            shutil.copy(folder / f"model.{f}.pt", out_dir / f"model.{f}.pt")
        return {**facts, "imported_from": str(folder)}

    stages.STAGES["qat"] = dataclasses.replace(
        stages.STAGES["qat"], run=run, fingerprint=lambda cfg, **_: {"imported": digests})


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eval-images", type=int, default=10000)
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides for QAT, e.g. qat.steps=600")
    ap.add_argument("--train-only", type=Path, metavar="DIR",
                    help="run QAT alone (e.g. on a GPU machine) and write its models and facts to DIR")
    ap.add_argument("--qat-models", type=Path, metavar="DIR",
                    help="score the QAT models in DIR (written by --train-only) instead of training")
    add_checkpoint_option(ap)
    args = ap.parse_args()
    require_shared()
    common = ("validate.latency_runs=5", f"data.eval_images={args.eval_images}", "quantize.max_drop=null")
    ptq_run = reference_run("int8", list(common), "bench", checkpoint=args.checkpoint)
    qat_run = dataclasses.replace(ptq_run, quant="qat-int8", sets=common + tuple(args.set))
    if args.train_only:
        train_only(qat_run, args.train_only)
        return
    ptq, _ = deploy(ptq_run)
    if args.qat_models:   # its own folder; forced: the published-report shortcut cannot see the models
        import_qat_models(args.qat_models.resolve())
        qat_run = dataclasses.replace(qat_run, artifacts=ROOT / "artifacts" / "bench-imported-qat",
                                      force=("qat",))
    qat, _ = deploy(qat_run)
    ref = ptq["reference"]["accuracy"]
    print(f"\n{model_title(ptq)}, CIFAR-10, {ref['n']} test images; float PyTorch top-1 "
          f"{100 * ref['top1']:.2f}% (measured). Core ML rows are simulated (MIL interpreter: int8 x "
          "int8 convs, fp16 elsewhere); ONNX and TFLite rows are measured in onnxruntime / LiteRT.")
    qat_stage = qat["qat"]
    for backend, t in qat_stage["trained"].items():
        print(f"QAT {backend} ({', '.join(t['formats'])}): {t['steps']} steps on {t['device']} x "
              f"{t['world_size']}, held-out agreement with float (fake-quant, simulated) "
              f"{100 * t['holdout_agreement_before']:.2f}% before -> {100 * t['holdout_agreement_after']:.2f}% after")
    print(f"{'format':7} {'PTQ top-1':>9} {'PTQ drop':>9} {'PTQ agree':>9} {'QAT top-1':>9} {'QAT drop':>9} "
          f"{'QAT agree':>9} {'PTQ KL':>8} {'QAT KL':>8}  recovered half, within 0.1 | agreement >= 99%")
    rows = {a["format"]: a for a in ptq["artifacts"]}
    for a in qat["artifacts"]:
        p = rows[a["format"]]
        pd, qd = 100 * (ref["top1"] - p["accuracy"]["top1"]), 100 * (ref["top1"] - a["accuracy"]["top1"])
        pa, qa = 100 * p["fidelity"]["top1_agreement"], 100 * a["fidelity"]["top1_agreement"]
        print(f"{a['format']:7} {100 * p['accuracy']['top1']:9.2f} {pd:9.2f} {pa:9.2f} {100 * a['accuracy']['top1']:9.2f} "
              f"{qd:9.2f} {qa:9.2f} {p['fidelity'].get('mean_kl', float('nan')):8.5f} {a['fidelity'].get('mean_kl', float('nan')):8.5f}  "
              f"{goal_met(pd, qd)} | {'yes' if qa >= 99 else 'NO'} [{a['method']}]")
    print("Which artifact qat-int8 shipped (pipeline/search/qat_gate.py: held-out training images, each "
          "format's runtime; KL gain = post-training KL - QAT KL, paired, ± 1 s.e.):")
    for a in qat["artifacts"]:
        v = a["export"].get("qat_vs_ptq")
        if v:
            print(f"  {a['format']:7} held-out KL QAT {v['qat']['mean_kl']:.5f}, post-training {v['ptq']['mean_kl']:.5f}, "
                  f"gain {v['kl_gain']:.2e} ± {v['kl_gain_se']:.2e} on {v['images']} images; shipped "
                  f"{'QAT' if v['shipped'] == 'qat' else 'post-training'}; qat stage {v['qat_seconds']} s")
    print("Disagreements with float by float's top-1 - top-2 probability margin:")
    for a in qat["artifacts"]:
        print(f"  {a['format']:7} PTQ {disagreements_by_margin(rows[a['format']]['fidelity'])}\n"
              f"  {'':7} QAT {disagreements_by_margin(a['fidelity'])}")

if __name__ == "__main__":
    main()
