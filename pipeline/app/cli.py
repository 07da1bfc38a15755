"""Command line: ``python -m pipeline ...`` (also installed as ``repvit-pipeline``)."""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import click

from pipeline.core.log import configure as configure_logging
from pipeline.variants import VARIANTS, UnknownVariant, get_variant


def user_errors() -> tuple[type[Exception], ...]:
    """The pipeline's own errors: bad input, each with a message that says what to do."""
    # Imported once a command has failed: a warm deploy never imports torch (pipeline/app/stamp.py).
    from pipeline.app.deploy import DiskFull
    from pipeline.core.config import RecipeError
    from pipeline.formats.base import ExportError
    from pipeline.io.checkpoints import CheckpointError
    from pipeline.io.data import DataError
    from pipeline.io.download import DownloadCorrupt, DownloadUnavailable
    from pipeline.models.reparam import ReparamError

    return (CheckpointError, RecipeError, DataError, DownloadCorrupt, DownloadUnavailable,
            ReparamError, UnknownVariant, ExportError, NotImplementedError, DiskFull)


class PipelineGroup(click.Group):
    """Turns the pipeline's own errors into one readable line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            if not isinstance(e, user_errors()):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=PipelineGroup)
@click.option("-v", "--verbose", count=True, help="More detail on stderr (debug messages).")
@click.option("-q", "--quiet", "quiet_", count=True, help="Only warnings and errors on stderr.")
def main(verbose: int, quiet_: int):
    """RepViT checkpoint -> compressed, app-ready Core ML / ONNX / TFLite models."""
    configure_logging(verbose - quiet_)
    # The converters' own chatter (TF/absl C++ logs, torch.onnx registry warnings) buries
    # the pipeline's output; errors still get through.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "2")
    for name in ("torch.onnx", "coremltools", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def variants(as_json: bool):
    """The model zoo: counted params and MACs next to the published figures."""
    from pipeline.models import create_model, profile, reparameterize

    rows = []
    for name, v in VARIANTS.items():
        p = profile(reparameterize(create_model(v, seed=0)), v.input_size)
        rows.append({"variant": name, "params_m": round(p.params / 1e6, 2),
                     "gmacs": round(p.macs / 1e9, 2), "published_params_m": v.published.params_m,
                     "published_gmacs": v.published.gmacs, "published_top1": v.published.top1,
                     "iphone12_ms_published": v.published.iphone12_ms,
                     "legacy": v.legacy, "weights": v.weights.url,
                     "hub": f"hf-hub:{v.hub_id}" if v.hub_id else None})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo("Params and GMACs: counted on the fused model at 224x224 (this machine); "
               "published: RepViT README (top-1 ImageNet-1k 300e, iPhone 12 Core ML latency).")
    click.echo(f"{'variant':8} {'params(M)':>10} {'pub':>6} {'GMACs':>7} {'pub':>5} "
               f"{'top-1 pub':>9} {'iPhone12 ms pub':>15}")
    fmt = lambda x: "-" if x is None else x  # noqa: E731
    for r in rows:
        click.echo(f"{r['variant']:8} {r['params_m']:>10.2f} {fmt(r['published_params_m']):>6} "
                   f"{r['gmacs']:>7.2f} {fmt(r['published_gmacs']):>5} "
                   f"{fmt(r['published_top1']):>9} {fmt(r['iphone12_ms_published']):>15}"
                   f"{'  legacy (first paper version)' if r['legacy'] else ''}")
    click.echo("\nWeights (CKPT=official downloads the release file; CKPT=hf-hub:... timm's copy):")
    for r in rows:
        click.echo(f"{r['variant']:8} {r['weights']}" + (f"\n{'':8} {r['hub']}" if r["hub"] else ""))


@main.command()
def schemes():
    """Which scheme each format can express (pipeline/schemes.py), and why not where not."""
    from pipeline.schemes import ALL_FORMATS as FORMATS, SCHEMES, WHAT, unsupported

    click.echo(f"{'scheme':9} " + " ".join(f"{f:33}" for f in FORMATS).rstrip())
    reasons = {}
    for s in SCHEMES:
        cells = []
        for f in FORMATS:
            why = unsupported(f, s)
            if why:
                reasons.setdefault(why, len(reasons) + 1)
            cells.append(f"not produced [{reasons[why]}]" if why else WHAT.get((f, s.replace("qat-", "")), s))
        click.echo((f"{s:9} " + " ".join(f"{c:33}" for c in cells)).rstrip())
    for why, n in reasons.items():
        click.echo(f"[{n}] {why}")


@main.command()
@click.option("--variant", default=None, help=f"One of {', '.join(VARIANTS)} (default: from the checkpoint).")
@click.option("--ckpt", default="official", show_default=True,
              help="'official' (release weights), 'random', or a checkpoint file.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the fused pipeline checkpoint.")
@click.option("--tolerance", default=1e-4, show_default=True,
              help="Allowed max |fused - unfused| relative to max |logit|.")
def reparam(variant, ckpt, out, tolerance):
    """Load a checkpoint, fuse it, verify fused vs unfused, write the fused model."""
    from pipeline.io.checkpoints import guess_variant, parse, read_file
    from pipeline.stages import load as load_stage
    from pipeline.stages import reparam as reparam_stage

    if variant is None:
        if ckpt in ("official", "random"):
            variant = "m0.9"
        else:
            c = parse(read_file(ckpt), ckpt)
            variant = c.variant_hint or guess_variant(c.state_dict) or "m0.9"
    get_variant(variant)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_stage.load(load_stage.LoadConfig(variant=variant, checkpoint=ckpt), Path(tmp))
        cfg = reparam_stage.ReparamConfig(tolerance=tolerance)
        result = reparam_stage.reparam(cfg, loaded.checkpoint, Path(tmp))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".part")
        tmp_out.write_bytes(result.checkpoint.read_bytes())
        tmp_out.replace(out)
    w = loaded.weights
    click.echo(f"{get_variant(variant).title}: weights {w.source}"
               + ("" if w.trained else "  (UNTRAINED: " + w.reason.split('.')[0] + ")"))
    click.echo(f"  BatchNorms folded: {result.batchnorms_before} -> 0; params "
               f"{result.params_before / 1e6:.3f}M -> {result.params_after / 1e6:.3f}M; "
               f"{result.gmacs:.3f} GMACs at {loaded.meta['input_size']}px (counted)")
    click.echo(f"  verified on {cfg.verify_images} natural images (scikit-image samples), float32 CPU: max |fused - "
               f"unfused| = {result.max_abs_diff:.3g} (max |logit| {result.max_abs_logit:.3g}, "
               f"tolerance {tolerance:g} relative), top-1 agreement {result.top1_agreement:.0%}")
    click.echo(f"  wrote {out}")


def run_options(f):
    """Options shared by deploy and compare (the Make variables)."""
    opts = [
        click.option("--variant", default=None, help=f"VARIANT: {', '.join(VARIANTS)} (default: the recipe's)."),
        click.option("--ckpt", "checkpoint", default=None, help="CKPT: official | random | a checkpoint file."),
        click.option("--data", default=None, help="DATA: evaluation images (ImageFolder or ImageNet val/<wnid>/)."),
        click.option("--calib", default=None, help="CALIB: calibration / QAT images (never scored): a folder, or a public set (imagenette-320, imagenette-160)."),
        click.option("--recipe", default=None, help="RECIPE: your recipe file (may extend a shipped one)."),
        click.option("--set", "sets", multiple=True, help="Override one key: section.key=value (repeatable)."),
        click.option("--force", multiple=True, help="Re-run this stage even if cached (repeatable)."),
        click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"),
                     show_default=True, help="Output root (the cache lives in <root>/cache)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
@click.option("--quant", default=None, help="QUANT: the scheme, picks recipes/<QUANT>.yaml (default fp32).")
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
def deploy(quant, as_json, **kw):
    """Run the recipe's stages (cached) and write artifacts/<variant>-<quant>/."""
    from pipeline.app.deploy import RunOptions
    from pipeline.app.deploy import deploy as run_deploy
    from pipeline.app.deploy import summary

    opts = RunOptions(quant=quant, **kw)
    report, folder = run_deploy(opts)
    if as_json:
        click.echo(json.dumps(report, indent=1, default=str))
    else:
        click.echo(summary(report, folder))
    if report["failed"]:   # the other formats shipped; CI must still notice
        sys.exit(1)


