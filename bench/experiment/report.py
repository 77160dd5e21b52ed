"""The evidence page from a finished run: the headline (benign fine-tunes at the paper's setting, with the random
control and SafeLoRA, paired against each fine-tune), the judge's agreement with hand labels, over-refusal, the
stress tests apart, what the mechanisms show, and what each stage cost. Every number is computed here from the
run's answers; nothing is typed in."""

from __future__ import annotations

import statistics
from pathlib import Path

import pyarrow.parquet as pq

from .pipeline import PAPER_TAU
from .scoring import judged
from .stats import holm, paired, rate

HEAD = ("safemerge", "random", "safelora")  # the headline's repairs, beside each fine-tune
SAMPLES = 2  # answers shown per variant
FIRST_PASS = ("## The first pass\n\nThe page before this one (`git show 0ca348f:docs/evidence.md`) measured an attack "
              "setting (fine-tunes with 5% harmful data) with an unchecked keyword judge, V from a rank-32 LoRA and no "
              "controls; issue 30's audit explains why it could not separate SafeMERGE from the set-up. This design "
              "replaces it.")
TRUNCATE = 150


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _rate(r: dict | None) -> str:
    if not r or r.get("mean") is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['mean']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _diff(d: dict | None, p: float | None = None) -> str:
    if not d:
        return "–"
    lo, hi = d["ci95"]
    tail = f", p {p:.2g}" if p is not None else ""
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.0f}, {100 * hi:+.0f}]{tail}"


class Answers:
    """One split's answers: per (variant, set) the 0/1 values in prompt order. Answers to harmful and
    over-refusal prompts are judged again here by the package's judges, so the page always shows what the
    judge as it now is says (the stage that made the answers may predate a change to it)."""

    def __init__(self, path: str):
        self.rows = pq.read_table(path).to_pylist()
        for kind in ("harmful", "over_refusal"):
            judged([r for r in self.rows if r["set"] == kind], kind)
        self.values: dict[tuple[str, str], dict[str, float]] = {}
        for r in self.rows:
            self.values.setdefault((r["variant"], r["set"]), {})[r["prompt_id"]] = r["value"]

    def has(self, variant: str, kind: str) -> bool:
        return (variant, kind) in self.values

    def vector(self, variant: str, kind: str) -> list[float]:
        mine = self.values[(variant, kind)]
        return [mine[k] for k in sorted(mine)]

    def rate(self, variant: str, kind: str) -> dict | None:
        return rate(self.vector(variant, kind)) if self.has(variant, kind) else None

    def random_mean(self, name: str, kind: str) -> list[float] | None:
        """The random control's values averaged over its seeds, prompt by prompt."""
        seeds = sorted({v for v, k in self.values if v.startswith("random") and v.endswith(f":{name}") and k == kind})
        if not seeds:
            return None
        vectors = [self.vector(s, kind) for s in seeds]
        return [sum(col) / len(col) for col in zip(*vectors, strict=True)]

    def repair_vector(self, repair: str, name: str, kind: str) -> list[float] | None:
        if repair == "random":
            return self.random_mean(name, kind)
        label = f"{repair}:{name}"
        return self.vector(label, kind) if self.has(label, kind) else None


def comparisons(ev: Answers, names: list[str], tasks: dict[str, str | None]) -> dict:
    """Each repair against its fine-tune, paired over the same prompts: non-refusal and task; Holm across the
    fine-tunes, per repair."""
    out: dict[str, dict[str, dict]] = {}
    for repair in HEAD + ("w0.6", "w0.5", "largest", "tau"):
        per: dict[str, dict] = {}
        for name in names:
            after = ev.repair_vector(repair, name, "harmful")
            if after is None:
                continue
            entry = {"harmful": paired(ev.vector(f"ft:{name}", "harmful"), after)}
            task = tasks.get(name)
            after_task = ev.repair_vector(repair, name, task) if task else None
            if task and after_task is not None:
                entry["task"] = paired(ev.vector(f"ft:{name}", task), after_task)
                entry["task_rate"] = rate(after_task)
            entry["rate"] = rate(after)
            per[name] = entry
        ps = {n: e["harmful"]["p"] for n, e in per.items() if e["harmful"]["p"] is not None}
        for n, p in holm(ps).items():
            per[n]["harmful"]["p_holm"] = p
        if per:
            out[repair] = per
    return out


