"""`train-safety`: the one task-agnostic safety LoRA, trained with Ray Train and TRL's SFT trainer.

The driver checks the data (every bad line named), reads the LoRA shape from a fleet fine-tune, and runs
a `TorchTrainer` (data-parallel workers, GPU when there is one). Each worker trains with TRL's
`SFTTrainer` and PEFT; rank 0 reports full Hugging Face checkpoints (adapter, optimizer, step) to Ray
Train's storage under `OUTPUT/checkpoints/`, so a restarted worker group resumes from the last one.
The driver publishes the final adapter under a new version, `OUTPUT/adapters/RUN/`, and writes
`OUTPUT/manifest.json` last: the version, the adapter's sha256s, the base model's and the data's
fingerprints, the settings and the loss curve. Give `OUTPUT` to `merge` or `fleet` as the safety adapter:
it stands for the version its manifest names, so a second training never changes bytes under a reader.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..cluster import cluster_gpus, init_ray
from ..errors import EnvironmentFailure, SafeMergeError, first_line
from ..io import (
    TRAINED_KIND,
    TRAINED_MANIFEST,
    Checkpoint,
    Dir,
    S3Settings,
    json_bytes,
    load_adapter,
    load_tokenizer,
    local_or_s3,
    model_path,
    open_dir,
    read_file,
    read_json,
    resolve_location,
    sha256_of,
)
from ..options import S3Section
from ..progress import log
from ..service import MetricsSection, TrackingSection
from ..store import new_run_id, utc_now, write_verified

MANIFEST = TRAINED_MANIFEST
VERSIONS = "adapters/"  # one directory per run; the manifest names the current one
LEGACY = "adapter"  # where outputs written before versions keep their adapter
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
KIND = TRAINED_KIND
_ROLES = ("system", "user", "assistant")
MAX_LISTED = 10  # bad lines named in one error


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    PATHS: ClassVar[dict[str, str]] = {"aligned_model": "location", "data": "file", "output": "file",
                                       "like": "location"}

    aligned_model: str = Field(description="the aligned chat model the fleet's adapters were trained on "
                                           "(dir, s3:// or hub id)")
    data: str = Field(description="JSONL: Alpaca {instruction, input, output} or chat {messages: [...]} "
                                  "(a local file or s3://)")
    output: str = Field(description="where checkpoints, the final adapter and its manifest go (dir or s3://)")
    like: str | None = Field(None, description="a fine-tune of the fleet: its rank, alpha and target modules "
                                               "are the defaults, so the safety adapter matches the fleet")
    rank: int | None = Field(None, ge=1, description="LoRA rank (default: --like's, else 16)")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: --like's, else 2 x rank)")
    target_modules: list[str] | None = Field(None, description="module names to adapt (default: --like's, "
                                                               "else every linear layer)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    workers: int = Field(2, ge=1, description="data-parallel training workers (Ray Train)")
    use_gpu: Literal["auto"] | bool = Field("auto", description="train on GPUs: auto (when the cluster has "
                                                                "them), true or false")
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="examples per worker per step")
    learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate (linear decay)")
    max_length: int = Field(1024, ge=8, description="tokens per example; longer ones are truncated")
    save_steps: int = Field(50, ge=1, description="checkpoint every this many steps")
    seed: int = Field(0, description="seed for initialisation and data order")
    s3: S3Section = S3Section()
    metrics: MetricsSection | None = None  # README: monitoring
    tracking: TrackingSection | None = None


@dataclass(frozen=True)
class LoraShape:
    rank: int
    alpha: float
    targets: list[str] | str  # names, or PEFT's "all-linear"
    use_rslora: bool = False


@dataclass
class TrainResult:
    adapter: str  # what `merge` / `fleet` take as safety_adapter
    manifest: dict


# --------------------------------------------------------------------------- data


def read_examples(data: bytes, source: str) -> list[dict]:
    """Alpaca or chat JSONL -> TRL's conversational prompt/completion rows, the loss on the last answer.
    Every bad line is named (the first MAX_LISTED), in one error."""
    rows, problems = [], []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(_example(line))
        except ValueError as exc:
            problems.append(f"{source}:{number}: {exc}")
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more bad lines" if len(problems) > MAX_LISTED else ""
        raise SafeMergeError("training data: " + "\n  ".join(problems[:MAX_LISTED]) + more)
    if not rows:
        raise SafeMergeError(f"training data: {source} has no examples (empty file)")
    return rows


def _example(line: bytes) -> dict:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        return _chat(record["messages"])
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str) or not record[k].strip()]
    if missing:
        raise ValueError(f"missing or empty field {' and '.join(repr(m) for m in missing)} (Alpaca: instruction, "
                         "input, output; or chat: messages)")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError("field 'input' must be a string")
    prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": record["output"]}]}


def _chat(messages) -> dict:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("'messages' must be a list of at least a user and an assistant message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{role: system|user|assistant, content: text}}")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise ValueError("the last message must be the assistant's answer (what is trained)")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise ValueError("no user message before the answer")
    return {"prompt": [dict(role=m["role"], content=m["content"]) for m in messages[:-1]],
            "completion": [{"role": "assistant", "content": messages[-1]["content"]}]}


# --------------------------------------------------------------------------- the LoRA's shape


def lora_shape(settings: TrainSettings) -> LoraShape:
    """The fine-tune's shape (`like`), with what the settings give on top."""
    rank, alpha, rslora = 16, None, False
    targets: list[str] | str = "all-linear"
    if settings.like:
        like = load_adapter(open_dir(settings.like, what="like", s3=_s3(settings)), "like")
        ranks = {m.rank for m in like.modules.values()}
        rank = max(ranks)
        alpha = like.config.get("lora_alpha")
        targets = sorted({m.rsplit(".", 1)[-1] for m in like.modules})
        rslora = bool(like.config.get("use_rslora"))
    rank = settings.rank or rank
    return LoraShape(rank, settings.lora_alpha or alpha or 2 * rank, settings.target_modules or targets, rslora)


