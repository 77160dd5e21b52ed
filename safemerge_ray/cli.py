"""`safemerge-ray` command line. User mistakes print one clear line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import sys

from .errors import SafeMergeError

# Exit status: 0 done; 1 environment error (disk, permissions); 2 bad input or config, nothing done;
# 3 (fleet) partial: some adapters failed, the rest committed; 4 (fleet) every adapter failed; 130 interrupted.
EXIT_OK, EXIT_USAGE = 0, 2


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.8,0.2; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemerge-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="repair one fine-tuned LoRA adapter with SafeMERGE")
    m.add_argument("--unaligned", required=True, help="pre-alignment base model (dir, s3://, or hub id)")
    m.add_argument("--aligned", required=True, help="aligned chat model the adapters were trained on")
    m.add_argument("--safety-adapter", help="task-agnostic safety LoRA (required for policy safemerge)")
    m.add_argument("--finetuned", required=True, help="the fine-tuned LoRA adapter to repair")
    m.add_argument("--out", required=True, help="output directory (replaced atomically)")
    m.add_argument("--tau", type=float, default=0.35, help="similarity threshold (default 0.35)")
    m.add_argument("--weights", type=_weights, default=(0.8, 0.2),
                   help="fine-tune,safety weights for merged layers (default 0.8,0.2)")
    m.add_argument("--method", default="linear",
                   help="linear | cat | ties | dare_linear | dare_ties | magnitude_prune (default linear)")
    m.add_argument("--policy", default="safemerge", help="safemerge (merge) | safelora (project) (default safemerge)")
    m.add_argument("--density", type=float, default=None, help="kept fraction for ties/dare/magnitude_prune")
    m.add_argument("--majority-sign-method", default="total", help="total | frequency (ties, dare_ties)")
    m.add_argument("--seed", type=int, default=0, help="seed for DARE's random drop (default 0)")
    m.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    m.add_argument("--quiet", action="store_true", help="no progress lines")

    f = sub.add_parser("fleet", help="repair every fine-tune of a fleet config on Ray (starts or joins Ray)")
    f.add_argument("--config", required=True, help="fleet config YAML")
    f.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, a local `ray start`, or a new local Ray)")
    f.add_argument("--quiet", action="store_true", help="no progress lines")

    s = sub.add_parser("synth", help="build a small synthetic model pair and adapters (demo and tests)")
    s.add_argument("--out", required=True, help="directory to create")
    s.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    s.add_argument("--hidden", type=int, default=64)
    s.add_argument("--intermediate", type=int, default=None)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--finetunes", type=int, default=1, help="number of fine-tuned adapters")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--write-config", action="store_true", help="also write OUT/fleet.yaml for `fleet`")
    return parser


def cmd_merge(args) -> int:
    from .merge import MergeSettings
    from .repair import merge_to_dir
    from .report import format_table

    settings = MergeSettings(
        policy=args.policy, tau=args.tau, weights=tuple(args.weights), method=args.method,
        density=args.density, majority_sign_method=args.majority_sign_method, seed=args.seed,
    )
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
    return EXIT_OK


def cmd_fleet(args) -> int:
    from .config import load_config
    from .fleet import format_report, run_fleet

    config = load_config(args.config)
    report = run_fleet(config, progress=not args.quiet, ray_address=args.address)
    print(format_report(report))
    return report.exit_code


def cmd_synth(args) -> int:
    from .synthetic import SynthSpec, build_fixture

    spec = SynthSpec(arch=args.arch, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                     rank=args.rank, dtype=args.dtype, seed=args.seed)
    paths = build_fixture(args.out, spec, n_finetunes=args.finetunes)
    for role, path in paths.items():
        print(f"{role}: {path}")
    if args.write_config:
        from .synthetic import write_fleet_config

        print(f"fleet config: {write_fleet_config(args.out)}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"merge": cmd_merge, "fleet": cmd_fleet, "synth": cmd_synth}[args.command](args)
    except SafeMergeError as exc:
        print(f"safemerge-ray: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # disk full, permissions: the environment, not a bug
        print(f"safemerge-ray: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("safemerge-ray: interrupted; nothing was committed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
