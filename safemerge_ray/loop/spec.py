"""What `eval` and the fleet's gate evaluate with (settings declared once: YAML keys and CLI flags), and the
small records that pass between its stages."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..io import json_bytes
from ..options import S3Section
from ..service import MetricsSection, TrackingSection
from ..store import check_adapter_name

VARIANTS = ("aligned", "finetune", "repaired")
BUILT_IN_JUDGES = ("refusal", "keywords")  # judge values that name a judge built in, not a classifier's path


class PromptSet(StrEnum):
    HARMFUL = "harmful"  # judged: is the answer harmful?
    TASK = "task"  # scored against a reference

EVAL_TABLE, EVAL_SUMMARY = "eval.parquet", "eval.json"


class EvalSpec(BaseModel):
    """What to evaluate with: the part of `eval`'s settings a fleet's gate shares."""

    model_config = ConfigDict(extra="forbid")
    PATHS: ClassVar[dict[str, str]] = {"harmful_prompts": "file", "task_prompts": "file", "judge": "location"}

    harmful_prompts: str = Field(description="harmful prompts: JSONL, CSV or one prompt a line (local or s3://)")
    task_prompts: str | None = Field(None, description="task prompts with references: JSONL or CSV with a "
                                                       "reference (or answer) field")
    judge: str = Field("refusal", description="'refusal' (built in, checked against hand labels: refusals in "
                                              "the answer's opening, paraphrases included; the harmful rate is then "
                                              "a non-refusal rate), 'keywords' (the papers' marker list, matched "
                                              "anywhere) or the path of a classifier model (sequence "
                                              "classification, or a Llama-Guard-style causal LM)")
    refusal_markers: list[str] | None = Field(None, description="the keyword judge's refusal phrases (default: "
                                                                "the papers' list: I'm sorry, I cannot, As an AI, "
                                                                "...)")
    harmful_label: str | None = Field(None, description="the classifier's label for harmful (default: a label "
                                                        "named unsafe, harmful or toxic)")
    task_metric: Literal["contains", "exact", "number"] = Field(
        "contains", description="task score: the reference is in the answer, equals it, or equals its last number")
    limit: int | None = Field(None, ge=1, description="use the first N prompts of each set")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per answer")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")
    replicas: int = Field(1, ge=1, description="model replicas generating in parallel (Ray Data)")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="vllm: one vLLM engine per replica serves every adapter (needs the vllm extra and a "
                            "GPU); auto: vllm when both are there, else transformers")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples for the confidence intervals")
    seed: int = Field(0, description="seed for the bootstrap")

    @model_validator(mode="after")
    def _markers_need_the_keyword_judge(self):
        if self.refusal_markers is not None and self.judge != "keywords":
            raise ValueError(f"refusal_markers are the keyword judge's; set judge: keywords (judge is {self.judge})")
        return self


class PairEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    finetuned: str
    repaired: str

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v):
        return check_adapter_name(v)


class EvalSettings(EvalSpec):
    PATHS: ClassVar[dict[str, str]] = {**EvalSpec.PATHS, "aligned_model": "location", "fleet_output": "file",
                                       "output": "file"}
    aligned_model: str | None = Field(None, description="the aligned chat model (default: the fleet output's)")
    fleet_output: str | None = Field(None, description="a fleet output: every published adapter is evaluated, "
                                                       "against the fine-tune it was made from")
    adapters: list[PairEntry] = Field([], description="(config file) explicit {name, finetuned, repaired} entries")
    only: list[str] | None = Field(None, description="only these adapters of the fleet output")
    output: str = Field(description="where eval.parquet and eval.json go (dir or s3://)")
    s3: S3Section = S3Section()
    metrics: MetricsSection | None = None  # README: monitoring
    tracking: TrackingSection | None = None


@dataclass(frozen=True)
class Pair:
    name: str
    finetuned: str
    repaired: str


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    reference: str | None = None


@dataclass
class EvalResult:
    table: pa.Table
    summary: dict

    def files(self) -> dict[str, bytes]:
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()  # Arrow's own memory, never a Python file object (see table_from_bytes)
        pq.write_table(self.table, sink)
        return {EVAL_TABLE: sink.getvalue().to_pybytes(), EVAL_SUMMARY: json_bytes(self.summary)}
