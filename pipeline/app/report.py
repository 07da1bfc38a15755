"""report.json (for programs) and report.md (for people) of one deploy."""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Optional

from pipeline.core.runner import facts_of

UNTRAINED = "untrained weights: accuracy figures are meaningless"


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder (an .mlpackage) as its sorted relative paths and contents."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


RETRY = ("the other formats shipped. Run the same command again to retry only this format "
         "(the rest is cached); leave it out with --set export.formats=[...]; if the error "
         "persists, it is the converter's or runtime's: pin its previous version in setup.cfg")


FREE_SPACE = ("free disk space (`python -m pipeline cache clean --older-than 7d` removes old cache "
              "entries) or point ARTIFACTS=<folder on a larger disk>, then run the same command again")
NO_SPACE = FREE_SPACE + ": only this format runs"


def failures(records: dict) -> list[dict]:
    """The per-format units that failed (export.<format>, validate.<format>), with what to do."""
    out = []
    for name, r in records.items():
        stage, _, fmt = name.partition(".")
        if fmt and stage in ("export", "validate") and r.error and not r.error.startswith("not run"):
            todo = NO_SPACE if "No space left on device" in r.error else RETRY
            out.append({"format": fmt, "stage": name, "error": r.error, "what_to_do": todo})
    return out


def export_dirs(records: dict) -> dict[str, Path]:
    """Each format's export folder, where that format's export succeeded and its validation
    (if the recipe runs one) did too."""
    out = {}
    for name, r in records.items():
        stage, _, fmt = name.partition(".")
        validated = records.get(f"validate.{fmt}")
        if stage == "export" and not r.error and not (validated and validated.error):
            out[fmt] = r.dir
    return out


def build(variant: str, quant: str, recipe_name: str, records: dict) -> dict:
    """The report contract. ``records`` are the runner's StageRecords by stage name."""
    load = records["load"].facts
    images = records["images"].facts if "images" in records else {}
    reference = records["reference"].facts if "reference" in records else None
    by_format = {a["format"]: a for name, r in records.items() if name.startswith("validate.") and not r.error
                 for a in r.facts["artifacts"]}
    artifacts, skipped = [], []
    for folder in export_dirs(records).values():
        for a in facts_of(folder)["artifacts"]:
            if not a.get("path"):
                skipped.append({"format": a["format"], "reason": a["skipped"]})
                continue
            path = folder / a["path"]
            v = by_format.get(a["format"], {})
            artifacts.append({
                "format": a["format"], "path": a["path"], "bytes": tree_bytes(path), "sha256": tree_sha256(path),
                "runtime": v.get("runtime"), "method": v.get("method"),
                "accuracy": v.get("accuracy"), "fidelity": v.get("fidelity"), "latency": v.get("latency", []),
                "throughput": v.get("throughput"), **({"compiled": v["compiled"]} if v.get("compiled") else {}),
                "export": {k: val for k, val in a.items() if k not in ("format", "path")}})
    budget_of(artifacts, records, reference)
    weights = load["weights"]
    notes = []
    if not weights["trained"]:
        notes.append(f"{UNTRAINED} ({weights['reason']})")
    if any(a["method"] == "simulated" for a in artifacts):
        notes.append("Core ML results are simulated: Core ML cannot run on this OS, so the saved ML "
                     "program was read back and interpreted in PyTorch at its declared precision. "
                     "Run the pipeline on macOS for measured Core ML figures.")
    return {
        "variant": variant, "quant": quant, "recipe": recipe_name,
        "weights": {"source": weights["source"], "sha256": weights["sha256"], "trained": weights["trained"],
                    "reason": weights.get("reason") or None},
        "preprocess": images.get("preprocess") or {k: load.get(k) for k in
                                                      ("input_size", "crop_pct", "interpolation", "mean", "std")},
        "data": {"eval": images.get("eval_images"), "calibration": _calibration(records)},
        "equalization": (records["quantize"].facts if "quantize" in records else {}).get("equalization"),
        "reference": reference,
        "qat": _qat(records["qat"].facts) if "qat" in records else None,
        "stages": [{"name": r.name, "key": r.key, "cache_hit": r.cache_hit, "seconds": round(r.seconds, 3),
                    **({"error": r.error} if r.error else {})} for r in records.values()],
        "artifacts": artifacts, "skipped": skipped, "failed": failures(records), "notes": notes,
        "host": {"os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
                 "python": platform.python_version()},
    }


