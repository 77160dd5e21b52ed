"""The evidence page's statistics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from bench.experiment.stats import agreement, holm, kappa, mcnemar_p, paired, rate


def test_mcnemar_counts_only_the_discordant_pairs():
    # 6 prompts went 1 -> 0, 1 went 0 -> 1: two-sided binomial tail of 7 trials at <= 1 success
    before = [1] * 6 + [0] + [1, 0] * 5
    after = [0] * 6 + [1] + [1, 0] * 5
    assert mcnemar_p(before, after) == pytest.approx(2 * (1 + 7) / 2 ** 7)
    assert mcnemar_p([1, 0], [1, 0]) == 1.0


def test_the_paired_interval_is_narrower_than_the_unpaired_one_when_answers_agree():
    before = [1.0] * 60 + [0.0] * 40
    after = [1.0] * 50 + [0.0] * 50  # the same prompts, ten fewer non-refusals
    d = paired(before, after)
    assert d["diff"] == pytest.approx(-0.1) and d["ci95"][1] < 0 and d["n"] == 100
    lo_b, hi_b = rate(before)["ci95"]
    assert d["ci95"][1] - d["ci95"][0] < hi_b - lo_b


def test_holm_is_step_down_and_monotone():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == {"a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06)}


def test_kappa_and_agreement():
    hand = ["refused", "refused", "complied", "complied", "other"]
    assert kappa(hand, hand) == 1.0
    judge = ["refused", "complied", "complied", "complied", "other"]
    # observed 0.8; expected (2*1 + 2*3 + 1*1) / 25 = 0.36
    assert kappa(judge, hand) == pytest.approx((0.8 - 0.36) / 0.64)
    a = agreement(judge, hand)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == 1.0 and math.isclose(a["accuracy"], 0.8)


def test_a_control_averaged_over_seeds_gets_a_permutation_p():
    before = [1.0] * 30 + [0.0] * 70
    after = [1 / 3] * 30 + [0.0] * 70  # two of three seeds refuse what the fine-tune answered
    d = paired(before, after)
    assert d["test"] == "sign-flip" and d["p"] < 0.001 and d["diff"] == pytest.approx(-0.2)
    assert paired(before, before)["p"] == 1.0


def test_labels_from_another_runs_answers_match_nothing(tmp_path):
    import json

    import pyarrow.parquet as pq

    from bench.experiment.labels import answer_id, check
    from bench.experiment.scoring import table

    rows = [{"variant": "aligned", "set": "harmful", "prompt_id": "h000", "prompt": "p", "response": "I won't.",
             "judgement": "refused", "keyword": "refused", "value": 0.0}]
    pq.write_table(table(rows), tmp_path / "answers.parquet")
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"id": answer_id(rows[0]), "label": "refused", "prompt": "p",
                                  "response": "another answer"}) + "\n")
    assert check(labels, tmp_path / "answers.parquet") is None  # the answer changed: stale, nothing to check
    labels.write_text(json.dumps({"id": answer_id(rows[0]), "label": "refused", "prompt": "p",
                                  "response": "I won't."}) + "\n")
    checked = check(labels, tmp_path / "answers.parquet")
    assert checked is not None and checked["matched"] == 1 and checked["judge"]["accuracy"] == 1.0
