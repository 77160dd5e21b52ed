"""One declaration per setting: a pydantic field with its help is both a YAML key and a CLI flag.

`train-safety` and `eval` read a config file, flags, or both (a flag wins over the file); the fleet
config's `gate.eval` section is the same `eval` schema. Every bad field is reported by its path, in
one error, as the fleet config does.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .core import FIELD_CHECKS, SELECTION_FIELDS, MergeSettings, Selection
from .errors import SafeMergeError
from .io import S3Settings, local_or_s3, resolve_location

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """A config section: unknown keys are errors, and so are booleans where numbers go."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v, info):
        # YAML reads `yes`/`true` as booleans; pydantic would quietly take them as 1.
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError("expected a number or string, got a boolean")
        return v


class S3Section(Strict):
    """`s3:` in a config file: where S3 is (credentials come from boto3's standard chain)."""

    endpoint_url: str | None = None
    region: str | None = None
    # botocore's standard retry mode: attempts per request, with exponential backoff (at most 20 s a wait)
    # on 5xx, SlowDown, throttling and connection errors; after them a module's read is tried again 3 times.
    max_attempts: int = 8

    @field_validator("max_attempts")
    @classmethod
    def _attempts(cls, v):
        if not 1 <= v <= 20:
            raise ValueError("must be an integer from 1 to 20")
        return v

    def settings(self) -> S3Settings:
        return S3Settings(endpoint_url=self.endpoint_url, region=self.region, max_attempts=self.max_attempts)


def _flag_type(annotation) -> tuple[Any, bool] | None:
    """(argparse type, is a list) for a field's annotation; None: not a flag (a nested section)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        scalars = [a for a in args if a in (str, int, float, bool)]
        if len(args) == 1:
            return _flag_type(args[0])
        if str in scalars or typing.Literal in [typing.get_origin(a) for a in args]:
            return str, False  # "auto" | 4 style fields: pydantic converts the string
        return (scalars[0], False) if scalars else None
    if origin is list:
        return ((args[0], True) if args and args[0] in (str, int, float) else None)
    if origin is typing.Literal:
        return str, False
    if annotation in (str, int, float):
        return annotation, False
    if annotation is bool:
        return _boolean, False
    return None


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """`--the-field VALUE` for every scalar or list field of `model`, with the field's description as help."""
    parser.add_argument("--config", default=None, help="a YAML file of these settings (flags override it)")
    for name, field in model.model_fields.items():
        kind = _flag_type(field.annotation)
        if kind is None:
            continue  # a nested section: the config file only
        typ, many = kind
        help = field.description or ""
        shown = not field.is_required() and field.default is not None and "default" not in help
        choices = _literal_choices(field.annotation)  # listed, and checked with the rest (one error for all)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, nargs="+" if many else None,
                            default=None, metavar="{" + ",".join(choices) + "}" if choices else None,
                            help=help + (f" (default {field.default})" if shown else ""))


def _literal_choices(annotation) -> list[str] | None:
    """The values of a `Literal[...]` field (alone, not beside other types): what `--help` lists."""
    return [str(v) for v in typing.get_args(annotation)] if typing.get_origin(annotation) is typing.Literal else None


def load_settings(model: type[M], args: argparse.Namespace | None = None, config: str | Path | None = None,
                  raw: dict | None = None, source: str | None = None) -> M:
    """The settings from a YAML file (or `raw`), with the flags that were given on top; one error for all."""
    data: dict = dict(raw or {})
    path = config if config is not None else getattr(args, "config", None)
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise SafeMergeError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SafeMergeError(f"{path}: cannot read config ({exc})") from None
        if not isinstance(loaded, dict):
            raise SafeMergeError(f"{path}: expected a mapping of settings at the top level")
        data.update(relative_to(loaded, model, Path(path).parent))
    if args is not None:
        data.update({name: getattr(args, name) for name in model.model_fields
                     if getattr(args, name, None) is not None})
    return validate(model, data, source or str(path or "flags"))


BUILT_IN = {"refusal", "keywords"}  # values of path fields that name something built in (eval's judge), not a file


def relative_to(values: dict, model: type[BaseModel], base: Path) -> dict:
    """A config file's local paths made absolute relative to the file, as the fleet config's are; the model
    names them in its PATHS (field -> "file" for files, "location" for models and adapters, which may be
    hub ids). s3:// stays as written; flags stay relative to the working directory."""
    out = dict(values)
    for name, kind in getattr(model, "PATHS", {}).items():
        value = out.get(name)
        if isinstance(value, str) and value not in BUILT_IN:
            out[name] = local_or_s3(value, base) if kind == "file" else resolve_location(value, base)
    return out