def _s3(settings: TrainSettings) -> S3Settings:
    return settings.s3.settings()


# --------------------------------------------------------------------------- on the workers


def _train_loop(cfg: dict) -> None:
    """One Ray Train worker: TRL's SFT trainer with a PEFT LoRA, reporting to Ray Train."""
    import ray.train
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from ray.train.huggingface.transformers import prepare_trainer
    from trl import SFTConfig, SFTTrainer

    path = model_path(cfg["model"], "aligned model", cfg["s3"])
    tokenizer = load_tokenizer(path, "aligned model")
    gpu = torch.cuda.is_available() and cfg["use_gpu"] is not False
    bf16 = gpu and torch.cuda.is_bf16_supported()
    shape: LoraShape = cfg["shape"]
    work = tempfile.mkdtemp(prefix="safemerge-train-")
    args = SFTConfig(
        output_dir=work, max_steps=cfg["max_steps"], per_device_train_batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"], max_length=cfg["max_length"], seed=cfg["seed"], data_seed=cfg["seed"],
        logging_steps=1, save_strategy="steps", save_steps=cfg["save_steps"], save_total_limit=1,
        report_to="none", disable_tqdm=True, use_cpu=not gpu, bf16=bf16, ddp_find_unused_parameters=False,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
    )
    peft_config = LoraConfig(r=shape.rank, lora_alpha=shape.alpha,  # type: ignore[arg-type]  # a float works
                             target_modules=shape.targets, lora_dropout=cfg["lora_dropout"],
                             use_rslora=shape.use_rslora, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=path, args=args, train_dataset=Dataset.from_list(cfg["rows"]),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[_report_to_ray()])
    trainer = prepare_trainer(trainer)  # type: ignore[assignment]  # a subclass of the SFTTrainer given
    resume = ray.train.get_checkpoint()
    if resume is None:
        trainer.train()
    else:
        with resume.as_directory() as d:
            trainer.train(resume_from_checkpoint=str(Path(d) / "checkpoint"))
    shutil.rmtree(work, ignore_errors=True)


