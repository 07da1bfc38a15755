"""Runs an ordered list of stages with content-addressed caching.

Knows nothing of models, formats or runtimes: a stage is a function
``run(config, inputs, out_dir, **other_sections) -> facts`` where ``inputs`` maps the
names of the stages it needs to their output folders, and ``facts`` is JSON data.

Each output lives in ``<cache>/<stage>/<key>/`` where the key hashes the stage name, its
config (and the other sections it reads), its inputs' keys, a fingerprint of the
external content it reads (checkpoint bytes, data listings), library versions and the
source of the code that implements it. Outputs are written in a temporary folder and
renamed into place, under a per-entry file lock: an entry either exists whole or not
at all, whatever kills the process, and concurrent runs never write one entry twice.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline.core import codegraph
from pipeline.core.atomic import staged_dir, staging_prefix
from pipeline.core.config import to_dict
from pipeline.core.hashing import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., dict]
    needs: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()      # other recipe sections passed as keyword arguments
    fingerprint: Optional[Callable[..., dict]] = None
    # Modules whose source is part of the key besides those its functions reach (found
    # from the imports: core/codegraph.py).
    code: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()     # distributions whose versions are part of the key
    uses: tuple[str, ...] = ()          # stages whose output it reads when the recipe runs them
    # Gets ``scratch``: a folder per key that survives an interruption (checkpoints to resume
    # from) and is removed once the entry is complete.
    resumable: bool = False
    section: Optional[str] = None       # the recipe section configuring it (default: its name)
    narrow: Optional[Callable[[Any], Any]] = None   # the part of that section it reads (its key)
    # A failure is recorded and the run goes on (stages needing it are not run); the failed
    # unit is not cached, so the next run redoes only it.
    isolated: bool = False


@dataclass
class StageRecord:
    name: str
    key: str
    cache_hit: bool
    seconds: float
    dir: Optional[Path]
    facts: dict = field(default_factory=dict)
    error: Optional[str] = None         # an isolated stage that failed or could not run


def _versions(libraries: tuple[str, ...]) -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for lib in libraries:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def _function_module(f) -> Optional[str]:
    while isinstance(f, functools.partial):
        f = f.func
    return getattr(f, "__module__", None)


def code_modules(stage: Stage) -> tuple[str, ...]:
    """Where a stage's code starts: the modules of its functions, and ``stage.code``."""
    found = {_function_module(f) for f in (stage.run, stage.fingerprint, stage.narrow) if f is not None}
    return tuple(sorted((found - {None}) | set(stage.code)))


def _code_hash(stage: Stage) -> str:
    """The source of every project module the stage can run (``codegraph``: found from
    the imports, not listed by hand: a module it reaches only indirectly counts too)."""
    return codegraph.digest(code_modules(stage))


def stage_key(stage: Stage, config: Any, others: dict[str, Any], input_keys: dict[str, str],
              fingerprint: dict) -> tuple[str, dict]:
    payload = {"stage": stage.name, "config": to_dict(config),
               "sections": {k: to_dict(v) for k, v in sorted(others.items())},
               "inputs": input_keys, "fingerprint": fingerprint,
               "versions": _versions(stage.libraries), "code": _code_hash(stage)}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], payload


def facts_of(entry: Path) -> dict:
    """The facts a stage recorded in its output folder (what its run returned)."""
    return json.loads((entry / MANIFEST).read_text())["facts"]


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        return (self.entry(stage, key) / MANIFEST).is_file()

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f".{key}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def entries(self) -> list[dict]:
        out = []
        for m in sorted(self.root.glob(f"*/*/{MANIFEST}")):
            data = json.loads(m.read_text())
            size = sum(p.stat().st_size for p in m.parent.rglob("*") if p.is_file())
            out.append({"stage": data["stage"], "key": data["key"], "bytes": size,
                        "created": data["created"], "dir": str(m.parent)})
        return out

    def clean(self, older_than_s: Optional[float] = None) -> int:
        """Remove entries (all, or those created more than ``older_than_s`` ago)."""
        removed = 0
        now = time.time()
        for e in self.entries():
            if older_than_s is None or now - e["created"] > older_than_s:
                with self.lock(e["stage"], e["key"]):
                    shutil.rmtree(e["dir"], ignore_errors=True)
                removed += 1
        for scratch in self.root.glob("*/.*.resume"):   # checkpoints of interrupted runs
            if older_than_s is None or now - scratch.stat().st_mtime > older_than_s:
                shutil.rmtree(scratch, ignore_errors=True)
        return removed