def budget_of(artifacts: list[dict], records: dict, reference: Optional[dict]) -> None:
    """Each artifact's drop against the scheme's ``max_drop``: top-1 points with labels,
    top-1 agreement points without."""
    max_drop = (records["quantize"].facts if "quantize" in records else {}).get("max_drop")
    ref_acc = (reference or {}).get("accuracy")
    for a in artifacts:
        acc, fid = a.get("accuracy"), a.get("fidelity")
        if acc and ref_acc:
            paired = acc["drop_vs_float"]   # same images through both models
            drop, se, unit = paired["points"], paired["standard_error"], "top-1 points"
        elif fid:
            p = 1 - fid["top1_agreement"]
            drop, unit = 100 * p, "agreement points"
            se = 100 * (p * (1 - p) / max(fid["n"] - 1, 1)) ** 0.5
        else:
            a["budget"] = None
            continue
        a["budget"] = {"max_drop": max_drop, "drop": round(drop, 3), "unit": unit,
                       "standard_error": round(se, 3),
                       "met": None if max_drop is None else drop <= max_drop}


def _calibration(records: dict) -> str:
    q = records["quantize"].facts if "quantize" in records else {}
    cal = q.get("calibration")
    if cal:
        return f"{cal['images']} from {cal['source']}"
    return f"none ({q.get('scheme', 'this scheme')} needs no calibration)"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _lat(latency: list, prefix: str) -> str:
    for l in latency:
        if l["target"].startswith(prefix):
            return f"{l['median_ms']:.2f} ({l['method']})"
    return "-"


def _iphone(latency: list) -> str:
    """Every iPhone figure, each with how it was obtained (measured ones first)."""
    rows = sorted((l for l in latency if l["target"].startswith("iPhone") or l["runtime"] == "Core ML"
                   and not l["target"].startswith("host")), key=lambda l: l["method"] != "measured")
    out = []
    for l in rows:
        err = l.get("error_ms")
        out.append(f"{l['median_ms']:.2f} ({l['method']}, {l['target']}"
                   + (f", ±{err['loo_mean_abs']:.2f}" if err else "")
                   + (", extrapolated" if l.get("extrapolated") else "") + ")")
    return "<br>".join(out) or "-"


def _qat(facts: dict) -> dict:
    """What QAT did, per fake-quantization backend (the loss curve stays in the cache)."""
    return {"images": facts["images"], "equalization": facts.get("equalization"), "trained": {
        backend: {k: v for k, v in t.items() if k != "history"} | {"final_loss": (t["history"] or [{}])[-1].get("loss")}
        for backend, t in facts["trained"].items()}}


def qat_vs_ptq_lines(artifacts: list[dict]) -> list[str]:
    """qat-int8: each format's fine-tuned artifact beside its post-training twin, measured in
    the format's runtime on the held-out images, and which one shipped."""
    rows = [(a["format"], a["export"]["qat_vs_ptq"]) for a in artifacts if a["export"].get("qat_vs_ptq")]
    if not rows:
        return []
    first = rows[0][1]
    lines = [f"QAT against post-training int8 on {first['images']} held-out images ({first['source']}), "
             f"each in its format's runtime; drop in {first['unit']} (± 1 s.e.); {first['criterion']}:", "",
             "| format | QAT: drop / agreement % / mean KL | post-training: drop / agreement % / mean KL | "
             "KL gain of QAT (± 1 s.e.) | QAT stage, s | shipped |", "|---|---|---|---|---:|---|"]
    for fmt, v in rows:
        q, p = v["qat"], v["ptq"]
        lines.append(f"| {fmt} | {q['drop']:.2f} ± {q['standard_error']:.2f} / {_pct(q['agreement'])} / "
                     f"{q['mean_kl']:.5f} | {p['drop']:.2f} ± {p['standard_error']:.2f} / {_pct(p['agreement'])} / "
                     f"{p['mean_kl']:.5f} | {v['kl_gain']:.2e} ± {v['kl_gain_se']:.2e} | "
                     f"{v['qat_seconds'] if v['qat_seconds'] is not None else '-'} | "
                     f"**{'QAT' if v['shipped'] == 'qat' else 'post-training'}** |")
    lines.append("")
    lines += [f"- **{fmt}**: {v['why']}." for fmt, v in rows] + [""]
    return lines


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def _partitions(e: dict, n: int, outside: dict, delegate: str, kernels: str) -> tuple[str, bool]:
    if e["fast_path"]:
        return f"{e['runtime']}: 1 {delegate} partition, every op delegated.", True
    return f"{e['runtime']}: **{n} {delegate} partitions**; left to {kernels}: {_counts(outside) or 'none'}.", False


