"""Answers from model replicas on Ray Data: each replica loads the aligned model once and switches LoRA adapters
in place (transformers' batched `generate`; with vLLM installed and a GPU, one vLLM engine serves every adapter)."""

from __future__ import annotations

import contextlib
from typing import Any

from ..cluster import cluster_gpus, map_on_actors, ray_data
from ..errors import SafeMergeError
from ..io import (
    S3Settings,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    local_copy,
    model_path,
    open_dir,
    published_version,
)
from ..progress import log
from .spec import EvalSpec, Pair


def _chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


class TransformersReplica:
    """One model replica: the aligned model, with each LoRA adapter loaded once and switched in place."""

    def __init__(self, aligned: str, s3: S3Settings, max_new_tokens: int, batch_size: int):
        import torch
        from peft import PeftModel  # noqa: F401  (fails here, not mid-batch, if PEFT is missing)


        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        path = model_path(aligned, "aligned model", s3)
        self.tokenizer = load_tokenizer(path, "aligned model")
        self.tokenizer.padding_side = "left"  # decoder-only batches grow to the right
        self.base = load_causal_lm(path, "aligned model", self.device)
        self.model: Any = None  # the PeftModel, once an adapter is loaded
        self.names: dict[str, str] = {}  # adapter location -> its name in the PeftModel
        self.s3, self.max_new_tokens, self.batch_size = s3, max_new_tokens, batch_size

    def _use(self, lora: str):
        from peft import PeftModel


        if lora not in self.names:
            name = f"a{len(self.names)}"
            path = local_copy(_version(lora, self.s3), f"adapter {lora}", self.s3)
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.model.eval()
            self.names[lora] = name
        assert self.model is not None
        self.model.set_adapter(self.names[lora])
        return self.model

    def generate(self, lora: str, prompts: list[str]) -> list[str]:
        import torch

        model = self._use(lora) if lora else self.model or self.base
        answers: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [_chat_prompt(self.tokenizer, p) for p in prompts[start:start + self.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            # The aligned model alone: the loaded adapters switched off.
            off = self.model.disable_adapter() if not lora and self.model is not None else contextlib.nullcontext()
            with off, torch.no_grad():
                out = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id)
            answers += self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return answers

    def __call__(self, batch: dict) -> dict:
        """A Ray Data batch: rows grouped by adapter, answered in `batch_size` prompts a call."""
        loras, prompts = list(batch["lora"]), list(batch["prompt"])
        answers = [""] * len(prompts)
        for lora in dict.fromkeys(loras):
            idx = [i for i, x in enumerate(loras) if x == lora]
            for i, answer in zip(idx, self.generate(lora, [prompts[i] for i in idx]), strict=True):
                answers[i] = answer
        return {**batch, "response": answers}


class VllmReplica:
    """One vLLM engine per replica serving every adapter (multi-LoRA batching); needs a GPU."""

    def __init__(self, aligned: str, s3: S3Settings, max_new_tokens: int, batch_size: int, max_lora_rank: int = 64):
        from vllm import LLM, SamplingParams  # the `vllm` extra


        self.s3 = s3
        self.llm = LLM(model=model_path(aligned, "aligned model", s3), enable_lora=True,
                       max_lora_rank=max_lora_rank, max_loras=8)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.ids: dict[str, int] = {}

    def __call__(self, batch: dict) -> dict:
        from vllm.lora.request import LoRARequest


        requests = []
        for lora in batch["lora"]:
            if lora and lora not in self.ids:
                self.ids[lora] = len(self.ids) + 1
            requests.append(LoRARequest(f"a{self.ids[lora]}", self.ids[lora],
                                        local_copy(_version(lora, self.s3), lora, self.s3)) if lora else None)
        messages = [[{"role": "user", "content": p}] for p in batch["prompt"]]
        outs = self.llm.chat(messages, self.params, lora_request=requests, use_tqdm=False)
        return {**batch, "response": [o.outputs[0].text for o in outs]}


def _version(lora: str, s3: S3Settings) -> str:
    """The adapter directory `lora` stands for (a `train-safety` output: the version its manifest names)."""
    return published_version(open_dir(lora, what=f"adapter {lora}", s3=s3), f"adapter {lora}").uri


def choose_engine(spec: EvalSpec) -> str:
    import importlib.util


    gpus = cluster_gpus() >= 1
    has_vllm = importlib.util.find_spec("vllm") is not None
    if spec.engine == "vllm" and not (gpus and has_vllm):
        raise SafeMergeError("eval: engine vllm needs the vllm extra (pip install 'safemerge-ray[vllm]') and a GPU "
                             "in the cluster")
    return "vllm" if spec.engine == "vllm" or (spec.engine == "auto" and gpus and has_vllm) else "transformers"


def generate(spec: EvalSpec, aligned: str, s3: S3Settings, rows: list[dict], pairs: list[Pair]) -> list[dict]:
    """Answers for `rows` ({lora, prompt, ...}), fanned out over `spec.replicas` replicas with Ray Data."""
    data = ray_data()

    engine = choose_engine(spec)
    gpus = cluster_gpus() >= spec.replicas
    replica: type = VllmReplica if engine == "vllm" else TransformersReplica
    kwargs: dict = {"aligned": aligned, "s3": s3, "max_new_tokens": spec.max_new_tokens,
                    "batch_size": spec.batch_size}
    if engine == "vllm":
        kwargs["max_lora_rank"] = _max_rank(pairs, s3)
    rows = sorted(rows, key=lambda r: (r["lora"], r["set"], r["prompt_id"]))  # a batch mostly shares an adapter
    ds = data.from_items(rows, override_num_blocks=max(1, min(len(rows) // spec.batch_size, 64)))
    answered = map_on_actors(ds, replica, kwargs, spec.batch_size * 4, spec.replicas, gpus)
    log("eval", f"{len(rows)} answers to generate on {spec.replicas} {engine} replica(s)")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in answered.take_all()]


def _max_rank(pairs: list[Pair], s3: S3Settings) -> int:
    """The largest LoRA rank among the adapters (vLLM's max_lora_rank)."""
    ranks = [8]
    for p in pairs:
        for uri in (p.finetuned, p.repaired):
            adapter = load_adapter(open_dir(uri, what=f"adapter {p.name}", s3=s3), f"adapter {p.name}")
            ranks += [m.rank for m in adapter.modules.values()]
    return max(ranks)