def run_stage(stage: Stage, config: Any, others: dict[str, Any], inputs: dict[str, StageRecord],
              cache: Cache, force: bool = False, position: str = "") -> StageRecord:
    fingerprint = stage.fingerprint(config, **others) if stage.fingerprint else {}
    key, payload = stage_key(stage, config, others, {n: r.key for n, r in inputs.items()}, fingerprint)
    final = cache.entry(stage.name, key)
    label = f"{position}{stage.name:<9}"
    if not force and cache.has(stage.name, key):
        log.info(f"{label} cached   ({key[:12]})")
        return StageRecord(stage.name, key, True, 0.0, final, facts_of(final))
    with cache.lock(stage.name, key):
        if not force and cache.has(stage.name, key):  # another process made it meanwhile
            log.info(f"{label} cached   ({key[:12]}, made by a concurrent run)")
            return StageRecord(stage.name, key, True, 0.0, final, facts_of(final))
        for stale in final.parent.glob(staging_prefix(final) + "*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        with staged_dir(final) as tmp:
            log.info(f"{label} running  ({key[:12]})")
            start = time.perf_counter()
            extra = {}
            if stage.resumable:
                extra["scratch"] = final.parent / f".{key}.resume"
                extra["scratch"].mkdir(exist_ok=True)
            facts = stage.run(config, {n: r.dir for n, r in inputs.items()}, tmp, **others, **extra) or {}
            seconds = time.perf_counter() - start
            outputs = [{"path": str(p.relative_to(tmp)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                       for p in sorted(tmp.rglob("*")) if p.is_file()]
            manifest = {**payload, "key": key, "facts": facts, "outputs": outputs,
                        "seconds": round(seconds, 3), "created": time.time()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if stage.resumable:
            shutil.rmtree(extra["scratch"], ignore_errors=True)
    log.info(f"{label} done in {seconds:.1f} s")
    return StageRecord(stage.name, key, False, seconds, final, facts)


def _section(sections: dict[str, Any], dotted: str) -> Any:
    top, *rest = dotted.split(".")
    value = sections[top]
    for name in rest:
        value = getattr(value, name)
    return value


def run_stages(stages: list[Stage], sections: dict[str, Any], cache: Cache,
               force: set[str] = frozenset(),
               after: Optional[dict[str, Callable[[StageRecord], None]]] = None) -> dict[str, StageRecord]:
    """Run ``stages`` in order. ``force`` names stages, or sections (every stage they configure).
    An isolated stage's failure is recorded in its StageRecord's ``error`` and the run goes
    on without the stages that need it; any other failure raises. ``after[name](record)``
    runs once that stage's record is there (a check of the inputs that needs its output,
    made before the long stages run)."""
    records: dict[str, StageRecord] = {}
    unknown = set(force) - {s.name for s in stages} - {s.section or s.name for s in stages}
    if unknown:
        raise ValueError(f"--force {', '.join(sorted(unknown))}: not a stage of this recipe "
                         f"({', '.join(s.name for s in stages)})")
    for i, stage in enumerate(stages, 1):
        missing = [n for n in stage.needs if n not in records]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {', '.join(missing)} to run before it")
        position = f"[{i}/{len(stages)}] "
        failed = [n for n in stage.needs if records[n].error]
        if failed:
            records[stage.name] = StageRecord(stage.name, "", False, 0.0, None,
                                              error=f"not run: {', '.join(failed)} failed")
            log.warning(f"{position}{stage.name:<9} not run  ({', '.join(failed)} failed)")
            continue
        inputs = {n: records[n] for n in (*stage.needs, *stage.uses) if n in records}
        # A section may be a sub-block ("export.coreml"): passed as its last name.
        others = {s.rsplit(".", 1)[-1]: _section(sections, s) for s in stage.sections}
        config = sections[stage.section or stage.name]
        config = stage.narrow(config) if stage.narrow else config
        forced = stage.name in force or (stage.section or stage.name) in force
        try:
            records[stage.name] = run_stage(stage, config, others, inputs, cache, force=forced,
                                            position=position)
        except Exception as e:
            if not stage.isolated:
                raise
            records[stage.name] = StageRecord(stage.name, "", False, 0.0, None,
                                              error=f"{type(e).__name__}: {e}")
            log.error(f"{position}{stage.name:<9} FAILED   {type(e).__name__}: {e}")
        if after and stage.name in after and not records[stage.name].error:
            after[stage.name](records[stage.name])
    return records
