"""Fleet config (YAML) -> validated objects. Every bad field is reported, by its path, in one error.

Importing it imports no Ray: a config is read and checked before anything starts (and by `submit`, which
never runs the fleet itself)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias

import yaml
from pydantic import Field, ValidationError, field_validator

from ..core import MergeSettings, PolicyName
from ..errors import SafeMergeError
from ..io import S3Settings, local_or_s3, open_dir, resolve_location
from ..loop import GateSection
from ..options import S3Section, Strict, merge_section, relative_to, validation_problems
from ..service import MetricsSection, TrackingSection
from ..store import check_adapter_name

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int) -> int:
    """'12GiB', '800MB', '1.5 GB' or a number of bytes -> bytes (positive)."""
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.fullmatch(value)
        if not m:
            raise ValueError(f"expected a size such as 12GiB, 800MB or a number of bytes; got {value!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if n <= 0:
        raise ValueError("must be a positive size")
    return n


# The merge settings' sections, made from MergeSettings' fields (one declaration: core/settings.py).
if TYPE_CHECKING:  # made at run time: to the type checker, config sections like any other
    MergeSection: TypeAlias = Strict
    OverrideSection: TypeAlias = Strict
else:
    MergeSection = merge_section("MergeSection", inherit=False)
    OverrideSection = merge_section("OverrideSection", inherit=True)


class PrefixEntry(Strict):
    prefix: str


class NamedEntry(Strict):
    path: str
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v):
        return None if v is None else check_adapter_name(v)


class RaySection(Strict):
    actors: Literal["auto"] | int = "auto"
    gpus_per_actor: Literal["auto"] | float = "auto"
    cpus_per_actor: Literal["auto"] | int = "auto"  # auto: the cluster's CPUs / actors (CPU), 1 (GPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    start_timeout_s: float = 900.0  # how long the workers may take to be placed (autoscaling included)
    # Memory each worker may use ("12GiB", "800MB" or bytes); Ray reserves it for the actor. Unset: the
    # cluster's memory resource shared among the workers. Checked against the plan before scoring.
    memory_per_worker: str | int | None = None

    @field_validator("memory_per_worker")
    @classmethod
    def _size(cls, v):
        return None if v is None else parse_bytes(v)

    @field_validator("actors", "cpus_per_actor")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be 'auto' or a positive integer")
        return v

    @field_validator("start_timeout_s")
    @classmethod
    def _positive_timeout(cls, v):
        if not v > 0:
            raise ValueError("must be a positive number of seconds")
        return v

    @field_validator("gpus_per_actor")
    @classmethod
    def _non_negative(cls, v):
        if v != "auto" and not (0 <= v <= 8):
            raise ValueError("must be 'auto' or a number in [0, 8]")
        return v


class FleetSchema(Strict):
    unaligned_model: str
    aligned_model: str
    safety_adapter: str | None = None
    finetuned: list[str | PrefixEntry | NamedEntry] = Field(min_length=1)
    output: str
    merge: MergeSection = MergeSection()
    overrides: dict[str, OverrideSection] = {}
    s3: S3Section = S3Section()
    ray: RaySection = RaySection()
    # The whole run's deadline: past it, scoring stops, unfinished adapters fail (their pointers stay),
    # what is finished is committed, and the run ends with exit status 1 or 3. Unset: no deadline.
    max_run_seconds: float | None = None
    # An evaluation every repaired adapter must pass to be published (README: the gate). Unset: no gate.
    gate: GateSection | None = None
    # How often a run re-reads and re-hashes what it would leave unchanged (the nightly check compares version
    # tags only: damage that keeps size and mtime is found by this): never, daily, weekly or always.
    verify_published: Literal["never", "daily", "weekly", "always"] = "never"
    # Each run's metrics to a Prometheus Pushgateway, and each run to MLflow (README: monitoring). Unset: off.
    metrics: MetricsSection | None = None
    tracking: TrackingSection | None = None
    # A command run after every commit, with the run record as JSON on stdin (README: serving). Its failure
    # is reported (exit status 1), and never un-publishes.
    on_publish: list[str] | str | None = None

    @field_validator("max_run_seconds")
    @classmethod
    def _positive_deadline(cls, v):
        if v is not None and not v > 0:
            raise ValueError("must be a positive number of seconds")
        return v

    @field_validator("overrides", mode="before")
    @classmethod
    def _empty_overrides(cls, v):
        return {} if v is None else v  # `overrides:` with nothing under it


@dataclass(frozen=True)
class AdapterRef:
    name: str
    uri: str


@dataclass(frozen=True)
class FleetConfig:
    unaligned_model: str
    aligned_model: str
    safety_adapter: str | None
    finetuned: tuple  # of str | PrefixEntry | NamedEntry, resolved by `resolve_adapters`
    output: str
    merge: MergeSettings
    overrides: dict[str, MergeSettings]
    s3: S3Settings
    actors: int | None  # None: auto
    gpus_per_actor: float | None  # None: auto
    cpus_per_actor: int | None  # None: auto
    device: str
    source: str = "<config>"
    start_timeout_s: float = 900.0
    memory_per_worker: int | None = None  # bytes; None: the cluster's memory resource / workers
    max_run_seconds: float | None = None
    gate: GateSection | None = None  # its file paths absolute
    verify_published: str = "never"  # never | daily | weekly | always (`fleet --verify-published`: always)
    metrics: MetricsSection | None = None
    tracking: TrackingSection | None = None
    on_publish: tuple[str, ...] | None = None  # argv; a string in the config runs through `sh -c`

    def settings_for(self, adapter: str) -> MergeSettings:
        return self.overrides.get(adapter, self.merge)

    def resolve_adapters(self) -> list[AdapterRef]:
        return self.scan_adapters()[0]

    def scan_adapters(self) -> tuple[list[AdapterRef], list[str]]:
        """Explicit entries and every directory directly under each prefix; names must be unique.

        Also returns what was skipped under a prefix: a directory whose name cannot be an adapter's
        (`_staging`, `..`, 300 characters), and a symbolic link (it is followed only when the config names it)
        are left out and reported, not fatal to the fleet."""
        refs: list[AdapterRef] = []
        skipped: list[str] = []
        for entry in self.finetuned:
            if isinstance(entry, PrefixEntry):
                base = open_dir(entry.prefix, what=f"finetuned prefix {entry.prefix}", s3=self.s3)
                skipped += [f"finetuned: skipped {_join(entry.prefix, link)}: a symbolic link, not followed under a "
                            "prefix; name it as an entry of its own to use it" for link in base.links()]
                for sub in base.subdirs():
                    uri = _join(entry.prefix, sub)
                    try:
                        check_adapter_name(sub)
                    except ValueError as exc:
                        skipped.append(f"finetuned: skipped {uri}: {exc}")
                        continue
                    if self.safety_adapter is None or _norm(uri) != _norm(self.safety_adapter):
                        refs.append(AdapterRef(sub, uri))
            elif isinstance(entry, NamedEntry):
                refs.append(AdapterRef(entry.name or _last_component(entry.path), entry.path))
            else:
                refs.append(AdapterRef(_last_component(entry), entry))
        seen: dict[str, str] = {}
        for ref in refs:
            try:
                check_adapter_name(ref.name)
            except ValueError as exc:
                raise SafeMergeError(f"{self.source}: finetuned: {ref.uri}: {exc}") from None
            if ref.name in seen and _norm(seen[ref.name]) != _norm(ref.uri):
                raise SafeMergeError(
                    f"{self.source}: finetuned: two adapters are named {ref.name!r} ({seen[ref.name]} and {ref.uri}); "
                    "give one a name with {name: ..., path: ...}"
                )
            seen[ref.name] = ref.uri
        unique = {ref.name: ref for ref in refs}
        return sorted(unique.values(), key=lambda r: r.name), skipped


def _norm(uri: str) -> str:
    return uri.rstrip("/")


def _last_component(uri: str) -> str:
    return _norm(uri).rsplit("/", 1)[-1]


def _join(prefix: str, name: str) -> str:
    return f"{_norm(prefix)}/{name}"


def load_config(path: str | Path) -> FleetConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SafeMergeError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SafeMergeError(f"{path}: not valid YAML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SafeMergeError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(raw, dict):
        raise SafeMergeError(f"{path}: expected a mapping of settings at the top level")
    return parse_config(raw, source=str(path), base=path.parent)


def portable_config(path: str | Path) -> tuple[FleetConfig, str]:
    """The config, and its YAML with every local path made absolute: what a job on a cluster reads."""
    config = load_config(path)
    raw = yaml.safe_load(Path(path).read_text())
    raw.update(unaligned_model=config.unaligned_model, aligned_model=config.aligned_model,
               safety_adapter=config.safety_adapter, output=config.output,
               finetuned=[e if isinstance(e, str) else e.model_dump(exclude_none=True) for e in config.finetuned])
    if config.gate is not None:
        raw["gate"] = config.gate.model_dump(mode="json", exclude_none=True)
    return config, yaml.safe_dump(raw, sort_keys=False)


def parse_config(raw: dict, source: str = "<config>", base: Path = Path(".")) -> FleetConfig:
    try:
        schema = FleetSchema.model_validate(raw)
    except ValidationError as exc:
        found = validation_problems(exc, raw, FleetSchema)
        raise SafeMergeError(f"{source}: invalid config:\n  " + "\n  ".join(found)) from None
    # Overrides are checked against the (valid) merge section they inherit from.
    # Fields are valid one by one now; what is left are rules across fields (a method's density, both
    # weights zero), and overrides are checked against the merge section they inherit from.
    problems: list[str] = []
    merge = _settings(MergeSettings(), schema.merge.model_dump(), "merge", problems)
    overrides: dict[str, MergeSettings | None] = {}
    for name, section in schema.overrides.items():
        given = {k: v for k, v in section.model_dump().items() if v is not None}
        if merge is not None:
            overrides[name] = _settings(merge, given, f"overrides.{name}", problems)
    if schema.safety_adapter is None and (merge and merge.policy == PolicyName.SAFEMERGE
                                          or any(o and o.policy == PolicyName.SAFEMERGE for o in overrides.values())):
        problems.append("safety_adapter: required when a policy is safemerge")
    if problems:
        raise SafeMergeError(f"{source}: invalid config:\n  " + "\n  ".join(problems))
    assert merge is not None  # None only with problems, raised above
    valid_overrides = {name: o for name, o in overrides.items() if o is not None}

    def local(p):  # absolute before anything travels to a worker, whose working directory differs
        return resolve_location(p, base)

    finetuned = tuple(
        PrefixEntry(prefix=local_or_s3(e.prefix, base)) if isinstance(e, PrefixEntry)  # a prefix is listed
        else NamedEntry(path=local(e.path), name=e.name) if isinstance(e, NamedEntry)
        else local(e)
        for e in schema.finetuned
    )
    config = FleetConfig(
        unaligned_model=local(schema.unaligned_model), aligned_model=local(schema.aligned_model),
        safety_adapter=local(schema.safety_adapter) if schema.safety_adapter else None,
        finetuned=finetuned, output=local_or_s3(schema.output, base), merge=merge, overrides=valid_overrides,
        s3=schema.s3.settings(),
        actors=None if schema.ray.actors == "auto" else schema.ray.actors,
        gpus_per_actor=None if schema.ray.gpus_per_actor == "auto" else schema.ray.gpus_per_actor,
        cpus_per_actor=None if schema.ray.cpus_per_actor == "auto" else schema.ray.cpus_per_actor,
        device=schema.ray.device, source=source, start_timeout_s=schema.ray.start_timeout_s,
        memory_per_worker=schema.ray.memory_per_worker,  # type: ignore[arg-type]  # bytes after validation
        max_run_seconds=schema.max_run_seconds, gate=_gate_paths(schema.gate, base),
        verify_published=schema.verify_published, metrics=schema.metrics, tracking=schema.tracking,
        on_publish=_command(schema.on_publish),
    )
    _check_output_apart(config)
    if _norm(config.unaligned_model) == _norm(config.aligned_model):
        raise SafeMergeError(f"{source}: unaligned_model and aligned_model are the same ({config.aligned_model}): "
                             "V = 0 everywhere; unaligned_model is the aligned model's pre-alignment base")
    return config


def _command(value: list[str] | str | None) -> tuple[str, ...] | None:
    if not value:
        return None
    return ("sh", "-c", value) if isinstance(value, str) else tuple(value)


def _check_output_apart(config: FleetConfig) -> None:
    """The output may not be inside an input: under a scanned prefix it would become an adapter of its own
    fleet (and fail every night), inside a model or an adapter it would write into what it reads."""
    inputs = [("unaligned_model", config.unaligned_model), ("aligned_model", config.aligned_model),
              ("safety_adapter", config.safety_adapter)]
    inputs += [("finetuned", e.prefix if isinstance(e, PrefixEntry) else e.path if isinstance(e, NamedEntry) else e)
               for e in config.finetuned]
    output = _norm(config.output)
    for key, location in inputs:
        if location and (output == _norm(location) or output.startswith(_norm(location) + "/")):
            raise SafeMergeError(f"{config.source}: output {config.output} is inside the input {key} ({location}); "
                                 "give the output a place of its own")


def _gate_paths(gate: GateSection | None, base: Path) -> GateSection | None:
    """The gate's prompt files and classifier made absolute (relative to the config), as the models are."""
    if gate is None:
        return None
    spec = gate.eval
    paths = relative_to(spec.model_dump(include=set(spec.PATHS)), type(spec), base)
    return gate.model_copy(update={"eval": spec.model_copy(update=paths)})


def _settings(base: MergeSettings, fields: dict, where: str, problems: list[str]) -> MergeSettings | None:
    if "weights" in fields and fields["weights"] is not None:
        fields["weights"] = tuple(fields["weights"])
    select = fields.pop("select", None)
    if isinstance(select, str):  # `select: threshold`
        fields.update(select=select, select_value=None)
    elif isinstance(select, dict):  # `select: {top_k: 3}`
        if len(select) != 1:
            problems.append(f"{where}.select: give one of {{top_k: K}}, {{fraction: F}} or threshold")
            return None
        ((mode, value),) = select.items()
        fields.update(select=mode, select_value=value)
    try:
        return replace(base, **fields)
    except SafeMergeError as exc:
        problems.append(f"{where}: {exc}")
        return None