@main.command()
@click.option("--quant", "quants", multiple=True, help="A scheme to include (repeatable; default fp32 fp16).")
@run_options
def compare(quants, **kw):
    """Deploy several schemes (cached) and compare them in artifacts/<variant>-compare/."""
    from pipeline.app.compare import compare as run_compare
    from pipeline.app.deploy import RunOptions

    result, folder = run_compare(RunOptions(**kw), list(quants) or ["fp32", "fp16"])
    click.echo(f"wrote {folder}/ (compare.md, compare.html, compare.json, compare.png)")
    click.echo((folder / "compare.md").read_text())
    if result["failed"]:
        sys.exit(1)


@main.group()
def latency():
    """iPhone latency measurements made outside the pipeline."""


@latency.command("import")
@click.argument("measurement", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--report", "report_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The deploy's report.json (e.g. artifacts/m0.9-int8/report.json).")
def latency_import(measurement, report_path):
    """Merge a RepViTBench JSON (measured on your device) into a deploy report."""
    from pipeline.app.deploy import rewrite_report
    from pipeline.eval.latency import import_measurement

    try:
        report = import_measurement(report_path, measurement)
    except ValueError as e:
        raise click.ClickException(str(e))
    rewrite_report(report_path.parent, report)
    click.echo(f"added the measurement to {report_path} and report.md")


@main.group()
def cache():
    """Inspect or clean the stage cache."""


@cache.command("ls")
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
def cache_ls(artifacts):
    """List cache entries (stage, key, size, age)."""
    import time

    from pipeline.core.runner import Cache

    entries = Cache(artifacts / "cache").entries()
    for e in entries:
        age = (time.time() - e["created"]) / 3600
        click.echo(f"{e['stage']:9} {e['key']}  {e['bytes'] / 1e6:9.2f} MB  {age:7.1f} h old")
    click.echo(f"{len(entries)} entries, {sum(e['bytes'] for e in entries) / 1e6:.1f} MB")


@cache.command("clean")
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--older-than", default=None, help="Only entries older than this: 30m, 12h, 7d.")
def cache_clean(artifacts, older_than):
    """Remove cache entries."""
    from pipeline.core.runner import Cache

    seconds = None
    if older_than:
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            seconds = float(older_than[:-1]) * units[older_than[-1]]
        except (KeyError, ValueError):
            raise click.BadParameter("use a number and a unit: 30m, 12h, 7d", param_hint="--older-than")
    n = Cache(artifacts / "cache").clean(seconds)
    click.echo(f"removed {n} cache entries")


if __name__ == "__main__":
    main()
