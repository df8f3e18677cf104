"""The one loader of training recipes: YAML file (or a packaged recipe's name) + dotted overrides -> TrainConfig.

`load_recipe(path_or_name, overrides)` reads the YAML mapping, applies command-line overrides (`optim.lr=1e-5`),
and builds the frozen dataclasses of bidir_train.config. Unknown keys are errors that name the nearest valid key;
every value is checked against its field's type (a `Literal`: one of its choices), then by the section's own
checks; every error is one line that names the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import yaml

from bidir_core.errors import BidirError
from bidir_train.config import TrainConfig

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # installed: package data


def recipe_path(path_or_name: str | Path) -> Path:
    """A recipe file path, or the name of a packaged recipe ("default", "tiny", ...)."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    for folder in (RECIPES_DIR, Path(__file__).resolve().parents[2] / "recipes"):  # installed, then the repo
        candidate = folder / f"{path_or_name}.yaml"
        if "/" not in str(path_or_name) and candidate.is_file():
            return candidate
    known = ", ".join(available_recipes()) or "none found"
    raise BidirError(f"{path_or_name}: no such recipe file or packaged recipe (packaged: {known})")


def available_recipes() -> list[str]:
    for folder in (RECIPES_DIR, Path(__file__).resolve().parents[2] / "recipes"):
        if folder.is_dir():
            return sorted(p.stem for p in folder.glob("*.yaml"))
    return []


def load_recipe(path_or_name: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (a path or a packaged recipe's name), apply `section.key=value` overrides, and build
    the TrainConfig. Raises BidirError naming the file and key on an unknown key or a value of the wrong type."""
    path = recipe_path(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BidirError(f"{path}: not a readable YAML file ({' '.join(str(e).split())})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BidirError(f"{path}: a recipe is a mapping of sections, got a {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for override in overrides:
        _apply_override(raw, override)
    return _build(TrainConfig, raw, str(path))


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise BidirError(f"override {override!r}: expected section.key=value, e.g. optim.lr=1e-5")
    value = _Override(text)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BidirError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


class _Override(str):
    """A command-line value, typed once its field is known: YAML for numbers, lists, booleans and null; the text
    as typed (trailing spaces included) for a string field."""

    def typed(self, kind):
        try:
            parsed = yaml.safe_load(self) if self.strip() else None
        except yaml.YAMLError:
            parsed = str(self)  # a plain string that is not valid YAML on its own
        quoted = self.strip()[:1] in ("'", '"')
        if parsed is not None and not quoted and _accepts_str(kind):
            return str(self)
        return parsed


def _accepts_str(kind) -> bool:
    """str, a union with str (str | None) or a choice of strings; not tuple[str, ...], whose override is a YAML
    list."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    union = origin in (typing.Union, types.UnionType)
    choice = origin is typing.Literal and any(isinstance(a, str) for a in args)
    return kind is str or choice or (union and str in args)


def _build(cls, raw: dict, where: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise BidirError(f"{where}: {prefix.rstrip('.') or 'recipe'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f" (valid: {', '.join(names)})"
            raise BidirError(f"{where}: unknown key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        kind, value = hints[name], raw[name]
        if isinstance(value, _Override):
            value = value.typed(kind)
        section = _section_type(kind)
        if section is not None and (value is not None or section is kind):
            values[name] = _build(section, value or {}, where, f"{prefix}{name}.")
        elif section is not None:  # an optional section set to null: off
            values[name] = None
        else:
            values[name] = _check_value(kind, value, where, f"{prefix}{name}")
    try:
        return cls(**values)  # the section's own range checks (__post_init__)
    except BidirError as e:
        raise BidirError(f"{where}: {e}") from None


def _section_type(kind):
    """The dataclass of a section field (`LossConfig`, or `LoraConfig | None`: an optional section), else None."""
    if dataclasses.is_dataclass(kind):
        return kind
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0] if dataclasses.is_dataclass(args[0]) else None
    return None


def _check_value(kind, value, where: str, key: str):
    """value as the field type `kind` (int, float, bool, str, X | None, tuple[X, ...], tuple[X, Y]), or raise."""
    ok, out = _coerce(kind, value)
    if not ok:
        raise BidirError(f"{where}: {key} must be {_type_name(kind)}, got {value!r}")
    if any(
        isinstance(v, float) and not math.isfinite(v) for v in (out if isinstance(out, tuple) else (out,))
    ):
        raise BidirError(f"{where}: {key} must be a finite number, got {value!r}")
    return out


def _coerce(kind, value):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _coerce(arg, value)
            if ok:
                return True, out
        return False, None
    if kind is type(None):
        return value is None, None
    if origin is typing.Literal:
        return value in args, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, None
        items = args if not (len(args) == 2 and args[1] is Ellipsis) else (args[0],) * len(value)
        if len(items) != len(value):
            return False, None
        out = [_coerce(a, v) for a, v in zip(items, value, strict=True)]
        return all(ok for ok, _ in out), tuple(v for _, v in out)
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if kind is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config field type {kind}")


def _type_name(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if kind is type(None):
        return "null"
    if origin is typing.Literal:
        return f"one of {', '.join(args)}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list [{', '.join(_type_name(a) for a in args)}]"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
