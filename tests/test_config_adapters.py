"""Fleet config: adapter resolution on local directories (prefixes, names, duplicates, links), relative paths
against the config file, and the synthetic fixture's config."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from fleetconfigs import raw_config, write_config
from safemerge_ray.core import MergeSettings
from safemerge_ray.errors import SafeMergeError
from safemerge_ray.fleet.config import AdapterRef, load_config, parse_config
from safemerge_ray.synthetic import SynthSpec, build_fixture, write_fleet_config

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
    path = write_config(tmp_path / "fleet.yaml",
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
    write_config(root / "configs" / "fleet.yaml", {
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
    path = write_config(tmp_path / "cfg" / "fleet.yaml", raw_config(output="merged/fleet-a"))
    monkeypatch.chdir(tmp_path)
    assert Path(load_config(path).output) == (tmp_path / "cfg" / "merged" / "fleet-a")


def test_missing_relative_model_is_left_as_written_hub_id(tmp_path):
    path = write_config(tmp_path / "fleet.yaml", raw_config(unaligned_model="meta-llama/Llama-2-7b-hf"))
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
    raw = raw_config(finetuned=[{"prefix": "s3://adapters/domains/"}, "s3://adapters/domains/gsm8k/"], output=output)
    with pytest.raises(SafeMergeError, match=rf"output {re.escape(output)} is inside the input {key} "):
        parse_config(raw)
    parse_config(raw_config(output="s3://adapters/domains-merged/"))  # a sibling with a common prefix is fine


def test_a_symlinked_adapter_under_a_prefix_is_skipped_unless_named(fixture_root, tmp_path):
    """A link under a prefix (to another team's adapter, or `etc -> /etc`) is neither followed nor stat'ed:
    it is skipped with a warning; named as an entry of its own, it is used (issue 19.6)."""
    prefix = tmp_path / "domains"
    shutil.copytree(fixture_root / "finetuned" / "gsm8k", prefix / "gsm8k")
    (prefix / "borrowed").symlink_to(fixture_root / "finetuned" / "medqa", target_is_directory=True)
    (prefix / "etc").symlink_to("/nonexistent/etc")
    config = parse_config(raw_config(finetuned=[{"prefix": str(prefix)}], output=str(tmp_path / "out")))
    refs, skipped = config.scan_adapters()
    assert [r.name for r in refs] == ["gsm8k"]
    assert len(skipped) == 2 and all("a symbolic link, not followed under a prefix" in w for w in skipped)
    named = parse_config(raw_config(finetuned=[{"prefix": str(prefix)}, str(prefix / "borrowed")],
                                    output=str(tmp_path / "out")))
    assert [r.name for r in named.resolve_adapters()] == ["borrowed", "gsm8k"]


def test_the_same_model_as_aligned_and_unaligned_is_a_config_error():
    with pytest.raises(SafeMergeError, match="unaligned_model and aligned_model are the same"):
        parse_config(raw_config(unaligned_model="s3://models/chat/"))