def against_random(ev: Answers, names: list[str], tasks: dict[str, str | None]) -> dict[str, dict]:
    """SafeMERGE's repair against the random-layer control at the same count, paired prompt by prompt: what
    choosing the layers by rho adds over choosing as many at random."""
    out = {}
    for name in names:
        control = ev.random_mean(name, "harmful")
        if control is None or not ev.has(f"safemerge:{name}", "harmful"):
            continue
        entry = {"harmful": paired(control, ev.vector(f"safemerge:{name}", "harmful"))}
        task = tasks.get(name)
        control_task = ev.random_mean(name, task) if task else None
        if task and control_task is not None:
            entry["task"] = paired(control_task, ev.vector(f"safemerge:{name}", task))
        out[name] = entry
    return out


def write_evidence(result: dict, root: Path, page: Path) -> None:
    ev = Answers(result["eval"]["answers"])
    fts = {f["name"]: f for f in result["fine_tunes"]}
    tasks = {n: f["task"] for n, f in fts.items()}
    comp = comparisons(ev, list(fts), tasks)
    comp["vs_random"] = against_random(ev, list(fts), tasks)
    parts = [headline(result, ev, fts, comp), findings(result, ev, fts, comp), table_head(result, ev, fts, comp),
             judge_section(result), over_refusal(ev), stress(ev, fts, comp), mechanics(result, comp),
             safety_adapter(result), lockbox(result), prereg(result), what_was_run(result), times(result), sample(ev),
             FIRST_PASS]
    page.parent.mkdir(parents=True, exist_ok=True)
    plot_losses(result, page.parent / "img" / "evidence-losses.png")
    page.write_text("\n\n".join(p for p in parts if p) + "\n")


def headline(result: dict, ev: Answers, fts: dict, comp: dict) -> str:
    heads = [n for n, f in fts.items() if f["arm"] == "headline"]
    aligned = ev.rate("aligned", "harmful")
    lines = ["# Evidence: does SafeMERGE repair benign fine-tunes of a real chat model?", "",
             f"SmolLM2-135M, aligned here by a full-parameter fine-tune; rank-8 `q_proj`/`v_proj` fine-tunes on "
             f"benign data; the paper's setting (tau {PAPER_TAU}, linear, 0.8/0.2). Rates are **non-refusal rates** "
             f"on held-out harmful prompts by the refusal judge (its agreement with hand labels below), percent "
             f"with 95% intervals; differences are paired over the same prompts. The aligned model: "
             f"{_rate(aligned)}. This page is the `{result.get('profile', 'full')}` run's "
             f"(`make experiment{'' if result.get('profile', 'full') == 'full' else '-' + result['profile']}`)."]
    for n in heads:
        ft = ev.rate(f"ft:{n}", "harmful")
        sm = comp.get("safemerge", {}).get(n)
        rnd = comp.get("random", {}).get(n)
        sl = comp.get("safelora", {}).get(n)
        lines.append(f"- `{n}`: fine-tune {_rate(ft)}; SafeMERGE {_diff(sm and sm['harmful'])}, random layers "
                     f"{_diff(rnd and rnd['harmful'])}, SafeLoRA {_diff(sl and sl['harmful'])} (points).")
    return "\n".join(lines)


def _significant(d: dict) -> bool:
    lo, hi = d["ci95"]
    return lo > 0 or hi < 0


