"""``make deploy``: run a recipe's stages (cached) and publish ``artifacts/<variant>-<quant>/``."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.app import report as report_mod
from pipeline.app.stamp import inputs_stamp
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.atomic import staged_dir
from pipeline.core.config import RECIPES_DIR, Recipe, RecipeError, load_recipe, resolve_recipe_path
from pipeline.core.runner import Cache, StageRecord, run_stages
from pipeline.io.download import DownloadCorrupt, DownloadUnavailable
from pipeline.io.listing import forget_listings
from pipeline.io.public_sets import PUBLIC_SETS, fetch_public_set, wanted
from pipeline.resources import RESOURCES
from pipeline.variants import get_variant

if TYPE_CHECKING:
    from pipeline.io.data import DataConfig

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    variant: Optional[str] = None
    quant: Optional[str] = None
    checkpoint: Optional[str] = None
    data: Optional[str] = None
    calib: Optional[str] = None
    recipe: Optional[str] = None
    sets: tuple[str, ...] = ()
    force: tuple[str, ...] = ()
    artifacts: Path = Path("artifacts")


def shipped_quants() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")


def recipe_source(opts: RunOptions) -> tuple[Path, list[str]]:
    """The recipe file and the overrides (``--set`` and the Make variables) of a run."""
    if opts.recipe:
        path = opts.recipe
    else:
        quant = opts.quant or "fp32"
        if quant not in shipped_quants():
            raise RecipeError(f"unknown QUANT {quant!r}; valid: {', '.join(shipped_quants())}")
        path = RECIPES_DIR / f"{quant}.yaml"
    if opts.variant:
        get_variant(opts.variant)
    sets = list(opts.sets)
    # Make variables are overrides of single keys, like --set.
    for key, value in (("load.variant", opts.variant), ("load.checkpoint", opts.checkpoint),
                       ("data.eval", opts.data), ("data.calib", opts.calib)):
        if value:
            sets.insert(0, f"{key}={json.dumps(value)}")
    return resolve_recipe_path(path), sets


def resolve_recipe(opts: RunOptions) -> Recipe:
    from pipeline.app.plan import SECTIONS  # the stages import torch: only once something may run

    path, sets = recipe_source(opts)
    recipe = load_recipe(path, SECTIONS, sets)
    recipe.sections["load"].variant = get_variant(recipe.variant).name
    data = recipe.sections["data"]
    for d in (data.eval, data.calib if data.calib not in PUBLIC_SETS else None):
        if d and not Path(d).is_dir():
            raise RecipeError(f"data folder not found: {d}. DATA / CALIB must be folders of images "
                              "(an ImageFolder: one sub-folder per class); CALIB may also name a public "
                              f"calibration set: {', '.join(PUBLIC_SETS)}.")
    return recipe


def use_public_calibration(recipe: Recipe) -> None:
    """Point ``data.calib`` at the extracted public calibration set the recipe asks for
    (pipeline/io/public_sets.py), downloading it the first time. Named as CALIB, a set that
    cannot be had is an error; as the default for official weights, the run goes on with
    natural sample photos and says so."""
    data = recipe.sections["data"]
    name = wanted(data.calib, data.eval, data.public_calib, recipe.sections["load"].checkpoint)
    if name is None:
        return
    try:
        data.calib = str(fetch_public_set(name))
    except (DownloadUnavailable, DownloadCorrupt) as e:
        if data.calib == name:
            raise
        log.warning(f"{e}\ncalibrating on natural sample photos instead; int8 loses more "
                    "fidelity on them (docs/calibration.md: what that costs)")


def check_data(data: DataConfig, load: StageRecord) -> None:
    """DATA and CALIB checked against the model the load stage made (its class names),
    before any long stage runs: a folder without images, with folders that are not classes
    of the model, or too small to hold calibration images out of is a ``DataError`` now,
    not after the exports."""
    from pipeline.io.checkpoints import parse, read_file
    from pipeline.io.data import resolve_sets

    classes = parse(read_file(load.dir / "model.pt")).meta["classes"]
    resolve_sets(data, classes)


class DiskFull(OSError):
    pass


DISK_FULL = ("the disk is full while writing {what}. Nothing was half-written (each cache entry and "
             "the deploy folder appear whole or not at all) and finished stages stay cached: "
             + report_mod.FREE_SPACE)


@contextlib.contextmanager
def disk_full_explained(what: str):
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFull(errno.ENOSPC, DISK_FULL.format(what=what)) from e
        raise


def publish(folder: Path, records: dict, report: dict, md: str) -> None:
    """Assemble the deploy folder beside its final place, then swap it in, under a lock (two
    concurrent deploys of one scheme publish one after the other): a reader never sees a
    half-written folder."""
    locks = folder.parent / "cache"   # not beside the deploy folders, which are the user's
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f".publish-{folder.name}.lock", "a+") as lock, disk_full_explained(str(folder)):
        fcntl.flock(lock, fcntl.LOCK_EX)
        _publish(folder, records, report, md)


def _publish(folder: Path, records: dict, report: dict, md: str) -> None:
    with staged_dir(folder) as tmp:
        dirs = report_mod.export_dirs(records)
        for a in report["artifacts"]:
            src = dirs[a["format"]] / a["path"]
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / a["path"])
        if dirs:
            shutil.copy2(next(iter(dirs.values())) / "labels.txt", tmp / "labels.txt")
            if any(a["format"] == "coreml" for a in report["artifacts"]):
                shutil.copytree(RESOURCES / "RepViTBench", tmp / "RepViTBench")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "report.md").write_text(md)


def _stamp(opts: RunOptions) -> Optional[dict]:
    try:
        return inputs_stamp(*recipe_source(opts))
    except (OSError, ValueError):   # a bad recipe, variant or path: the full run reports it, with its fix
        return None


def published_if_current(opts: RunOptions, stamp: Optional[dict]) -> Optional[tuple[dict, Path]]:
    """The published report and folder, when its run read the inputs ``stamp`` digests and
    every file it lists is still there, whole."""
    if stamp is None or opts.force:
        return None
    folder = opts.artifacts / f"{stamp['variant']}-{stamp['quant']}"
    try:
        rep = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if rep.get("inputs_stamp") != stamp["digest"] or not (folder / "report.md").is_file():
        return None
    for a in rep["artifacts"]:
        path = folder / a["path"]
        if not path.exists() or report_mod.tree_bytes(path) != a["bytes"]:
            return None
    return rep, folder


def deploy(opts: RunOptions) -> tuple[dict, Path]:
    forget_listings()
    stamp = _stamp(opts)
    current = published_if_current(opts, stamp)
    if current:
        log.info(f"up to date: {current[1]}/ was written from these inputs (recipe, checkpoint, data "
                 "folders, pipeline code, installed packages); nothing to run")
        return current
    keep_freed_memory()
    from pipeline.app.plan import plan

    recipe = resolve_recipe(opts)
    use_public_calibration(recipe)
    log.info(f"RepViT-{recipe.variant.upper()} · {recipe.quant} · recipe {recipe.name} "
             f"({', '.join(recipe.sources)})")
    stages = plan(recipe.stages, recipe.sections)
    with disk_full_explained(str(opts.artifacts / "cache")):
        records = run_stages(stages, recipe.sections, Cache(opts.artifacts / "cache"), set(opts.force),
                             after={"load": partial(check_data, recipe.sections["data"])})
    if not records["load"].facts["weights"]["trained"]:
        log.warning(f"{report_mod.UNTRAINED}: {records['load'].facts['weights']['reason']}")
    folder = opts.artifacts / f"{recipe.variant}-{recipe.quant}"
    # Sizes and digests are taken from the export units' files, which publish copies.
    rep = report_mod.build(recipe.variant, recipe.quant, recipe.name, records)
    if stamp and not rep["failed"]:   # a failed format must run again next time
        rep["inputs_stamp"] = stamp["digest"]
    publish(folder, records, rep, report_mod.markdown(rep))
    return rep, folder


def summary(rep: dict, folder: Path) -> str:
    lines = [f"wrote {folder}/"]
    ref = (rep.get("reference") or {}).get("accuracy")
    if ref:
        lines.append(f"  float reference (PyTorch): top-1 {100 * ref['top1']:.2f}% on {ref['n']} images")
    for a in rep["artifacts"]:
        fid, acc = a.get("fidelity") or {}, a.get("accuracy")
        quality = (f"top-1 {100 * acc['top1']:.2f}% on {acc['n']}" if acc else
                   f"agreement {100 * fid['top1_agreement']:.1f}%, SQNR {fid['sqnr_db']:.1f} dB" if fid else "")
        lat = next((l for l in a["latency"] if l["target"].startswith("host (1 ")), None)
        lat_s = f", host {lat['median_ms']:.2f} ms (1 thread, measured)" if lat else ""
        phone = next((l for l in a["latency"] if l["target"].startswith("iPhone")), None)
        if phone:
            err = phone.get("error_ms")
            lat_s += (f", {phone['target']} {phone['median_ms']:.2f} ms ({phone['method']}"
                      + (f", ±{err['loo_mean_abs']:.2f} ms" if err else "")
                      + (", EXTRAPOLATED outside the fitted range" if phone.get("extrapolated") else "") + ")")
        b = a.get("budget") or {}
        budget = ""
        if b.get("met") is not None:
            budget = (f", budget {'met' if b['met'] else 'MISSED'} ({b['drop']:.2f} "
                      f"{'<=' if b['met'] else '>'} {b['max_drop']} {b['unit']})")
        lines.append(f"  {a['format']:7} {a['path']:34} {a['bytes'] / 1e6:7.2f} MB  {quality} "
                     f"[{a['method']}]{lat_s}{budget}")
        versus = a["export"].get("qat_vs_ptq")
        if versus:
            lines.append(f"          shipped: {'QAT' if versus['shipped'] == 'qat' else 'post-training int8'}: "
                         f"{versus['why']}")
    for s in rep["skipped"]:
        lines.append(f"  {s['format']:7} not produced: {s['reason']}")
    for f in rep["failed"]:
        lines.append(f"  {f['format']:7} FAILED in {f['stage']}: {f['error']}\n          {f['what_to_do']}")
    if not rep["weights"]["trained"]:
        lines.append(f"WARNING: {report_mod.UNTRAINED}")
    return "\n".join(lines)


def rewrite_report(folder: Path, report: dict) -> None:
    """Replace a deploy's report.json / report.md (write beside, then rename)."""
    for name, text in (("report.json", json.dumps(report, indent=1, default=str)),
                       ("report.md", report_mod.markdown(report))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)

