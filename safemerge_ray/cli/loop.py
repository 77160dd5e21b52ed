"""`safemerge-ray train-safety` and `eval`: their settings are declared once (pydantic fields are the flags)."""

from __future__ import annotations

import argparse

from ..errors import ExitStatus


def add_parsers(sub) -> None:
    from ..loop import EvalSettings, TrainSettings
    from ..options import add_flags

    t = sub.add_parser("train-safety", help="train the task-agnostic safety LoRA on Ray (Ray Train + TRL SFT + PEFT)")
    add_flags(t, TrainSettings)
    t.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a new local Ray)")
    t.add_argument("--quiet", action="store_true", help="none of Ray's or the trainer's own log lines")
    t.set_defaults(func=cmd_train_safety)

    e = sub.add_parser("eval", help="harmful rate and task score of the aligned model, each fine-tune and its "
                                    "repaired adapter (Ray Data generation, a refusal judge or a classifier)")
    add_flags(e, EvalSettings)
    e.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a new local Ray)")
    e.add_argument("--quiet", action="store_true", help="none of Ray's own log lines")
    e.set_defaults(func=cmd_eval)


def cmd_train_safety(args: argparse.Namespace) -> int:
    from ..loop import TrainSettings, train_safety
    from ..options import load_settings

    result = train_safety(load_settings(TrainSettings, args), progress=not args.quiet, ray_address=args.address)
    losses = result.manifest["losses"]
    print(f"loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f} over {result.manifest['steps']} steps")
    print(f"safety adapter: {result.adapter}")
    return ExitStatus.OK


def cmd_eval(args: argparse.Namespace) -> int:
    from ..loop import EvalSettings, format_summary, run_eval
    from ..options import load_settings

    settings = load_settings(EvalSettings, args)
    result = run_eval(settings, progress=not args.quiet, ray_address=args.address)
    print(format_summary(result.summary))
    print(f"eval: {settings.output} ({result.table.num_rows} answers)")
    return ExitStatus.OK
