"""`safemerge-ray train-safety` and `eval`: their settings are declared once (pydantic fields are the flags)."""

from __future__ import annotations

import argparse

from ..errors import ExitStatus


def add_parsers(sub) -> None:
    from ..loop import EvalSettings, TrainSettings
    from ..options import add_flags
    from ..service import add_service_flags

    t = sub.add_parser("train-safety", help="train the task-agnostic safety LoRA on Ray (Ray Train + TRL SFT + PEFT)")
    add_flags(t, TrainSettings)
    t.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a new local Ray)")
    t.add_argument("--quiet", action="store_true", help="none of Ray's or the trainer's own log lines")
    add_service_flags(t)
    t.set_defaults(func=cmd_train_safety)

    e = sub.add_parser("eval", help="harmful rate and task score of the aligned model, each fine-tune and its "
                                    "repaired adapter (Ray Data generation, a refusal judge or a classifier)")
    add_flags(e, EvalSettings)
    e.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a new local Ray)")
    e.add_argument("--quiet", action="store_true", help="none of Ray's own log lines")
    add_service_flags(e)
    e.set_defaults(func=cmd_eval)


def cmd_train_safety(args: argparse.Namespace) -> int:
    from ..loop import TrainSettings, train_safety
    from ..options import load_settings
    from ..service import Command, reporting, with_flags

    settings = load_settings(TrainSettings, args)
    with reporting(Command.TRAIN, *with_flags(settings.metrics, settings.tracking, args)) as run:
        result = train_safety(settings, progress=not args.quiet, ray_address=args.address)
        run.run_id = result.manifest["run_id"]
        run.tracked = lambda outcome: _tracked_training(result, outcome)
    losses = result.manifest["losses"]
    print(f"loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f} over {result.manifest['steps']} steps")
    print(f"safety adapter: {result.adapter}")
    return ExitStatus.OK


def cmd_eval(args: argparse.Namespace) -> int:
    from ..loop import EvalSettings, format_summary, run_eval
    from ..options import load_settings
    from ..service import Command, reporting, with_flags

    settings = load_settings(EvalSettings, args)
    with reporting(Command.EVAL, *with_flags(settings.metrics, settings.tracking, args)) as run:
        result = run_eval(settings, progress=not args.quiet, ray_address=args.address)
        run.tracked = lambda outcome: _tracked_eval(result, outcome)
    print(format_summary(result.summary))
    print(f"eval: {settings.output} ({result.table.num_rows} answers)")
    return ExitStatus.OK


def _tracked_training(result, outcome):
    """The training run as MLflow shows it: its settings and inputs, the loss per step, its manifest."""
    from ..io import json_bytes
    from ..service import Command, TrackedRun

    manifest = result.manifest
    params = {f"train.{k}": str(v) for k, v in manifest["settings"].items()}
    params.update({"lora.r": str(manifest["lora"]["r"]), "lora.alpha": str(manifest["lora"]["lora_alpha"]),
                   "lora.target_modules": str(manifest["lora"]["target_modules"]),
                   "input.aligned_model.fingerprint": manifest["aligned_model"]["fingerprint"],
                   "input.data.sha256": manifest["data"]["sha256"], "adapter": result.adapter})
    losses = [(int(step), float(loss)) for step, loss in manifest["losses"]]
    metrics = {"final_loss": losses[-1][1]} if losses else {}
    return TrackedRun(Command.TRAIN, outcome, params=params, metrics=metrics, steps={"loss": losses},
                      artifacts={"manifest.json": json_bytes(manifest)})


def _tracked_eval(result, outcome):
    """The evaluation as MLflow shows it: per variant, the harmful rate and task score with their intervals."""
    from ..loop import EVAL_SUMMARY
    from ..service import Command, TrackedRun

    summary = result.summary
    metrics: dict[str, float] = {}
    variants = {"aligned": summary["aligned"]}
    for name, entry in summary["adapters"].items():
        variants.update({f"{name}.finetune": entry["finetune"], f"{name}.repaired": entry["repaired_adapter"]})
    for variant, numbers in variants.items():
        for measure in ("harmful_rate", "task_score"):
            value = numbers.get(measure) or {}
            if value.get("mean") is not None:
                metrics[f"{variant}.{measure}"] = value["mean"]
                metrics[f"{variant}.{measure}.ci95_low"], metrics[f"{variant}.{measure}.ci95_high"] = value["ci95"]
    params = {f"eval.{k}": str(v) for k, v in summary["settings"].items() if k != "adapters"}
    return TrackedRun(Command.EVAL, outcome, params=params, metrics=metrics,
                      artifacts={EVAL_SUMMARY: result.files()[EVAL_SUMMARY]})