def execution_line(e: dict) -> tuple[str, bool]:
    """(how the artifact executes, in a sentence; whether it stays on its runtime's fast path)."""
    if "xnnpack_partitions" in e:   # LiteRT
        return _partitions(e, e["xnnpack_partitions"], e["ops_outside_xnnpack"], "XNNPACK",
                           "TFLite's built-in kernels between them")
    if "delegate_partitions" in e:  # ExecuTorch
        return _partitions(e, e["delegate_partitions"], e["ops_outside_delegate"], e["backend"],
                           "ExecuTorch's portable kernels")
    if "float_between_dq_q" in e:
        floats = e["float_between_dq_q"]
        return (f"{e['runtime']}: integer kernels {_counts(e['integer_ops'])}; in float between "
                f"DequantizeLinear and QuantizeLinear: {_counts(floats) or 'nothing'}"
                f"{' (onnxruntime has no integer kernel for these)' if floats else ''}.", True)
    if "integer_layers" in e:
        floats = e["float_layers"]
        return (f"{e['runtime']}: integer layers {_counts(e['integer_layers'])}; in float: "
                f"{_counts(floats) or 'nothing'}.", True)
    if "fp16_ops" in e:
        return (f"{e['runtime']}: int8 inputs {_counts(e['int8_input_ops'])}; stays fp16 "
                f"(no quantize/dequantize around it): {_counts(e['fp16_ops']) or 'nothing'}.", True)
    return "-", True


def margin_label(float_margin: list) -> str:
    """A bin of float's top-1 / top-2 margin, ``[lo, hi]`` (hi None: open), as a reader reads it."""
    lo, hi = float_margin
    return f"< {hi:g}" if lo == 0 else f">= {lo:g}" if hi is None else f"{lo:g}-{hi:g}"


def margin_table(artifacts: list[dict]) -> list[str]:
    """Where each artifact's top-1 disagrees with float, by float's top-1 / top-2 margin."""
    rows = [(a["format"], a["fidelity"]["agreement_by_float_margin"]) for a in artifacts
            if (a.get("fidelity") or {}).get("agreement_by_float_margin")]
    if not rows:
        return []
    heads = [margin_label(b["float_margin"]) for b in rows[0][1]]
    lines = ["Where top-1 disagrees with float, by how sure float was (its top-1 minus top-2 "
             "probability; near-ties flip first): agreement % (images that disagree).", "",
             "| format | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads),
             "| images | " + " | ".join(str(b["images"]) for b in rows[0][1]) + " |"]
    for fmt, bins in rows:
        lines.append(f"| {fmt} | " + " | ".join(
            "-" if b["agreement"] is None else f"{_pct(b['agreement'])} ({b['disagreements']})" for b in bins) + " |")
    return lines + [""]


