"""``make compare``: several schemes side by side (each deploy cached), as JSON,
Markdown, and an HTML page with the plots embedded."""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
from pathlib import Path

from pipeline.app.deploy import RunOptions, deploy
from pipeline.app.report import UNTRAINED
from pipeline.core.atomic import staged_dir

log = logging.getLogger(__name__)


def rows_of(quant: str, rep: dict) -> list[dict]:
    rows = []
    for a in rep["artifacts"]:
        acc, fid = a.get("accuracy"), a.get("fidelity") or {}
        host = next((l for l in a["latency"] if l["target"].startswith("host (1 ")), None)
        rows.append({"scheme": quant, "format": a["format"], "file": a["path"], "mb": a["bytes"] / 1e6,
                     "top1": acc["top1"] if acc else None, "n": acc["n"] if acc else fid.get("n"),
                     "drop": (acc or {}).get("drop_vs_float"),
                     "agreement": fid.get("top1_agreement"), "sqnr_db": fid.get("sqnr_db"),
                     "host_ms": host["median_ms"] if host else None,
                     "host_method": f"measured, {host['runtime']}, 1 thread" if host else None,
                     "method": a["method"], "iphone": _iphone(a)})
    for s in rep["skipped"]:
        rows.append({"scheme": quant, "format": s["format"], "skipped": s["reason"]})
    for f in rep.get("failed", []):
        rows.append({"scheme": quant, "format": f["format"], "failed": f"{f['stage']}: {f['error']}"})
    return rows


def _iphone(a: dict) -> dict | None:
    for l in a["latency"]:
        if l["target"].startswith("iPhone"):
            return {"ms": l["median_ms"], "method": l["method"], "target": l["target"], "details": l.get("details"),
                    "extrapolated": bool(l.get("extrapolated"))}
    return None


def compare(opts: RunOptions, quants: list[str]) -> tuple[dict, Path]:
    """A format that fails in one scheme is a row saying so (the deploy's own report has
    what to do); any other error stops the comparison."""
    reports = {}
    for q in quants:
        log.info(f"== {q}")
        reports[q], _ = deploy(dataclasses.replace(opts, quant=q, recipe=None))
    first = next(iter(reports.values()))
    variant = first["variant"]
    result = {"variant": variant, "weights": first["weights"], "data": first["data"],
              "reference": first.get("reference"),
              "rows": [r for q, rep in reports.items() for r in rows_of(q, rep)],
              "failed": [{"scheme": q, **f} for q, rep in reports.items() for f in rep["failed"]],
              "notes": sorted({n for rep in reports.values() for n in rep["notes"]})}
    folder = opts.artifacts / f"{variant}-compare"
    with staged_dir(folder) as tmp:
        png = plot(result)
        (tmp / "compare.png").write_bytes(png)
        (tmp / "compare.json").write_text(json.dumps(result, indent=1, default=str))
        (tmp / "compare.md").write_text(markdown(result))
        (tmp / "compare.html").write_text(page(result, png))
    return result, folder


def _quality(result: dict) -> tuple[str, str]:
    labelled = any(r.get("top1") is not None for r in result["rows"])
    return ("top1", "top-1 accuracy (%)") if labelled else ("agreement", "top-1 agreement with float (%)")


FORMAT_MARKERS = {"coreml": "o", "onnx": "s", "tflite": "^", "openvino": "D", "executorch": "v",
                  "executorch_coreml": "P"}
FORMAT_NAMES = {"coreml": "Core ML", "onnx": "ONNX", "tflite": "TFLite", "openvino": "OpenVINO",
                "executorch": "ExecuTorch (XNNPACK)", "executorch_coreml": "ExecuTorch (Core ML)"}


def _y_and_se(r: dict, key: str) -> tuple[float, float]:
    """A row's quality in % and its error bar: the standard error of the paired top-1
    drop against float where there are labels (what decides whether two schemes differ
    from float), else the binomial standard error of the agreement."""
    y = 100 * r[key]
    drop = r.get("drop") or {}
    if key == "top1" and drop.get("standard_error") is not None:
        return y, drop["standard_error"]
    n = r.get("n") or 0
    return y, (100 * (r[key] * (1 - r[key]) / n) ** 0.5 if n > 1 else 0.0)