def _report_to_ray():
    """A transformers callback (built here: transformers is imported on the workers only): rank 0 reports
    each Hugging Face checkpoint, and at the end the final adapter with its loss curve; every rank reports
    (Ray Train's reports are collective)."""
    from transformers import TrainerCallback

    class ReportToRay(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            from transformers.trainer_utils import get_last_checkpoint

            _report(state, lambda d: shutil.copytree(get_last_checkpoint(args.output_dir), d / "checkpoint"))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            _report(state, lambda d: model.save_pretrained(str(d / "adapter")), final=True)

    return ReportToRay()


def _report(state, write, final: bool = False) -> None:
    import ray.train

    losses = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
    metrics = {"step": state.global_step, "loss": losses[-1][1] if losses else float("nan"), "final": final}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        (Path(tmp) / "losses.json").write_text(json.dumps(losses))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# --------------------------------------------------------------------------- the driver


def check_output(out) -> None:
    """An empty location or an earlier train-safety output (its adapter and manifest are replaced)."""
    if out.local_path is not None and out.local_path.exists() and not out.local_path.is_dir():
        raise SafeMergeError(f"output: {out.uri} is a file")
    occupied = bool(out.list() or out.subdirs())
    manifest = read_json(out, MANIFEST) if occupied else None
    if occupied and not (manifest and manifest.get("kind") == KIND) and set(out.subdirs()) != {"checkpoints"}:
        raise SafeMergeError(f"output: {out.uri} is not empty and is not a train-safety output; "
                             "refusing to write into it")


def train_safety(settings: TrainSettings, progress: bool = True, ray_address: str | None = None) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchTrainer


    s3 = _s3(settings)
    data = read_file(settings.data, "data", s3)
    rows = read_examples(data, settings.data)
    shape = lora_shape(settings)
    aligned = resolve_location(settings.aligned_model)
    base = Checkpoint(open_dir(aligned, what="aligned model", s3=s3), "aligned model")
    load_tokenizer(model_path(aligned, "aligned model", s3), "aligned model")  # a chat template, before Ray
    out = open_dir(local_or_s3(settings.output), what="output", s3=s3, must_exist=False)
    check_output(out)
    run_id = new_run_id()
    log("train", f"{len(rows)} examples; LoRA rank {shape.rank}, alpha {shape.alpha}, targets {shape.targets}; "
                 f"{settings.workers} workers, {settings.max_steps} steps; run {run_id}")
    # Ray Train's print patch would log every line datasets' hashing disassembles (dill captures it itself).
    init_ray(ray_address, {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}, quiet=not progress)
    storage_path, filesystem = out.arrow_location("checkpoints")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"model": aligned, "s3": s3, "rows": rows, "shape": shape, "use_gpu": settings.use_gpu,
                           **settings.model_dump(include={"max_steps", "batch_size", "learning_rate", "max_length",
                                                          "save_steps", "seed", "lora_dropout"})},
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=_use_gpu(settings)),
        run_config=ray.train.RunConfig(name=run_id, storage_path=storage_path, storage_filesystem=filesystem,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=2)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise EnvironmentFailure(f"training failed: {_cause(exc)}") from None
    if result.checkpoint is None:
        raise EnvironmentFailure("training ended without a final checkpoint")
    with result.checkpoint.as_directory() as d:
        final = Path(d)
        if not (final / "adapter").is_dir():
            raise EnvironmentFailure(f"the last checkpoint ({result.checkpoint.path}) holds no final adapter")
        files = {name: (final / "adapter" / name).read_bytes() for name in ADAPTER_FILES}
        losses = json.loads((final / "losses.json").read_text())
    manifest = {
        "tool": "safemerge-ray", "kind": KIND, "run_id": run_id, "created_at": utc_now(),
        "aligned_model": {"uri": aligned, "fingerprint": base.fingerprint()},
        "data": {"uri": settings.data, "sha256": sha256_of(data), "examples": len(rows)},
        "lora": {"r": shape.rank, "lora_alpha": shape.alpha, "target_modules": shape.targets,
                 "use_rslora": shape.use_rslora},
        "settings": settings.model_dump(mode="json", exclude={"s3", "metrics", "tracking"}),
        "steps": losses[-1][0] if losses else 0, "losses": losses,
        "checkpoints": f"{out.uri.rstrip('/')}/checkpoints/{run_id}",
    }
    version = publish(out, run_id, files, manifest)
    log("train", f"loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f} over {manifest['steps']} steps; "
                 f"safety adapter: {out.uri} (now {version})")
    return TrainResult(out.uri, manifest)


def publish(out: Dir, run_id: str, files: dict[str, bytes], manifest: dict) -> str:
    """The adapter under a new version, verified, then the manifest naming it, written last. Versions
    other than this one and the one the previous manifest named (someone may still be reading it) go."""
    previous = read_json(out, MANIFEST)  # check_output made sure it is ours, or absent
    version = f"{VERSIONS}{run_id}"
    manifest["objects"] = {f"{version}/{n}": write_verified(out, f"{version}/{n}", d) for n, d in files.items()}
    load_adapter(out.child(version), "trained safety adapter")  # what merge and fleet will read
    manifest["adapter"] = version
    out.write(MANIFEST, json_bytes(manifest))
    keep = {version, str((previous or {}).get("adapter", LEGACY))}
    stale = [key for key in out.walk(VERSIONS) + out.walk(f"{LEGACY}/") if key.rsplit("/", 1)[0] not in keep]
    out.delete(stale)
    return version


def _use_gpu(settings: TrainSettings) -> bool:
    if settings.use_gpu != "auto":
        return bool(settings.use_gpu)
    return cluster_gpus() >= settings.workers


def _cause(exc: BaseException) -> str:
    """The worker's own error, one line, out of Ray Train's wrapping."""
    while True:
        inner = exc.__cause__ or getattr(exc, "cause", None)
        errors = getattr(exc, "worker_failures", None) or {}
        if errors:
            inner = next(iter(errors.values()))
        if not isinstance(inner, BaseException) or inner is exc:
            return first_line(exc)
        exc = inner
