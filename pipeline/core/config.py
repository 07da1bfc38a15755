"""Recipes: YAML (``yaml.safe_load`` only) -> typed config objects, with errors that name
the file, the line and the fix.

A recipe may ``extends:`` another (a path relative to it, or a shipped recipe name);
its keys override single keys of the parent. ``--set section.key=value`` overrides win
over every file.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Origin:
    """Where a value was written: a file and line, or a command-line override."""
    file: str
    line: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.file} line {self.line}" if self.line else self.file


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# ---------------------------------------------------------------- YAML with line numbers

def _lines(node: yaml.Node, path: tuple, out: dict, file: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = path + (k.value,)
            out[key] = Origin(file, k.start_mark.line + 1)
            _lines(v, key, out, file)


def read_yaml(path: Path) -> tuple[dict, dict[tuple, Origin]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
        origins: dict[tuple, Origin] = {}
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _lines(root, (), origins, str(path))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data, origins


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_recipe_path(name: str | Path, relative_to: Optional[Path] = None) -> Path:
    p = Path(name)
    candidates = [p] if p.is_absolute() else [
        *(([relative_to.parent / p]) if relative_to else []), p, RECIPES_DIR / p,
        RECIPES_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(f.stem for f in RECIPES_DIR.glob("*.yaml"))
    raise RecipeError(f"recipe not found: {name}; shipped recipes: {', '.join(shipped)}")


def load_layers(path: Path, seen: tuple = ()) -> tuple[dict, dict[tuple, Origin]]:
    """A recipe with its ``extends`` chain merged in (parents first)."""
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: 'extends' loops back to itself")
    data, origins = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, origins
    base, base_origins = load_layers(resolve_recipe_path(parent, path), seen + (path,))
    return _merge(base, data), {**base_origins, **origins}


def apply_sets(data: dict, origins: dict, sets: list[str]) -> dict:
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. quantize.calibration_images=128")
        dotted, raw = item.split("=", 1)
        keys = tuple(dotted.split("."))
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        override: Any = value
        for k in reversed(keys):
            override = {k: override}
        data = _merge(data, override)
        origins[keys] = Origin(f"--set {item}")
    return data


# ---------------------------------------------------------------- typed conversion

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp, path: tuple, origins: dict) -> Any:
    where = origins.get(path) or origins.get(path[:-1]) or Origin("defaults")
    dotted = ".".join(path)
    origin = typing.get_origin(tp)

    def bad(extra=""):
        return RecipeError(f"{dotted} = {value!r} ({where}): expected {_type_name(tp)}{extra}")

    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path, origins)
            except RecipeError:
                continue
        raise bad()
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{dotted} = {value!r} ({where}): allowed values are "
                              + ", ".join(repr(a) for a in typing.get_args(tp)))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_convert(v, item, path, origins) for v in value]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return build(tp, value, path, origins)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)   # YAML 1.1 reads "1e-5" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad()
        return str(value)
    return value


def build(cls, data: dict, path: tuple, origins: dict):
    """``cls(**data)`` with every key and value checked against ``cls``'s annotations."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = origins.get(path + (key,)) or Origin("defaults")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            section = ".".join(path) or "the recipe"
            raise RecipeError(f"unknown key {key!r} in {section} ({where}){hint}")
    kwargs = {k: _convert(v, hints[k], path + (k,), origins) for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check:
        try:
            check()
        except ValueError as e:
            raise RecipeError(f"{'.'.join(path)} ({origins.get(path) or Origin('defaults')}): {e}") from None
    return obj


def to_dict(obj) -> Any:
    """Plain data for hashing and reports."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class Recipe:
    """A resolved recipe: the ordered stage names and one typed config per section."""
    name: str
    quant: str
    stages: list[str]
    sections: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    @property
    def variant(self) -> str:
        return self.sections["load"].variant


def load_recipe(path: Path | str, sections: dict[str, type], sets: list[str] = ()) -> Recipe:
    """Read, merge and type-check a recipe. ``sections`` maps section names to their
    config classes."""
    path = resolve_recipe_path(path)
    data, origins = load_layers(path)
    data = apply_sets(data, origins, list(sets))
    allowed = {"name", "quant", "stages", "description", *sections}
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known sections: {', '.join(sorted(allowed))}"
            raise RecipeError(f"unknown section {key!r} ({origins.get((key,)) or path}){hint}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise RecipeError(f"{path}: 'stages' must list the stages in order, e.g. [load, reparam, ...]")
    for s in stages:
        if s not in sections:
            close = difflib.get_close_matches(s, list(sections), n=1)
            raise RecipeError(f"unknown stage {s!r} ({origins.get(('stages',)) or path})"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
    built = {}
    for name, cls in sections.items():
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise RecipeError(f"section {name!r} ({origins.get((name,))}) must be a mapping")
        built[name] = build(cls, section, (name,), origins)
    return Recipe(name=str(data.get("name") or path.stem), quant=str(data.get("quant", "fp32")),
                  stages=stages, sections=built,
                  sources=sorted({o.file for o in origins.values()}))
