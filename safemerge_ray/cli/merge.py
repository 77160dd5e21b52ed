"""`safemerge-ray merge`: repair one fine-tuned adapter."""

from __future__ import annotations

import argparse

from ..errors import ExitStatus
from ..options import add_merge_flags


def add_parsers(sub) -> None:
    m = sub.add_parser("merge", help="repair one fine-tuned LoRA adapter with SafeMERGE")
    m.add_argument("--unaligned", required=True, help="pre-alignment base model (dir, s3://, or hub id)")
    m.add_argument("--aligned", required=True, help="aligned chat model the adapters were trained on")
    m.add_argument("--safety-adapter", help="task-agnostic safety LoRA (required for policy safemerge)")
    m.add_argument("--finetuned", required=True, help="the fine-tuned LoRA adapter to repair")
    m.add_argument("--out", required=True, help="output directory (replaced atomically)")
    add_merge_flags(m)  # --policy, --tau, --weights, --method, ...: MergeSettings' fields
    m.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    m.add_argument("--quiet", action="store_true", help="no progress lines")
    m.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from ..engine import merge_to_dir
    from ..options import merge_settings
    from ..views import format_table

    settings = merge_settings(args)
    summary = merge_to_dir(
        unaligned=args.unaligned, aligned=args.aligned, safety_adapter=args.safety_adapter,
        finetuned=args.finetuned, out=args.out, settings=settings, device=args.device,
        progress=not args.quiet,
    )
    c = summary["counts"]
    print(format_table(summary["decisions"]))
    print(f"\n{c['repaired']} of {c['modules']} modules repaired ({settings.policy}, {settings.method}, "
          f"tau={settings.tau}); actions: {c['actions']}")
    print(f"merged adapter: {args.out}")
    return ExitStatus.OK