def plot(result: dict) -> bytes:
    """Quality against host latency and against size: one colour per scheme and one marker
    per format in both panels, +-1 standard error bars, a legend instead of point labels
    (labels of nearby points collide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    key, label = _quality(result)
    rows = [r for r in result["rows"] if not (r.get("skipped") or r.get("failed")) and r.get(key) is not None]
    schemes = list(dict.fromkeys(r["scheme"] for r in result["rows"]))
    palette = plt.get_cmap("tab10")
    colour = {s: palette(i % 10) for i, s in enumerate(schemes)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    reference = ((result.get("reference") or {}).get("accuracy") or {}).get("top1") if key == "top1" else 1.0
    for ax, xkey, xlabel in ((axes[0], "host_ms", "host CPU latency, ms (measured, 1 thread)"),
                             (axes[1], "mb", "file size, MB")):
        for r in rows:
            if r.get(xkey) is None:
                continue
            y, se = _y_and_se(r, key)
            ax.errorbar(r[xkey], y, yerr=se, fmt=FORMAT_MARKERS.get(r["format"], "x"), color=colour[r["scheme"]],
                        markersize=7, capsize=3, elinewidth=1, markeredgecolor="black", markeredgewidth=0.5)
        if reference is not None:
            ax.axhline(100 * reference, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = ([Line2D([], [], color=colour[s], marker="o", linestyle="", label=s) for s in schemes]
               + [Line2D([], [], color="black", marker=m, linestyle="", markerfacecolor="white", label=FORMAT_NAMES[f])
                  for f, m in FORMAT_MARKERS.items() if any(r["format"] == f for r in rows)])
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.93))
    title = f"RepViT-{result['variant'].upper()}"
    if not result["weights"]["trained"]:
        title += f" ({UNTRAINED})"
    fig.suptitle(title, fontsize=10)
    bars = ("bars: +-1 s.e. of the paired top-1 drop against float" if key == "top1"
            else "bars: +-1 binomial s.e. of the agreement")
    fig.text(0.01, 0.01, f"{bars}; dashed: the float model. Core ML has no host latency where Core ML "
             "cannot run (its fidelity is then simulated).", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.88))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def table_rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        if r.get("skipped") or r.get("failed"):
            why = f"not produced: {r['skipped']}" if r.get("skipped") else f"FAILED in {r['failed']}"
            out.append([r["scheme"], r["format"], "-", "-", "-", "-", "-", "-", why])
            continue
        iph = r.get("iphone")
        drop = r.get("drop")
        out.append([r["scheme"], r["format"], _fmt(r["mb"], ".2f"), _fmt(r["top1"], ".2f", 100),
                    f"{drop['points']:.2f} ± {drop['standard_error']:.2f}" if drop else "-",
                    _fmt(r["agreement"], ".2f", 100), _fmt(r["host_ms"], ".2f"),
                    f"{iph['ms']:.2f} ({iph['method']}{', extrapolated' if iph.get('extrapolated') else ''})"
                    if iph else "-", r["method"]])
    return out


HEADER = ["scheme", "format", "size MB", "top-1 %", "drop, points (± 1 s.e.)", "agreement %",
          "host ms (1 thread)", "iPhone ms", "how"]


def markdown(result: dict) -> str:
    lines = [f"# RepViT-{result['variant'].upper()}: schemes compared", ""]
    lines += [f"> {n}" for n in result["notes"]] + [""]
    lines += [f"- Evaluation images: {result['data']['eval']}", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    lines += ["", "Drop: top-1 points lost against the fused float PyTorch model on the same images, "
              "with the standard error of that paired difference. "
              "Agreement: top-1 agreement with the fused float PyTorch model on the same images. "
              "Host latency: batch 1 median on this machine's CPU (see each deploy's report.json).",
              "", "![accuracy vs latency and size](compare.png)", ""]
    return "\n".join(lines)


def page(result: dict, png: bytes) -> str:
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table_rows(result))
    notes = "".join(f"<p class=note>{e(n)}</p>" for n in result["notes"])
    img = base64.b64encode(png).decode()
    return f"""<!doctype html><html><head><meta charset=utf-8>
<title>RepViT-{e(result['variant'].upper())} compare</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:nth-child(-n+2),td:last-child,th{{text-align:left}}.note{{background:#fff4d6;padding:6px 10px}}
img{{max-width:100%;height:auto}}</style></head>
<body><h1>RepViT-{e(result['variant'].upper())}: schemes compared</h1>{notes}
<p>Evaluation images: {e(str(result['data']['eval']))}</p>
<table><tr>{''.join(f'<th>{e(h)}</th>' for h in HEADER)}</tr>{rows}</table>
<p><img alt="accuracy vs latency and size" src="data:image/png;base64,{img}"></p>
</body></html>
"""
