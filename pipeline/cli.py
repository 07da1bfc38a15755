"""Command line: ``python -m pipeline ...`` (also installed as ``repvit-pipeline``)."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from .variants import VARIANTS, UnknownVariant, get_variant


class PipelineGroup(click.Group):
    """Turns the pipeline's own errors into one readable line and exit code 2."""

    def invoke(self, ctx):
        from .checkpoints import CheckpointError
        from .config import RecipeError
        from .data import DataError
        from .download import WeightsCorrupt, WeightsUnavailable
        from .models.reparam import ReparamError

        try:
            return super().invoke(ctx)
        except (CheckpointError, RecipeError, DataError, WeightsCorrupt, WeightsUnavailable,
                ReparamError, UnknownVariant) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=PipelineGroup)
def main():
    """RepViT checkpoint -> compressed, app-ready Core ML / ONNX / TFLite models."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def variants(as_json: bool):
    """The model zoo: counted params and MACs next to the published figures."""
    from .models import create_model, profile, reparameterize

    rows = []
    for name, v in VARIANTS.items():
        p = profile(reparameterize(create_model(v, seed=0)), v.input_size)
        rows.append({"variant": name, "params_m": round(p.params / 1e6, 2),
                     "gmacs": round(p.macs / 1e9, 2), "published_params_m": v.published.params_m,
                     "published_gmacs": v.published.gmacs, "published_top1": v.published.top1,
                     "iphone12_ms_published": v.published.iphone12_ms,
                     "weights": v.weights.url})
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
                   f"{fmt(r['published_top1']):>9} {r['iphone12_ms_published']:>15}")


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
    from .checkpoints import guess_variant, parse, read_file
    from .stages import load as load_stage, reparam as reparam_stage

    if variant is None:
        if ckpt in ("official", "random"):
            variant = "m0.9"
        else:
            c = parse(read_file(ckpt), ckpt)
            variant = c.variant_hint or guess_variant(c.state_dict) or "m0.9"
    get_variant(variant)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_stage.run(load_stage.LoadConfig(variant=variant, checkpoint=ckpt), Path(tmp))
        cfg = reparam_stage.ReparamConfig(tolerance=tolerance)
        result = reparam_stage.run(cfg, loaded.checkpoint, Path(tmp))
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


if __name__ == "__main__":
    main()
