"""Fleet config: parsing and field-by-field validation, config files (adapter resolution and relative paths:
tests/test_config_adapters.py)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from fleetconfigs import raw_config, write_config
from safemerge_ray.core import MergeSettings
from safemerge_ray.errors import SafeMergeError
from safemerge_ray.fleet.config import PrefixEntry, load_config, parse_config
from safemerge_ray.io import S3Settings

EXAMPLE = """\
unaligned_model: s3://models/llama-2-7b-hf/      # or a local dir
aligned_model:   s3://models/llama-2-7b-chat-hf/
safety_adapter:  s3://adapters/safety-v3/
finetuned:                                      # explicit dirs and/or prefixes to scan
  - s3://adapters/domains/gsm8k/
  - {prefix: s3://adapters/domains/}            # every adapter dir directly under it
output: s3://merged/fleet-a/
merge: {policy: safemerge, tau: 0.35, weights: [0.8, 0.2], method: linear, density: null, seed: 0}
overrides: {gsm8k: {tau: 0.5}}                   # per-adapter settings, optional
s3: {endpoint_url: null, region: null}           # credentials: the standard AWS chain only
ray: {actors: auto, gpus_per_actor: auto}
"""


def _error(raw, **kw) -> str:
    """parse_config must fail with SafeMergeError, and only with it; returns the message."""
    try:
        parse_config(raw, **kw)
    except SafeMergeError as exc:
        return str(exc)
    except Exception as exc:  # pragma: no cover - the failure message is the point
        pytest.fail(f"parse_config let {type(exc).__name__} escape instead of SafeMergeError: {exc}")
    pytest.fail("parse_config accepted an invalid config")


def _load_error(path) -> str:
    try:
        load_config(path)
    except SafeMergeError as exc:
        return str(exc)
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"load_config let {type(exc).__name__} escape instead of SafeMergeError: {exc}")
    pytest.fail("load_config accepted an invalid config")


def _names_field(message: str, path: str) -> bool:
    """The message names `path` (e.g. "merge.tau"): as the path itself or a sub-path ("merge.weights.1:"), or,
    for checks made by MergeSettings on a whole section, a "merge: ..." line that mentions the field ("tau")."""
    if re.search(rf"(^|\s){re.escape(path)}[:.\s]", message + "\n", re.M):
        return True
    parent, _, leaf = path.rpartition(".")
    return bool(parent) and any(line.strip().startswith(f"{parent}: ") and re.search(rf"\b{re.escape(leaf)}\b", line)
                                for line in message.splitlines())


# --------------------------------------------------------------------------------------------
# The product issue's example
# --------------------------------------------------------------------------------------------


def test_example_config_parses(tmp_path):
    path = write_config(tmp_path / "fleet.yaml", EXAMPLE)
    cfg = load_config(path)

    assert cfg.unaligned_model == "s3://models/llama-2-7b-hf/"
    assert cfg.aligned_model == "s3://models/llama-2-7b-chat-hf/"
    assert cfg.safety_adapter == "s3://adapters/safety-v3/"
    assert cfg.output == "s3://merged/fleet-a/"
    assert cfg.finetuned == ("s3://adapters/domains/gsm8k/", PrefixEntry(prefix="s3://adapters/domains/"))

    expected = MergeSettings(policy="safemerge", tau=0.35, weights=(0.8, 0.2), method="linear", density=None,
                             majority_sign_method="total", seed=0)
    assert cfg.merge == expected
    assert isinstance(cfg.merge.weights, tuple)
    assert set(cfg.overrides) == {"gsm8k"}
    assert cfg.overrides["gsm8k"] == replace(expected, tau=0.5)
    assert cfg.settings_for("gsm8k").tau == 0.5
    assert cfg.settings_for("gsm8k").weights == (0.8, 0.2)  # inherited from merge
    assert cfg.settings_for("medqa") == expected

    assert cfg.s3 == S3Settings(endpoint_url=None, region=None)
    assert cfg.actors is None and cfg.gpus_per_actor is None
    assert cfg.device == "auto"
    assert cfg.source == str(path)


def test_overrides_inherit_from_merge_not_defaults():
    raw = raw_config(merge={"policy": "safelora", "tau": 0.2, "weights": [0.6, 0.4], "method": "ties", "density": 0.5,
                            "seed": 7},
                     overrides={"gsm8k": {"tau": 0.9, "weights": [1.0, 0.0]}, "legal": {"method": "cat"}})
    cfg = parse_config(raw)
    assert cfg.merge == MergeSettings(policy="safelora", tau=0.2, weights=(0.6, 0.4), method="ties", density=0.5,
                                      seed=7)
    assert cfg.overrides["gsm8k"] == replace(cfg.merge, tau=0.9, weights=(1.0, 0.0))
    assert cfg.overrides["legal"] == replace(cfg.merge, method="cat")


def test_explicit_ray_and_s3_settings():
    cfg = parse_config(raw_config(ray={"actors": 3, "gpus_per_actor": 0.5, "device": "cpu"},
                                  s3={"endpoint_url": "http://localhost:9000", "region": "us-east-1"}))
    assert (cfg.actors, cfg.gpus_per_actor, cfg.device) == (3, 0.5, "cpu")
    assert cfg.s3 == S3Settings(endpoint_url="http://localhost:9000", region="us-east-1")


def test_defaults_when_sections_omitted():
    cfg = parse_config(raw_config())
    assert cfg.merge == MergeSettings()
    assert cfg.overrides == {}
    assert cfg.s3 == S3Settings()
    assert cfg.actors is None and cfg.gpus_per_actor is None


# --------------------------------------------------------------------------------------------
# Field-by-field errors
# --------------------------------------------------------------------------------------------


def test_every_bad_field_is_named_in_one_error():
    raw = raw_config(
        aligned_model=...,                          # missing
        colour="blue",                              # unknown top-level key
        merge={"tau": 2, "weights": [0.5, 0.3, 0.2]},  # tau out of range, 3 weights
        ray={"actors": 0},
        finetuned=[],
        overrides={"x": {"bogus": 1}},
    )
    message = _error(raw, source="fleet.yaml")
    assert message.startswith("fleet.yaml")
    missing = [p for p in ("aligned_model", "colour", "merge.tau", "merge.weights", "ray.actors", "finetuned",
                           "overrides.x.bogus") if not _names_field(message, p)]
    assert not missing, f"fields not named in the error: {missing}\n{message}"


def test_merge_and_override_value_errors_are_reported_together():
    message = _error(raw_config(merge={"tau": 2}, overrides={"gsm8k": {"seed": -1}}))
    assert _names_field(message, "merge.tau"), message
    assert _names_field(message, "overrides.gsm8k.seed"), message


BAD_FIELDS = [
    # (field path, changes to BASE)
    ("unaligned_model", dict(unaligned_model=...)),
    ("aligned_model", dict(aligned_model=...)),
    ("output", dict(output=...)),
    ("finetuned", dict(finetuned=...)),
    ("finetuned", dict(finetuned=[])),
    ("finetuned", dict(finetuned="s3://adapters/domains/gsm8k/")),
    ("finetuned.0", dict(finetuned=[42])),
    ("finetuned.1", dict(finetuned=["s3://a/b/", {"prefix": "s3://a/", "name": "x"}])),
    ("finetuned.0", dict(finetuned=[{"pth": "s3://a/b/"}])),
    ("unaligned_model", dict(unaligned_model=["s3://a/"])),
    ("colour", dict(colour="blue")),
    ("merge.bogus", dict(merge={"bogus": 1})),
    ("merge.tau", dict(merge={"tau": 2})),
    ("merge.tau", dict(merge={"tau": -0.1})),
    ("merge.tau", dict(merge={"tau": "high"})),
    ("merge.weights", dict(merge={"weights": [0.5, 0.3, 0.2]})),
    ("merge.weights", dict(merge={"weights": [0.8]})),
    ("merge.weights", dict(merge={"weights": [1.5, 0.2]})),
    ("merge.weights", dict(merge={"weights": [0, 0]})),
    ("merge.policy", dict(merge={"policy": "yolo"})),
    ("merge.method", dict(merge={"method": "average"})),
    ("merge.density", dict(merge={"method": "ties"})),
    ("merge.density", dict(merge={"density": 1.5})),
    ("merge.majority_sign_method", dict(merge={"majority_sign_method": "median"})),
    ("merge.seed", dict(merge={"seed": -1})),
    ("merge.seed", dict(merge={"seed": 1.5})),
    ("merge", dict(merge=[0.35])),
    ("overrides.gsm8k.tau", dict(overrides={"gsm8k": {"tau": 5}})),
    ("overrides.gsm8k.bogus", dict(overrides={"gsm8k": {"bogus": 1}})),
    ("overrides.gsm8k", dict(overrides={"gsm8k": 0.5})),
    ("overrides", dict(overrides=["gsm8k"])),
    ("s3.endpoint", dict(s3={"endpoint": "http://x"})),
    ("s3.region", dict(s3={"region": 5})),
    ("ray.actors", dict(ray={"actors": 0})),
    ("ray.actors", dict(ray={"actors": -2})),
    ("ray.actors", dict(ray={"actors": "many"})),
    ("ray.gpus_per_actor", dict(ray={"gpus_per_actor": -1})),
    ("ray.gpus_per_actor", dict(ray={"gpus_per_actor": 100})),
    ("ray.device", dict(ray={"device": "tpu"})),
    ("ray.workers", dict(ray={"workers": 4})),
    # Keys whose names happen to start with "str", "int" or "float" are named like any other.
    ("strategy", dict(strategy="fast")),
    ("interval", dict(interval=5)),
    ("overrides.integration.bogus", dict(overrides={"integration": {"bogus": 1}})),
    ("overrides.structured.tau", dict(overrides={"structured": {"tau": "x"}})),
]


@pytest.mark.parametrize("field,changes", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)])
def test_single_mistake_names_its_field(field, changes):
    message = _error(raw_config(**changes), source="fleet.yaml")
    assert message.startswith("fleet.yaml"), message
    assert _names_field(message, field), f"{field!r} not named in:\n{message}"


def test_non_mapping_raw_is_a_safemerge_error():
    assert "config" in _error(["not", "a", "mapping"]).lower()
    _error(None)


def test_safemerge_policy_needs_safety_adapter():
    message = _error(raw_config(safety_adapter=..., merge={"policy": "safemerge"}))
    assert "safety_adapter" in message
    # the default policy is safemerge
    assert "safety_adapter" in _error(raw_config(safety_adapter=...))
    # a safemerge override also needs it
    message = _error(raw_config(safety_adapter=..., merge={"policy": "safelora"},
                                overrides={"gsm8k": {"policy": "safemerge"}}))
    assert "safety_adapter" in message


def test_safelora_policy_without_safety_adapter_is_fine():
    cfg = parse_config(raw_config(safety_adapter=..., merge={"policy": "safelora"}))
    assert cfg.safety_adapter is None
    assert cfg.merge.policy == "safelora"


def test_overrides_for_adapters_not_in_the_fleet_parse():
    cfg = parse_config(raw_config(overrides={"not-in-fleet": {"tau": 0.1}}))
    assert cfg.overrides["not-in-fleet"].tau == 0.1
    assert cfg.settings_for("gsm8k") == cfg.merge


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


def test_not_yaml_file(tmp_path):
    path = write_config(tmp_path / "fleet.yaml", "unaligned_model: [unclosed\n  : : {\n")
    message = _load_error(path)
    assert str(path) in message and "YAML" in message


def test_binary_file_is_not_yaml(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01binary\x80\x81")
    message = _load_error(path)
    assert str(path) in message


def test_yaml_list_is_rejected(tmp_path):
    path = write_config(tmp_path / "fleet.yaml", "- s3://a/\n- s3://b/\n")
    message = _load_error(path)
    assert str(path) in message and "mapping" in message


def test_empty_file_is_rejected(tmp_path):
    path = write_config(tmp_path / "fleet.yaml", "")
    assert str(path) in _load_error(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = _load_error(path)
    assert "not found" in message and str(path) in message


def test_directory_instead_of_file(tmp_path):
    message = _load_error(tmp_path)
    assert str(tmp_path) in message


def test_load_config_reports_fields_with_file_name(tmp_path):
    path = write_config(tmp_path / "fleet.yaml", raw_config(merge={"tau": 2}))
    message = _load_error(path)
    assert message.startswith(str(path)) and _names_field(message, "merge.tau")


