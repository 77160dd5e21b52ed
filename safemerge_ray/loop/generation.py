"""Answers from model replicas on Ray Data: each replica loads the aligned model once and switches LoRA adapters
in place (transformers' batched `generate`; with vLLM installed and a GPU, one vLLM engine serves every adapter)."""

from __future__ import annotations

import contextlib
from typing import Any

from ..cluster import cluster_gpus, map_on_actors, ray_data, threads_each
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


BASE = "__base__"  # PEFT's name for "no adapter" in a batch that mixes adapters


class TransformersReplica:
    """One model replica: the aligned model, with each LoRA adapter loaded once. Each adapter's prompts are
    answered longest first, so a batch holds prompts of about one length (little padding), and batches are full:
    where one adapter's prompts end, the next one's fill the batch (PEFT's `adapter_names` routes each row).
    Batches stay single-adapter otherwise: in a mixed batch every LoRA layer runs once per adapter, which on a
    small model costs more than the padding it saves (BENCHMARKS.md)."""

    def __init__(self, aligned: str, s3: S3Settings, max_new_tokens: int, batch_size: int, threads: int = 1):
        import os

        import torch
        from peft import PeftModel  # noqa: F401  (fails here, not mid-batch, if PEFT is missing)


        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":  # Ray started this actor with one thread: it takes its share of the CPUs
            torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        path = model_path(aligned, "aligned model", s3)
        self.tokenizer = load_tokenizer(path, "aligned model")
        self.tokenizer.padding_side = "left"  # decoder-only batches grow to the right
        self.base = load_causal_lm(path, "aligned model", self.device)
        self.model: Any = None  # the PeftModel, once an adapter is loaded
        self.names: dict[str, str] = {}  # adapter location -> its name in the PeftModel
        self.s3, self.max_new_tokens, self.batch_size = s3, max_new_tokens, batch_size

    def _name(self, lora: str) -> str:
        """The adapter's name in the PeftModel, loaded on first use (BASE for the aligned model alone)."""
        from peft import PeftModel


        if not lora:
            return BASE
        if lora not in self.names:
            name = f"a{len(self.names)}"
            path = local_copy(_version(lora, self.s3), f"adapter {lora}", self.s3)
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.model.eval()
            self.names[lora] = name
        return self.names[lora]

    def answer(self, loras: list[str], prompts: list[str]) -> list[str]:
        """Each (adapter, prompt)'s answer, `batch_size` a `generate` call: adapter by adapter, longest first."""
        texts = [_chat_prompt(self.tokenizer, p) for p in prompts]
        names = [self._name(lora) for lora in loras]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: (names[i], -lengths[i]))
        answers = [""] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, answer in zip(idx, self._generate([texts[i] for i in idx], [names[i] for i in idx]), strict=True):
                answers[i] = answer
        return answers

    def generate(self, lora: str, prompts: list[str]) -> list[str]:
        """One adapter's answers ('' for the aligned model alone)."""
        return self.answer([lora] * len(prompts), prompts)

    def _generate(self, texts: list[str], names: list[str]) -> list[str]:
        import torch

        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        model, routing, off = self.model or self.base, {}, contextlib.nullcontext()
        if self.model is not None and len(set(names)) > 1:
            routing = {"adapter_names": names}  # each row through its own adapter
        elif self.model is not None and names[0] == BASE:
            off = self.model.disable_adapter()  # the aligned model alone: the loaded adapters switched off
        elif self.model is not None:
            self.model.set_adapter(names[0])
        with off, torch.no_grad():
            out = model.generate(**batch, **routing, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, batch: dict) -> dict:
        """A Ray Data batch of rows, whatever their adapters."""
        return {**batch, "response": self.answer([str(x) for x in batch["lora"]], [str(x) for x in batch["prompt"]])}


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
    elif not gpus:
        kwargs["threads"] = threads_each(spec.replicas)
    # A Ray batch holds one adapter's prompts, of about one length where it can (see TransformersReplica).
    rows = sorted(rows, key=lambda r: (r["lora"], len(r["prompt"]), r["prompt"]))
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