def validate(model: type[M], data: dict, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SafeMergeError(f"{source}: invalid settings:\n  " + "\n  ".join(validation_problems(exc, data, model))) \
            from None


def _field_path(raw, loc: tuple) -> str:
    """The user's path to a field: pydantic's loc less its type labels (union members, validators)."""
    parts, node = [], raw
    for i, p in enumerate(loc):
        if isinstance(node, dict) and p in node or isinstance(node, list) and isinstance(p, int) and p < len(node):
            parts.append(str(p))
            node = node[p]
        elif i == len(loc) - 1:  # a missing field's name
            parts.append(str(p))
    return ".".join(parts) or "(top level)"


def validation_problems(exc: ValidationError, raw: dict, model: type[BaseModel] | None = None) -> list[str]:
    """Every problem pydantic found, one line each, by the field's path in what the user wrote (and, for a key
    that does not exist, the key it is most like: `merge.tua` -> did you mean tau?)."""
    return sorted({f"{_field_path(raw, err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                   + (_did_you_mean(model, err["loc"]) if err["type"] == "extra_forbidden" and model else "")
                   for err in exc.errors()})


def _did_you_mean(model: type[BaseModel], loc: tuple) -> str:
    """` (did you mean tau?)` for an unknown key at `loc`, from the fields of the section it is in."""
    section: Any = model
    for part in loc[:-1]:
        if isinstance(part, str) and isinstance(section, type) and issubclass(section, BaseModel):
            field = section.model_fields.get(part)
            if field is not None:  # else a key of a dict section (`overrides.NAME`): the section stays
                section = _section_type(field.annotation)
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _section_type(annotation) -> Any:
    """The config section a field holds: itself, or the model inside `X | None`, `dict[str, X]`, `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((inner for arg in typing.get_args(annotation) if (inner := _section_type(arg)) is not None), None)


# --------------------------------------------------------------------------- the merge settings
# MergeSettings (core/settings.py) declares each merge setting once; the fleet config's sections and
# `merge`'s flags are made from its fields here. The selection pair (select, select_value) is one key in a
# config file (`select: {top_k: 3}` or `select: threshold`) and exclusive flags on the command line.
SELECTION_FLAGS: dict[Selection, tuple[type, str, str]] = {  # the value's type, metavar and help
    Selection.TOP_K: (int, "K", "repair the K layers with the lowest rho instead of those below tau"),
    Selection.FRACTION: (float, "F", "repair the ceil(F x layers) layers with the lowest rho instead of those below "
                                     "tau"),
}


def _check_merge_field(cls, v, info):
    if v is not None:
        FIELD_CHECKS[info.field_name](tuple(v) if isinstance(v, (list, tuple)) else v)
    return v


def merge_section(name: str, inherit: bool) -> type[Strict]:
    """The `merge:` section of a fleet config (the settings' defaults), or with `inherit` an `overrides.NAME`
    section (every field optional: what is not given comes from `merge:`)."""
    hints = typing.get_type_hints(MergeSettings)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(MergeSettings):
        help = f.metadata["help"]
        if f.name == "select":
            fields[f.name] = (str | dict[str, float] | None, Field(None, description=f"{help}: {{top_k: K}}, "
                                                                          "{fraction: F} or threshold"))
        elif f.name not in SELECTION_FIELDS:
            fields[f.name] = ((hints[f.name] | None, Field(None, description=help)) if inherit
                              else (hints[f.name], Field(f.default, description=help)))
    validators: dict[str, Any] = {"_check": field_validator(*FIELD_CHECKS)(classmethod(_check_merge_field))}
    return create_model(name, __base__=Strict, __validators__=validators, **fields)


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.8,0.2; got {text!r}") from None


def add_merge_flags(parser: argparse.ArgumentParser) -> None:
    """`--tau`, `--weights`, ... from MergeSettings' fields (their defaults and help), and the selections as
    exclusive flags (`--top-k K`, `--fraction F`)."""
    hints = typing.get_type_hints(MergeSettings)
    for f in dataclasses.fields(MergeSettings):
        if f.name in SELECTION_FIELDS:
            continue
        kind = _weights if f.name == "weights" else next(
            t for t in (int, float, str) if t in (hints[f.name], *typing.get_args(hints[f.name])))
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        default = "" if f.default is None else f" (default {shown})"
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, metavar=f.metadata["metavar"],
                            help=f"{f.metadata['help']}{default}")
    chosen = parser.add_mutually_exclusive_group()
    for selection, (kind, metavar, help) in SELECTION_FLAGS.items():
        chosen.add_argument(f"--{selection.replace('_', '-')}", type=kind, default=None, metavar=metavar, help=help)


def merge_settings(args: argparse.Namespace) -> MergeSettings:
    """MergeSettings from `add_merge_flags`' flags: what is not given keeps its default."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MergeSettings)
             if f.name not in SELECTION_FIELDS and getattr(args, f.name, None) is not None}
    for selection in SELECTION_FLAGS:
        value = getattr(args, selection.value)
        if value is not None:
            if "tau" in given:
                raise SafeMergeError(f"--tau and --{selection.replace('_', '-')} exclude each other: tau selects the "
                                     f"layers below it, {selection} selects by rank")
            given.update(select=selection.value, select_value=value)
    if "weights" in given:
        given["weights"] = tuple(given["weights"])
    return MergeSettings(**given)