def findings(result: dict, ev: Answers, fts: dict, comp: dict) -> str:
    """What the numbers show, each sentence computed from them."""
    out = ["## What it shows", ""]
    aligned = ev.rate("aligned", "harmful")
    over = {v: ev.rate(v, "over_refusal") for v in ("aligned", "unaligned")}
    for name in (n for n, f in fts.items() if f["arm"] != "stress"):
        ft = ev.rate(f"ft:{name}", "harmful")
        if not ft or not aligned:
            continue
        out.append(f"- **`{name}` erodes safety**: non-refusal {_pct(aligned['mean'])}% (aligned) -> "
                   f"{_pct(ft['mean'])}% (fine-tune).")
        sm, vr, sl = (comp.get(k, {}).get(name) for k in ("safemerge", "vs_random", "safelora"))
        if sm:
            verb = "lowers it" if _significant(sm["harmful"]) and sm["harmful"]["diff"] < 0 else "does not move it"
            task = f"; task {_diff(sm.get('task'))} points" if sm.get("task") else ""
            out.append(f"  SafeMERGE at the paper's setting {verb}: {_diff(sm['harmful'])} points{task}.")
        if vr:
            better = _significant(vr["harmful"]) and vr["harmful"]["diff"] < 0
            out.append(f"  Against the same merge on random layers at the same count it differs by "
                       f"{_diff(vr['harmful'])} points (p {vr['harmful']['p']:.2g}): choosing the layers by rho "
                       + ("does better than chance here." if better else "is not shown to beat chance here."))
        if sl:
            task = f", task {_diff(sl.get('task'))} points" if sl.get("task") else ""
            orr = ev.rate(f"safelora:{name}", "over_refusal")
            ftr = ev.rate(f"ft:{name}", "over_refusal")
            refusal = (f", over-refusal {_pct(ftr['mean'])}% -> {_pct(orr['mean'])}%" if orr and ftr else "")
            out.append(f"  SafeLoRA: {_diff(sl['harmful'])} points{task}{refusal}.")
    if over["aligned"] and over["unaligned"]:
        out.append(f"- **The aligned model over-refuses**: it refuses {_pct(over['aligned']['mean'])}% of the benign "
                   f"prompts that look risky (the unaligned model {_pct(over['unaligned']['mean'])}%): this alignment "
                   "is blunter than a chat model's, and a repair that restores it restores the over-refusal too.")
    out += direction_findings(result)
    labels = result.get("labels") or {}
    for split, c in labels.items():
        worst = max(c["per_variant"].items(), key=lambda kv: abs(kv[1]["bias"]))
        met = c["judge"]["kappa"] >= 0.8 and abs(worst[1]["bias"]) <= 0.05
        out.append(f"- **The judge ({split} split, {c['matched']} hand labels)**: kappa {c['judge']['kappa']:.2f} "
                   f"(the keyword judge {c['keyword']['kappa']:.2f}); largest per-variant bias "
                   f"{100 * worst[1]['bias']:+.1f} points (`{worst[0]}`, n = {worst[1]['n']}): the target (kappa >= "
                   f"0.8, |bias| <= 5) is {'met' if met else 'missed'}"
                   + ("." if met else ": read each variant's hand-labelled rate and its interval (below) beside the "
                      "judge's; with some 17 answers a variant, one answer moves a rate by 6 points."))
    return "\n".join(out)


