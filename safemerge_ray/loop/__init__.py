"""Closing the loop: train the safety adapter, evaluate repaired adapters, and gate what the fleet publishes.

    train       `train-safety`: the safety LoRA on Ray Train (TRL's SFT trainer with PEFT)
    spec        what an evaluation uses (settings declared once) and the records between its stages
    prompts     prompt files, every bad line named
    generation  answers from model replicas on Ray Data (transformers, or vLLM on a GPU)
    judges      the refusal judge (checked against hand labels), the keyword judge, a classifier, task metrics
    summary     harmful rate and task score with bootstrap intervals
    evaluation  `eval`: the stages in order, and the fleet output's published adapters
    gate        the fleet's gate: what fails it is held back
"""

from .evaluation import evaluate, published_pairs, run_eval
from .gate import GateOutcome, GateSection, run_gate, verdict
from .judges import (
    GARAK_REFUSALS,
    REFUSAL_MARKERS,
    TASK_METRICS,
    ClassifierJudge,
    Judgement,
    guard_verdict,
    keyword_judgements,
    refusal_judgements,
)
from .prompts import read_prompt_sets, read_prompts
from .spec import EVAL_SUMMARY, EVAL_TABLE, EvalResult, EvalSettings, EvalSpec, Pair, PromptSet
from .summary import bootstrap_ci, format_summary, summarise
from .train import TrainResult, TrainSettings, lora_shape, read_examples, train_safety

__all__ = [
    "EVAL_SUMMARY", "EVAL_TABLE", "GARAK_REFUSALS", "REFUSAL_MARKERS", "TASK_METRICS", "ClassifierJudge", "EvalResult",
    "EvalSettings", "EvalSpec", "GateOutcome", "GateSection", "Judgement", "Pair", "PromptSet", "TrainResult",
    "TrainSettings", "bootstrap_ci", "evaluate", "format_summary", "guard_verdict", "keyword_judgements",
    "lora_shape", "published_pairs", "read_examples", "read_prompt_sets", "read_prompts", "refusal_judgements",
    "run_eval", "run_gate", "summarise", "train_safety", "verdict",
]
