"""Fleet config: parsing, field-by-field validation, adapter resolution, relative paths."""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from safemerge_ray.core import MergeSettings
from safemerge_ray.errors import SafeMergeError
from safemerge_ray.fleet.config import AdapterRef, PrefixEntry, load_config, parse_config
from safemerge_ray.io import S3Settings
from safemerge_ray.synthetic import SynthSpec, build_fixture, write_fleet_config

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

# A minimal valid config (s3 paths: nothing on disk is consulted while parsing).
BASE = {
    "unaligned_model": "s3://models/base/",
    "aligned_model": "s3://models/chat/",
    "safety_adapter": "s3://adapters/safety/",
    "finetuned": ["s3://adapters/domains/gsm8k/"],
    "output": "s3://merged/out/",
}


def _raw(**changes) -> dict:
    """BASE with top-level keys replaced; a value of `...` deletes the key."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


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
    path = _write(tmp_path / "fleet.yaml", EXAMPLE)
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
    raw = _raw(merge={"policy": "safelora", "tau": 0.2, "weights": [0.6, 0.4], "method": "ties", "density": 0.5,
                      "seed": 7},
               overrides={"gsm8k": {"tau": 0.9, "weights": [1.0, 0.0]}, "legal": {"method": "cat"}})
    cfg = parse_config(raw)
    assert cfg.merge == MergeSettings(policy="safelora", tau=0.2, weights=(0.6, 0.4), method="ties", density=0.5,
                                      seed=7)
    assert cfg.overrides["gsm8k"] == replace(cfg.merge, tau=0.9, weights=(1.0, 0.0))
    assert cfg.overrides["legal"] == replace(cfg.merge, method="cat")


def test_explicit_ray_and_s3_settings():
    cfg = parse_config(_raw(ray={"actors": 3, "gpus_per_actor": 0.5, "device": "cpu"},
                            s3={"endpoint_url": "http://localhost:9000", "region": "us-east-1"}))
    assert (cfg.actors, cfg.gpus_per_actor, cfg.device) == (3, 0.5, "cpu")
    assert cfg.s3 == S3Settings(endpoint_url="http://localhost:9000", region="us-east-1")


def test_defaults_when_sections_omitted():
    cfg = parse_config(_raw())
    assert cfg.merge == MergeSettings()
    assert cfg.overrides == {}
    assert cfg.s3 == S3Settings()
    assert cfg.actors is None and cfg.gpus_per_actor is None


# --------------------------------------------------------------------------------------------
# Field-by-field errors
# --------------------------------------------------------------------------------------------


def test_every_bad_field_is_named_in_one_error():
    raw = _raw(
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
    message = _error(_raw(merge={"tau": 2}, overrides={"gsm8k": {"seed": -1}}))
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
    message = _error(_raw(**changes), source="fleet.yaml")
    assert message.startswith("fleet.yaml"), message
    assert _names_field(message, field), f"{field!r} not named in:\n{message}"


def test_non_mapping_raw_is_a_safemerge_error():
    assert "config" in _error(["not", "a", "mapping"]).lower()
    _error(None)


def test_safemerge_policy_needs_safety_adapter():
    message = _error(_raw(safety_adapter=..., merge={"policy": "safemerge"}))
    assert "safety_adapter" in message
    # the default policy is safemerge
    assert "safety_adapter" in _error(_raw(safety_adapter=...))
    # a safemerge override also needs it
    message = _error(_raw(safety_adapter=..., merge={"policy": "safelora"},
                          overrides={"gsm8k": {"policy": "safemerge"}}))
    assert "safety_adapter" in message


def test_safelora_policy_without_safety_adapter_is_fine():
    cfg = parse_config(_raw(safety_adapter=..., merge={"policy": "safelora"}))
    assert cfg.safety_adapter is None
    assert cfg.merge.policy == "safelora"


def test_overrides_for_adapters_not_in_the_fleet_parse():
    cfg = parse_config(_raw(overrides={"not-in-fleet": {"tau": 0.1}}))
    assert cfg.overrides["not-in-fleet"].tau == 0.1
    assert cfg.settings_for("gsm8k") == cfg.merge


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


def test_not_yaml_file(tmp_path):
    path = _write(tmp_path / "fleet.yaml", "unaligned_model: [unclosed\n  : : {\n")
    message = _load_error(path)
    assert str(path) in message and "YAML" in message


def test_binary_file_is_not_yaml(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01binary\x80\x81")
    message = _load_error(path)
    assert str(path) in message


def test_yaml_list_is_rejected(tmp_path):
    path = _write(tmp_path / "fleet.yaml", "- s3://a/\n- s3://b/\n")
    message = _load_error(path)
    assert str(path) in message and "mapping" in message


def test_empty_file_is_rejected(tmp_path):
    path = _write(tmp_path / "fleet.yaml", "")
    assert str(path) in _load_error(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = _load_error(path)
    assert "not found" in message and str(path) in message


def test_directory_instead_of_file(tmp_path):
    message = _load_error(tmp_path)
    assert str(tmp_path) in message


def test_load_config_reports_fields_with_file_name(tmp_path):
    path = _write(tmp_path / "fleet.yaml", _raw(merge={"tau": 2}))
    message = _load_error(path)
    assert message.startswith(str(path)) and _names_field(message, "merge.tau")


# --------------------------------------------------------------------------------------------
# Adapter resolution on local directories
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    """A tiny model pair with a safety adapter and three fine-tunes: finetuned/{gsm8k,legal,medqa}."""
    root = tmp_path_factory.mktemp("config-fixture")
    spec = SynthSpec(hidden=16, layers=1, heads=2, rank=2, subspace_rank=2, seed=11)
    build_fixture(root, spec, n_finetunes=3)
    return root


def _local(root: Path, finetuned, **extra) -> dict:
    raw = {"unaligned_model": str(root / "unaligned"), "aligned_model": str(root / "aligned"),
           "safety_adapter": str(root / "safety"), "finetuned": finetuned, "output": str(root / "out")}
    raw.update(extra)
    return raw


def _refs(raw, **kw) -> list[tuple[str, str]]:
    return [(r.name, r.uri.rstrip("/")) for r in parse_config(raw, **kw).resolve_adapters()]


def test_prefix_scans_every_adapter_dir(fixture_root):
    ft = fixture_root / "finetuned"
    refs = parse_config(_local(fixture_root, [{"prefix": str(ft)}])).resolve_adapters()
    assert all(isinstance(r, AdapterRef) for r in refs)
    assert [(r.name, r.uri.rstrip("/")) for r in refs] == [(n, str(ft / n)) for n in ("gsm8k", "legal", "medqa")]
    # trailing slash on the prefix makes no difference
    expected = [(n, str(ft / n)) for n in ("gsm8k", "legal", "medqa")]
    assert _refs(_local(fixture_root, [{"prefix": f"{ft}/"}])) == expected


def test_explicit_paths_are_named_by_last_component(fixture_root):
    ft = fixture_root / "finetuned"
    refs = _refs(_local(fixture_root, [str(ft / "medqa") + "/", str(ft / "gsm8k")]))
    assert refs == [("gsm8k", str(ft / "gsm8k")), ("medqa", str(ft / "medqa"))]  # sorted by name


def test_named_entries(fixture_root):
    ft = fixture_root / "finetuned"
    refs = _refs(_local(fixture_root, [{"name": "maths", "path": str(ft / "gsm8k")},
                                       {"path": str(ft / "legal") + "/"}]))
    assert refs == [("legal", str(ft / "legal")), ("maths", str(ft / "gsm8k"))]


def test_explicit_and_prefix_together_sorted(tmp_path):
    (tmp_path / "scan" / "zeta").mkdir(parents=True)
    (tmp_path / "scan" / "alpha").mkdir()
    (tmp_path / "other" / "mid").mkdir(parents=True)
    refs = _refs(_local(tmp_path, [str(tmp_path / "other" / "mid"), {"prefix": str(tmp_path / "scan")}]))
    assert [n for n, _ in refs] == ["alpha", "mid", "zeta"]


def test_prefix_scan_is_one_level_and_skips_files_and_hidden_dirs(tmp_path):
    scan = tmp_path / "scan"
    (scan / "a" / "nested").mkdir(parents=True)
    (scan / "b").mkdir()
    (scan / ".cache").mkdir()
    (scan / "README.md").write_text("not an adapter")
    assert _refs(_local(tmp_path, [{"prefix": str(scan)}])) == [("a", str(scan / "a")), ("b", str(scan / "b"))]


def test_duplicate_names_from_two_paths_is_an_error(tmp_path):
    (tmp_path / "one" / "gsm8k").mkdir(parents=True)
    (tmp_path / "two" / "gsm8k").mkdir(parents=True)
    cfg = parse_config(_local(tmp_path, [str(tmp_path / "one" / "gsm8k"), str(tmp_path / "two" / "gsm8k")]))
    with pytest.raises(SafeMergeError, match="gsm8k") as info:
        cfg.resolve_adapters()
    assert "finetuned" in str(info.value)


def test_duplicate_name_between_prefix_and_named_entry(tmp_path):
    (tmp_path / "scan" / "gsm8k").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    cfg = parse_config(_local(tmp_path, [{"prefix": str(tmp_path / "scan")},
                                         {"name": "gsm8k", "path": str(tmp_path / "elsewhere")}]))
    with pytest.raises(SafeMergeError, match="gsm8k"):
        cfg.resolve_adapters()


def test_naming_resolves_a_clash(tmp_path):
    (tmp_path / "one" / "gsm8k").mkdir(parents=True)
    (tmp_path / "two" / "gsm8k").mkdir(parents=True)
    refs = _refs(_local(tmp_path, [str(tmp_path / "one" / "gsm8k"),
                                   {"name": "gsm8k-v2", "path": str(tmp_path / "two" / "gsm8k")}]))
    assert refs == [("gsm8k", str(tmp_path / "one" / "gsm8k")), ("gsm8k-v2", str(tmp_path / "two" / "gsm8k"))]


def test_same_path_listed_twice_is_not_a_duplicate(fixture_root):
    ft = fixture_root / "finetuned"
    refs = _refs(_local(fixture_root, [str(ft / "gsm8k"), str(ft / "gsm8k") + "/", {"prefix": str(ft)}]))
    assert refs == [(n, str(ft / n)) for n in ("gsm8k", "legal", "medqa")]


def test_safety_adapter_under_a_scanned_prefix_is_excluded(tmp_path):
    adapters = tmp_path / "adapters"
    for name in ("safety", "gsm8k", "legal"):
        (adapters / name).mkdir(parents=True)
    for safety in (str(adapters / "safety"), str(adapters / "safety") + "/"):
        raw = _local(tmp_path, [{"prefix": str(adapters)}], safety_adapter=safety)
        assert [n for n, _ in _refs(raw)] == ["gsm8k", "legal"]
    # relative spellings in a config file, resolved against the file's directory
    path = _write(tmp_path / "fleet.yaml",
                  _local(tmp_path, [{"prefix": "adapters/"}], safety_adapter="./adapters/safety"))
    assert [r.name for r in load_config(path).resolve_adapters()] == ["gsm8k", "legal"]


def test_missing_prefix_dir_is_a_safemerge_error(tmp_path):
    cfg = parse_config(_local(tmp_path, [{"prefix": str(tmp_path / "nowhere")}]))
    with pytest.raises(SafeMergeError, match="nowhere"):
        cfg.resolve_adapters()


def test_adapter_names_must_be_a_single_path_component(tmp_path):
    # The name becomes output paths (runs/<id>/<name>/, latest/<name>.json): "../x" or "a/b" would write
    # outside them.
    (tmp_path / "a").mkdir()
    for bad in ("../escape", "a/b"):
        raw = _local(tmp_path, [{"name": bad, "path": str(tmp_path / "a")}])
        try:
            parse_config(raw).resolve_adapters()
        except SafeMergeError as exc:
            assert "finetuned" in str(exc)
        else:
            pytest.fail(f"adapter name {bad!r} was accepted")


# --------------------------------------------------------------------------------------------
# Relative paths and the synthetic fixture's config
# --------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_file(fixture_root, tmp_path, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(fixture_root, root)
    (root / "extra" / "mine").mkdir(parents=True)
    _write(root / "configs" / "fleet.yaml", {
        "unaligned_model": "../unaligned", "aligned_model": "../aligned", "safety_adapter": "../safety",
        "finetuned": ["../extra/mine/", {"prefix": "../finetuned"}, {"name": "maths", "path": "../finetuned/gsm8k"}],
        "output": "../merged",
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    cfg = load_config(Path("..") / "project" / "configs" / "fleet.yaml")
    cfg_dir = (root / "configs").resolve()
    for got, want in ((cfg.unaligned_model, root / "unaligned"), (cfg.aligned_model, root / "aligned"),
                      (cfg.safety_adapter, root / "safety"), (cfg.output, root / "merged")):
        assert Path(got).resolve() == want.resolve(), (got, want)
    assert Path(cfg.unaligned_model).is_dir()
    assert not (elsewhere / "merged").exists()
    refs = cfg.resolve_adapters()
    assert [r.name for r in refs] == ["gsm8k", "legal", "maths", "medqa", "mine"]
    for r in refs:
        assert Path(r.uri).is_dir(), r
        assert Path(r.uri).resolve().is_relative_to(root.resolve()), r
    assert cfg_dir.exists()


def test_relative_output_resolves_even_if_missing(tmp_path, monkeypatch):
    path = _write(tmp_path / "cfg" / "fleet.yaml", _raw(output="merged/fleet-a"))
    monkeypatch.chdir(tmp_path)
    assert Path(load_config(path).output) == (tmp_path / "cfg" / "merged" / "fleet-a")


def test_missing_relative_model_is_left_as_written_hub_id(tmp_path):
    path = _write(tmp_path / "fleet.yaml", _raw(unaligned_model="meta-llama/Llama-2-7b-hf"))
    assert load_config(path).unaligned_model == "hf://meta-llama/Llama-2-7b-hf"  # decided once, here


def test_write_fleet_config_loads_and_resolves(fixture_root, monkeypatch, tmp_path):
    root = tmp_path / "fx"
    shutil.copytree(fixture_root, root)
    path = write_fleet_config(root)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.merge == MergeSettings()
    assert Path(cfg.safety_adapter) == root / "safety"
    assert Path(cfg.output) == root / "merged"
    refs = cfg.resolve_adapters()
    assert [(r.name, Path(r.uri)) for r in refs] == [(n, root / "finetuned" / n) for n in ("gsm8k", "legal", "medqa")]


@pytest.mark.parametrize("output, key", [
    ("s3://adapters/domains/merged/", "finetuned"),  # inside a scanned prefix: it would become an adapter
    ("s3://adapters/domains/gsm8k/out", "finetuned"),
    ("s3://models/chat/", "aligned_model"),
    ("s3://adapters/safety", "safety_adapter"),
])
def test_the_output_may_not_be_inside_an_input(output, key):
    raw = _raw(finetuned=[{"prefix": "s3://adapters/domains/"}, "s3://adapters/domains/gsm8k/"], output=output)
    with pytest.raises(SafeMergeError, match=rf"output {re.escape(output)} is inside the input {key} "):
        parse_config(raw)
    parse_config(_raw(output="s3://adapters/domains-merged/"))  # a sibling with a common prefix is fine


def test_a_symlinked_adapter_under_a_prefix_is_skipped_unless_named(fixture_root, tmp_path):
    """A link under a prefix (to another team's adapter, or `etc -> /etc`) is neither followed nor stat'ed:
    it is skipped with a warning; named as an entry of its own, it is used (issue 19.6)."""
    prefix = tmp_path / "domains"
    shutil.copytree(fixture_root / "finetuned" / "gsm8k", prefix / "gsm8k")
    (prefix / "borrowed").symlink_to(fixture_root / "finetuned" / "medqa", target_is_directory=True)
    (prefix / "etc").symlink_to("/nonexistent/etc")
    config = parse_config(_raw(finetuned=[{"prefix": str(prefix)}], output=str(tmp_path / "out")))
    refs, skipped = config.scan_adapters()
    assert [r.name for r in refs] == ["gsm8k"]
    assert len(skipped) == 2 and all("a symbolic link, not followed under a prefix" in w for w in skipped)
    named = parse_config(_raw(finetuned=[{"prefix": str(prefix)}, str(prefix / "borrowed")],
                              output=str(tmp_path / "out")))
    assert [r.name for r in named.resolve_adapters()] == ["borrowed", "gsm8k"]


def test_the_same_model_as_aligned_and_unaligned_is_a_config_error():
    with pytest.raises(SafeMergeError, match="unaligned_model and aligned_model are the same"):
        parse_config(_raw(unaligned_model="s3://models/chat/"))