def _null_range(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[int(0.025 * (len(ordered) - 1))], ordered[int(0.975 * (len(ordered) - 1))]


def direction_findings(result: dict) -> list[str]:
    """Each adapter's mean signed cosine with V against the null of random rank-r updates, as a sentence."""
    mech, fts = result["mechanics"], {f["name"]: f for f in result["fine_tunes"]}
    said = []
    for name, per in mech["direction"].items():
        if name in result["safety"]:
            shape = name  # a safety adapter: its own shape's null
        else:
            shape = "safety-all" if fts[name]["arm"] == "all-linear" else "safety"
        lo, hi = _null_range(mech["null"][shape])
        mean = statistics.mean(d["cosine"] for d in per.values())
        where = "inside" if lo <= mean <= hi else ("below" if mean < lo else "above")
        said.append(f"`{name}` {mean:+.4f} ({where} [{lo:+.4f}, {hi:+.4f}])")
    return ["- **Direction** (mean signed cosine of each layer's update with V, against the 95% range of random "
            "updates of the same rank and shape): " + "; ".join(said) + ". A sign says which way an update moves "
            "relative to what alignment changed; it is not shown here to say whether the update erodes or repairs."]


def prereg(result: dict) -> str:
    sc = result["scale"]
    return "\n".join([
        "## Pre-registered (before any evaluation of this design)", "",
        "Fixed in `bench/experiment/pipeline.py` at the commit that introduced it, before its evaluations ran:", "",
        f"- **Alignment that changes full-rank weights**: the unaligned SmolLM2-135M fine-tuned in every weight "
        f"({sc['align_steps']} AdamW steps, batch {sc['align_batch']}, lr {sc['align_lr']}) on refusals in 16 "
        f"wordings to {sc['align_refusals']} harmful prompts and its own helpful answers to {sc['benign']} benign "
        "prompts; V = W_aligned - W_unaligned.",
        f"- **Benign fine-tunes as the headline**: rank 8 on `q_proj` and `v_proj`, {sc['ft_steps']} steps at lr "
        f"{sc['ft_lr']} by `train-safety`: {', '.join(sc['headline'])}; all-linear arm: "
        f"{', '.join(sc['all_linear']) or 'none in this profile'}; stress tests, apart: "
        f"{', '.join(sc['stress']) or 'none in this profile'}.",
        f"- **The safety adapter** per LoRA shape: refusals in 12 wordings of its own to {sc['safety_examples']} "
        f"prompts of its own split, {sc['safety_steps']} steps at lr {sc['safety_lr']}.",
        f"- **Repairs**: SafeMERGE at the paper's setting (tau {PAPER_TAU}, `linear`, 0.8/0.2); SafeLoRA at the "
        f"same tau; the same merge on random layers at SafeMERGE's count (seeds 0..{sc['random_seeds'] - 1}, "
        "averaged prompt by prompt)"
        + ("; the largest updates at that count; weights 0.6/0.4 and 0.5/0.5; tau chosen on validation."
           if sc["sweep"] else "."),
        f"- **Measured** on {sc['harmful_eval']} held-out harmful prompts, {sc['over_refusal']} over-refusal prompts "
        f"and {sc['task_eval']} task items; each repair against its fine-tune paired over the same prompts "
        "(paired bootstrap interval; McNemar's exact test, or a sign-flip test for the seed-averaged control; Holm "
        "across fine-tunes per repair). The judge checked against blind hand labels; target kappa >= 0.8 and "
        "|bias| <= 5 points per variant.",
    ])


def _cells(ev: Answers, comp: dict, name: str, task: str | None, repair: str | None) -> list[str] | None:
    """A table row's cells after the variant: the rate, its paired difference, the task score, its difference;
    None where the repair was not run."""
    if repair is None:
        return [_rate(ev.rate(f"ft:{name}", "harmful")), "", _rate(ev.rate(f"ft:{name}", task) if task else None), ""]
    entry = comp.get(repair, {}).get(name)
    if entry is None:
        return None
    return [_rate(entry["rate"]), _diff(entry["harmful"], entry["harmful"].get("p_holm")),
            _rate(entry.get("task_rate")), _diff(entry.get("task"))]


def _line(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_head(result: dict, ev: Answers, fts: dict, comp: dict) -> str:
    out = ["## The headline: benign fine-tunes, the paper's setting",
           "",
           "| fine-tune | variant | non-refusal % [95% CI] | vs fine-tune, points [95% CI], Holm p | task % | "
           "task vs fine-tune | layers repaired |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    changed = {label: {n: len(r["layers"]) for n, r in per.items()} for label, per in result["repairs"].items()}
    for name, f in fts.items():
        if f["arm"] == "stress":
            continue
        for repair, label in ((None, "fine-tune"), ("safemerge", "SafeMERGE"), ("random", "random layers"),
                              ("safelora", "SafeLoRA")):
            cells = _cells(ev, comp, name, f["task"], repair)
            if cells is not None:
                count = changed.get("random0" if repair == "random" else repair or "", {}).get(name, "")
                out.append(_line(f"`{name}`", label, *cells, count))
        vr = comp["vs_random"].get(name)
        if vr:
            out.append(_line(f"`{name}`", "SafeMERGE vs random layers", "", _diff(vr["harmful"], vr["harmful"]["p"]),
                             "", _diff(vr.get("task")), ""))
    return "\n".join(out)


def judge_section(result: dict) -> str:
    labels = result.get("labels") or {}
    if not labels:
        return ("## The judge\n\nNot yet checked against hand labels in this run: the blind samples are in "
                "`ROOT/labels/*-blind.jsonl` (RUBRIC.md beside the committed labels).")
    out = ["## The judge against hand labels", "",
           "| split | answers | kappa (refusal judge) | precision / recall of complied | kappa (keyword judge) |",
           "| --- | --- | --- | --- | --- |"]
    for split, c in labels.items():
        j, k = c["judge"], c["keyword"]
        out.append(f"| {split} | {c['matched']} (stale {c['stale']}) | {j['kappa']:.2f} | "
                   f"{_pct(j['precision'])} / {_pct(j['recall'])} | {k['kappa']:.2f} |")
    out += ["", "Per variant (judge rate minus hand rate, points; hand rate with its interval):", "",
            "| split | variant | n | hand non-refusal % | refusal judge bias | keyword judge bias |",
            "| --- | --- | --- | --- | --- | --- |"]
    for split, c in labels.items():
        for variant, b in sorted(c["per_variant"].items()):
            out.append(f"| {split} | `{variant}` | {b['n']} | {_rate(b['hand'])} | {100 * b['bias']:+.1f} | "
                       f"{100 * b['keyword_bias']:+.1f} |")
    return "\n".join(out)


def over_refusal(ev: Answers) -> str:
    variants = sorted(v for v, k in ev.values if k == "over_refusal")
    if not variants:
        return ""
    out = ["## Over-refusal", "", "Refusal rate on benign prompts that look risky (`bench/experiment/overrefusal.txt`, "
           "never trained on), by the refusal judge.", "", "| variant | refused % [95% CI] |", "| --- | --- |"]
    out += [f"| `{v}` | {_rate(ev.rate(v, 'over_refusal'))} |" for v in variants]
    return "\n".join(out)


def stress(ev: Answers, fts: dict, comp: dict) -> str:
    names = [n for n, f in fts.items() if f["arm"] == "stress"]
    if not names:
        return ""
    out = ["## Stress tests (not the paper's setting): harmful data in the fine-tune", "",
           "| fine-tune | variant | non-refusal % | vs fine-tune, Holm p | task % | task vs fine-tune |",
           "| --- | --- | --- | --- | --- | --- |"]
    for n in names:
        for repair, label in ((None, "fine-tune"), ("safemerge", "SafeMERGE"), ("safelora", "SafeLoRA")):
            cells = _cells(ev, comp, n, fts[n]["task"], repair)
            if cells is not None:
                out.append(_line(f"`{n}`", label, *cells))
    return "\n".join(out)


def mechanics(result: dict, comp: dict) -> str:
    mech, rho = result["mechanics"], result["rho"]
    out = ["## What the mechanisms show", "",
           f"V = W_aligned - W_unaligned has full numerical rank in "
           f"{sum(r['rank'] == r['full'] for r in mech['v_rank'].values())} of {len(mech['v_rank'])} adapted "
           f"modules (the alignment changed every weight).", "",
           "| adapter | mean rho | layers with rho < tau | median safety/fine-tune update norm | mean signed "
           "cosine with V | null 95% range | mean beta |", "| --- | --- | --- | --- | --- | --- | --- |"]
    fts = {f["name"]: f for f in result["fine_tunes"]}
    for name, per in rho["per_adapter"].items():
        values = list(per.values())
        direction = mech["direction"][name]
        null = sorted(mech["null"]["safety-all" if fts[name]["arm"] == "all-linear" else "safety"])
        lo, hi = null[int(0.025 * (len(null) - 1))], null[int(0.975 * (len(null) - 1))]
        ratio = mech["norm_ratio"].get(name, {})
        out.append(f"| `{name}` | {statistics.mean(values):.3f} | {rho['below_paper_tau'][name]} of {len(values)} | "
                   f"{statistics.median(ratio.values()):.2f} | "
                   f"{statistics.mean(d['cosine'] for d in direction.values()):+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                   f"{statistics.mean(d['beta'] for d in direction.values()):+.4f} |")
    for name in result["safety"]:
        direction = mech["direction"][name]
        out.append(f"| `{name}` (safety adapter) | – | – | – | "
                   f"{statistics.mean(d['cosine'] for d in direction.values()):+.4f} | – | "
                   f"{statistics.mean(d['beta'] for d in direction.values()):+.4f} |")
    extra = [(label, repair) for label, repair in (("weights 0.6/0.4", "w0.6"), ("weights 0.5/0.5", "w0.5"),
                                                    ("largest updates, same count", "largest"),
                                                    ("tau chosen on validation", "tau")) if repair in comp]
    if extra:
        out += ["", "Other repairs, against each fine-tune (non-refusal points, paired; Holm p):", "",
                "| repair | " + " | ".join(f"`{n}`" for n in comp[extra[0][1]]) + " |",
                "| --- |" + " --- |" * len(comp[extra[0][1]])]
        for label, repair in extra:
            out.append(f"| {label} | " + " | ".join(_diff(e["harmful"], e["harmful"].get("p_holm"))
                                                     for e in comp[repair].values()) + " |")
    if result.get("tau"):
        out += ["", f"tau chosen on validation: **{result['tau']['tau']}** (candidates {rho['candidates']})."]
    return "\n".join(out)


def plot_losses(result: dict, path: Path) -> None:
    """The training loss of the aligned model, each safety adapter and each fine-tune, step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    curves = {"aligned (full-parameter)": result["aligned"]["losses"],
              **{f"{n} (safety adapter)": s["losses"] for n, s in result["safety"].items()},
              **{n: f["losses"] for n, f in result["fleet"].items()}}
    for label, losses in curves.items():
        ax.plot([s for s, _ in losses], [v for _, v in losses], label=label,
                linewidth=2 if "safety" in label else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def safety_adapter(result: dict) -> str:
    out = ["## Training", "", "![training loss per step](img/evidence-losses.png)", "",
           "| model | examples | steps | loss first -> last |", "| --- | --- | --- | --- |"]
    al = result["aligned"]
    out.append(f"| aligned (full-parameter) | {al['examples']} | {len(al['losses'])} | "
               f"{al['losses'][0][1]:.3f} -> {al['losses'][-1][1]:.3f} |")
    for name, s in {**result["safety"], **result["fleet"]}.items():
        out.append(f"| `{name}` | {s['examples']} | {len(s['losses'])} | "
                   f"{s['losses'][0][1]:.3f} -> {s['losses'][-1][1]:.3f} |")
    return "\n".join(out)


def lockbox(result: dict) -> str:
    box = result.get("lockbox")
    if not box:
        return ""
    lb = Answers(box["answers"])
    out = [f"## Lockbox ({box['prompts']} prompts, sha256 {box['sha256']})", "",
           "| variant | non-refusal % [95% CI] |", "| --- | --- |"]
    out += [f"| `{v}` | {_rate(lb.rate(v, 'harmful'))} |" for v, _ in sorted(lb.values)]
    return "\n".join(out)


def what_was_run(result: dict) -> str:
    sc = result["scale"]
    return (f"## What was run\n\n`{result.get('profile', 'full')}` profile; splits by a fixed hash of each "
            f"prompt: {result['split']}. Aligned: {sc['align_steps']} full-parameter steps at lr {sc['align_lr']}; "
            f"fine-tunes and safety adapters: `train-safety`, {sc['ft_steps']} / {sc['safety_steps']} steps at lr "
            f"{sc['ft_lr']} / {sc['safety_lr']}, rank 8; greedy decoding, {sc['harmful_tokens']} tokens per "
            f"answer to a harmful prompt. Distilled answers kept: {result['distilled']}.")


def times(result: dict) -> str:
    rows = [f"| {k} | {v:.0f} |" for k, v in result["seconds"].items()]
    total = sum(result["seconds"].values())
    return "\n".join(["## Time per stage (2 CPU cores)", "", "| stage | seconds |", "| --- | --- |", *rows,
                      f"| all | {total:.0f} |"])


def sample(ev: Answers) -> str:
    out = ["## A sample of answers (evaluation split, harmful prompts)", "",
           "| variant | prompt | answer | refusal judge | keyword judge |", "| --- | --- | --- | --- | --- |"]
    seen: dict[str, int] = {}
    for r in sorted((r for r in ev.rows if r["set"] == "harmful"), key=lambda r: (r["variant"], r["prompt_id"])):
        if seen.get(r["variant"], 0) < SAMPLES and r["variant"].split(":")[0] in ("aligned", "ft", "safemerge"):
            seen[r["variant"]] = seen.get(r["variant"], 0) + 1
            text = " ".join(r["response"].split())[:TRUNCATE].replace("|", "/")
            out.append(f"| `{r['variant']}` | {r['prompt'][:60].replace('|', '/')} | {text} | {r['judgement']} | "
                       f"{r['keyword']} |")
    return "\n".join(out)
