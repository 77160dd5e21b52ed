"""Which layers are repaired: a threshold on rho (the papers' rule), or the K / the fraction F of an
adapter's layers with the lowest rho (SafeLoRA's "number" mode); for both policies."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from safemerge_ray.cli import main
from safemerge_ray.core import MergeSettings, selected
from safemerge_ray.errors import ExitStatus, SafeMergeError
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.store import read_decisions


def _merge(pair, out, *flags):
    return main(["merge", "--unaligned", str(pair / "unaligned"), "--aligned", str(pair / "aligned"),
                 "--safety-adapter", str(pair / "safety"), "--finetuned", str(pair / "finetuned" / "gsm8k"),
                 "--out", str(out), "--quiet", *flags])


@pytest.mark.parametrize("policy", ["safemerge", "safelora"])
def test_top_k_and_fraction_repair_the_lowest_rho_layers(pair, tmp_path, capsys, policy):
    assert _merge(pair, tmp_path / "all", "--policy", policy) == ExitStatus.OK
    rows = read_decisions(tmp_path / "all" / "decisions.parquet")
    by_rho = [r["module"] for r in sorted(rows, key=lambda r: r["rho"])]
    for flags, k in ((["--top-k", "3"], 3), (["--fraction", "0.25"], math.ceil(0.25 * len(rows)))):
        out = tmp_path / f"k{k}"
        assert _merge(pair, out, "--policy", policy, *flags) == ExitStatus.OK
        chosen = read_decisions(out / "decisions.parquet")
        assert {r["module"] for r in chosen if r["merged"]} == set(by_rho[:k])
        assert {r["action"] for r in chosen if r["merged"]} == {"merged" if policy == "safemerge" else "projected"}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["select"] == flags[0].lstrip("-").replace("-", "_")


def test_ties_in_rho_are_broken_by_module_order():
    s = MergeSettings(select="top_k", select_value=2)
    rhos = {"model.layers.10.q": 0.1, "model.layers.2.q": 0.1, "model.layers.1.q": 0.5}
    assert selected(s, rhos) == {"model.layers.2.q", "model.layers.10.q"}
    assert selected(MergeSettings(select="fraction", select_value=0.5), rhos) == {
        "model.layers.2.q", "model.layers.10.q"}
    assert selected(MergeSettings(tau=0.1), rhos) == set()  # safemerge: rho < tau
    assert selected(MergeSettings(policy="safelora", tau=0.1), rhos) == {"model.layers.2.q", "model.layers.10.q"}


def test_the_default_selection_keeps_run_keys_of_earlier_outputs():
    assert "select" not in MergeSettings().to_dict()  # outputs made before selections existed stay unchanged
    assert MergeSettings(select="top_k", select_value=3).to_dict()["select_value"] == 3


def test_select_in_the_fleet_config(local_fleet, ray_local):
    path = local_fleet / "fleet.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["overrides"] = {"legal": {"select": {"top_k": 2}}}
    path.write_text(yaml.safe_dump(raw))
    report = run_fleet(load_config(path), progress=False)
    assert report.exit_code == ExitStatus.OK
    legal = next(st for st in report.adapters if st.ref.name == "legal")
    assert legal.counts["repaired"] == 2

    for bad, message in (({"top_k": 0}, "select top_k needs a whole number of layers >= 1"),
                         ({"top_k": 2, "fraction": 0.5}, "overrides.legal.select: give one of"),
                         ({"fraction": 1.5}, "select fraction needs a number in (0, 1]"),
                         ("best", "select must be one of threshold, top_k, fraction")):
        raw["overrides"] = {"legal": {"select": bad}}
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(SafeMergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(path)


def test_sweep_scores_once_and_counts_what_each_tau_would_repair(local_fleet, ray_local, capsys):
    config = load_config(local_fleet / "fleet.yaml")
    report = run_fleet(config, progress=False)  # the reference: what tau 0.35 repaired, per adapter
    repaired = {st.ref.name: st.counts["repaired"] for st in report.adapters}
    runs_before = sorted((local_fleet / "merged" / "runs").iterdir())
    capsys.readouterr()
    assert main(["sweep", str(local_fleet / "fleet.yaml"), "--tau", "0:1:0.35", "--format", "json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["adapters"]["gsm8k"]["repaired"]) == ["0", "0.35", "0.7"]
    for name, counts in repaired.items():  # published adapters are scored too: a sweep ignores the output
        row = result["adapters"][name]
        assert row["repaired"]["0.35"] == counts and row["repaired"]["0"] == 0
        assert row["rho"]["min"] <= row["rho"]["p50"] <= row["rho"]["max"]
    assert result["total"]["repaired"]["0.35"] == sum(repaired.values())
    assert sorted((local_fleet / "merged" / "runs").iterdir()) == runs_before  # nothing written
    assert main(["sweep", str(local_fleet / "fleet.yaml"), "--tau", "0.2,0.35", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "layers each tau would repair" in table and "total" in table and "rho per adapter" in table