def markdown(r: dict) -> str:
    title = f"# RepViT-{r['variant'].upper()} · {r['quant']}\n"
    lines = [title]
    if not r["weights"]["trained"]:
        lines.append(f"> **{UNTRAINED}.** {r['weights']['reason']}\n")
    for n in r["notes"]:
        if not n.startswith(UNTRAINED):
            lines.append(f"> {n}\n")
    w, p = r["weights"], r["preprocess"]
    lines += [f"- Weights: `{w['source']}` (sha256 `{w['sha256']}`, trained: {w['trained']})",
              f"- Preprocessing: {p['input_size']}px, crop_pct {p['crop_pct']}, {p['interpolation']}, "
              f"mean {p['mean']}, std {p['std']}",
              f"- Evaluation images: {r['data']['eval']}",
              f"- Calibration images: {r['data']['calibration']}"]
    eq = r.get("equalization")
    if eq:
        lines.append(f"- Before int8: {eq['method']} on the calibration images; channel-range spread "
                     f"(max / median, median over {eq['tensors']} stream tensors) {eq['range_spread_before']} "
                     f"-> {eq['range_spread_after']}; the float function is unchanged")
    lines.append("")
    ref = r.get("reference") or {}
    if ref.get("accuracy"):
        a = ref["accuracy"]
        lines.append(f"Float reference ({ref['runtime']}): top-1 {_pct(a['top1'])}%, top-5 "
                     f"{_pct(a['top5'])}% on {a['n']} images (measured).\n")
    if r.get("qat"):
        lines.append(f"Quantization-aware training on {r['qat']['images']}:")
        if r["qat"].get("equalization"):
            e = r["qat"]["equalization"]
            lines.append(f"- started from the equalized model ({e['method']}; channel range spread "
                         f"{e['range_spread_before']} -> {e['range_spread_after']}), as post-training int8 does")
        for backend, t in r["qat"]["trained"].items():
            lines.append(f"- {backend} fake quantization (for {', '.join(t['formats'])}): {t['steps']} steps "
                         f"on {t['device']} x {t['world_size']} process(es); top-1 agreement of the "
                         f"fake-quantized model with float on {t['holdout_images']} held-out images "
                         f"{_pct(t['holdout_agreement_before'])}% before -> "
                         f"{_pct(t['holdout_agreement_after'])}% after, mean KL(float || student) "
                         f"{t['holdout_kl_before']:.5f} -> {t['holdout_kl_after']:.5f} (simulated in PyTorch).")
        lines.append("")
        lines += qat_vs_ptq_lines(r["artifacts"])
    for f in r.get("failed", []):
        lines.append(f"> **{f['format']} FAILED** in `{f['stage']}`: {f['error']}  \n> What to do: {f['what_to_do']}.\n")
    off = [a["format"] for a in r["artifacts"]
           if a["export"].get("execution") and not execution_line(a["export"]["execution"])[1]]
    if off:
        lines.append(f"> **Off the fast path: {', '.join(off)}** (see How each artifact executes).\n")
    lines += ["## Artifacts", "",
              "| format | file | size MB | top-1 % | top-5 % | top-1 agreement % | cosine | SQNR dB | "
              "host ms, 1 thread | host ms, all threads | iPhone ms | how |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in r["artifacts"]:
        acc, fid = a.get("accuracy") or {}, a.get("fidelity") or {}
        lines.append(
            f"| {a['format']} | `{a['path']}` | {a['bytes'] / 1e6:.2f} | {_pct(acc.get('top1'))} | "
            f"{_pct(acc.get('top5'))} | {_pct(fid.get('top1_agreement'))} | "
            f"{fid['cosine']:.5f} | {fid['sqnr_db']:.1f} | {_lat(a['latency'], 'host (1 ')} | "
            f"{_lat([l for l in a['latency'] if not l['target'].startswith('host (1 ')], 'host')} | "
            f"{_iphone(a['latency'])} | {a['method']}: {a['runtime']} |" if fid else
            f"| {a['format']} | `{a['path']}` | {a['bytes'] / 1e6:.2f} | - | - | - | - | - | - | - | - | "
            "not validated |")
    lines.append("")
    lines.append("Fidelity is against the fused float PyTorch model on the same images (logits; "
                 "probabilities for Core ML and TFLite, whose models end in a softmax). Host latency: batch 1, "
                 "median; the CPU is named in report.json.\n")
    lines += margin_table(r["artifacts"])
    def compiled(e):
        return " (inductor-compiled)" if (e.get("compiled") or {}).get("compiled") else ""
    speeds = [f"{a['format']} {a['throughput']['images_per_s']:.0f}{compiled(a)}" for a in r["artifacts"]
              if (a.get("throughput") or {}).get("images_per_s")]
    if ref.get("throughput", {}).get("images_per_s"):
        speeds.insert(0, f"float reference {ref['throughput']['images_per_s']:.0f}{compiled(ref)}")
    if speeds:
        lines.append(f"Scoring throughput, images/s (measured on this machine, batched, all cores): "
                     f"{', '.join(speeds)}.\n")
    notes = [l["details"] for a in r["artifacts"] for l in a["latency"] if l["method"] == "estimated"]
    if notes:
        lines.append(f"iPhone estimate: {notes[0]}.\n")
    if any(a["format"] == "coreml" for a in r["artifacts"]):
        lines.append("Measure on your own device: `RepViTBench/` (a Swift package) runs the "
                     ".mlpackage and writes JSON; `python -m pipeline latency import result.json "
                     "--report <this folder>/report.json` adds it here as measured.\n")
    missed = [a for a in r["artifacts"] if (a.get("budget") or {}).get("met") is False]
    for a in r["artifacts"]:
        b = a.get("budget")
        if b and b["max_drop"] is not None:
            se = f" ± {b['standard_error']:.2f}" if b.get("standard_error") is not None else ""
            lines.append(f"- Budget, {a['format']}: drop {b['drop']:.2f}{se} {b['unit']} (1 s.e.) "
                         f"against max_drop {b['max_drop']} ({'met' if b['met'] else '**missed**'}).")
    for a in r["artifacts"]:
        aa = a["export"].get("accuracy_aware")
        if aa and aa["checked"]:
            kept = ", ".join(f"`{l}`" for l in aa["float_layers"]) or "none"
            lat = aa.get("latency_vs_all_int8")
            cost = ("" if not lat else
                    f"; host latency {lat['shipped_ms']:.2f} ms shipped vs {lat['all_int8_ms']:.2f} ms "
                    f"all-int8 ({lat['ratio']:.2f}x; {lat['method']}: {lat['details']})"
                    if lat["method"] == "measured" else f"; latency cost not measured ({lat['details']})")
            lines.append(f"- Accuracy-aware pass, {a['format']}: drop {aa['drop_before']:.2f} -> "
                         f"{aa['drop_after']:.2f} ± {aa['standard_error']:.2f} {aa['unit']} (1 s.e.) on "
                         f"{aa.get('source') or str(aa['images']) + ' held-out images'} "
                         f"({'met' if aa['met'] else '**missed**'}); layers kept in float: {kept}"
                         f"{'; stopped: ' + aa['stopped'] if aa.get('stopped') else ''}{cost}.")
        elif aa:
            lines.append(f"- Accuracy-aware pass, {a['format']}: not run ({aa['reason']}).")
    if missed:
        lines.append("\n> The accuracy budget was missed on the evaluation images. The "
                     "accuracy-aware pass, where it ran, checked the budget on held-out "
                     "images; see above.")
    lines.append("")
    if r["skipped"]:
        lines += ["## Not produced", ""] + [f"- {s['format']}: {s['reason']}" for s in r["skipped"]] + [""]
    executes = [(a["format"], a["export"]["execution"]) for a in r["artifacts"] if a["export"].get("execution")]
    if executes:
        lines += ["## How each artifact executes", ""]
        lines += [f"- **{fmt}**: {execution_line(e)[0]} ({e['how']})" for fmt, e in executes]
        lines.append("")
    lines += ["## Export checks", ""]
    for a in r["artifacts"]:
        e = a["export"]
        par = e.get("parity")
        desc = (f"parity vs PyTorch on {par['n']} natural images: max |diff| {par['max_abs_diff']:.3g} "
                f"({par['relative']:.2e} of max |output|), top-1 agreement {_pct(par['top1_agreement'])}% "
                f"[{par['runtime']}]") if par else "no parity check"
        ops = ", ".join(f"{k} {v}" for k, v in sorted(e.get("ops", {}).items()))
        lines.append(f"- **{a['format']}**: {desc}" + (f". Ops: {ops}." if ops else "."))
    lines += ["", "## Stages", "", "| stage | key | cached | seconds |", "|---|---|---|---:|"]
    lines += [f"| {s['name']} | `{s['key'][:12]}` | {'yes' if s['cache_hit'] else 'no'} | {s['seconds']:.1f} |"
              for s in r["stages"]]
    return "\n".join(lines) + "\n"
