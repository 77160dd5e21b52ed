"""One declaration per setting: a pydantic field with its help is both a YAML key and a CLI flag.

`train-safety` and `eval` read a config file, flags, or both (a flag wins over the file); the fleet
config's `gate.eval` section is the same `eval` schema. Every bad field is reported by its path, in
one error, as the fleet config does.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import SafeMergeError
from .storage import S3Settings

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """A config section: unknown keys are errors, and so are booleans where numbers go."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v, info):
        # YAML reads `yes`/`true` as booleans; pydantic would quietly take them as 1.
        if isinstance(v, bool):
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
        default = "" if field.is_required() else f" (default {field.default})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, nargs="+" if many else None,
                            default=None, help=f"{field.description or ''}{default}")


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


BUILT_IN = {"keywords"}  # values of path fields that name something built in (eval's judge), not a file


def relative_to(values: dict, model: type[BaseModel], base: Path) -> dict:
    """A config file's local paths made absolute relative to the file, as the fleet config's are; the model
    names them in its PATHS (field -> "file" for files, "location" for models and adapters, which may be
    hub ids). s3:// stays as written; flags stay relative to the working directory."""
    from .storage import local_or_s3, resolve_location

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
        from .config import _format

        raise SafeMergeError(f"{source}: invalid settings:\n  " + "\n  ".join(_format(exc, data))) from None
