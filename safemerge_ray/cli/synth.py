"""`safemerge-ray synth`: a small synthetic model pair and adapters, for the demo and the tests."""

from __future__ import annotations

import argparse

from ..errors import ExitStatus


def add_parsers(sub) -> None:
    s = sub.add_parser("synth", help="build a small synthetic model pair and adapters (demo and tests)")
    s.add_argument("--out", required=True, help="directory to create")
    s.add_argument("--arch", default="llama", choices=["llama", "qwen2"], help="model family (default llama)")
    s.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    s.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2 x hidden)")
    s.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    s.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter (default 8)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the models' weight dtype (default float32)")
    s.add_argument("--finetunes", type=int, default=1, help="number of fine-tuned adapters")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--write-config", action="store_true", help="also write OUT/fleet.yaml for `fleet`")
    s.add_argument("--output", default="merged",
                   help="the fleet output written into that config (default: merged, beside the config)")
    s.add_argument("--loop", action="store_true",
                   help="also write the loop's data (OUT/data/: safety.jsonl, harmful.txt, task.jsonl) and configs "
                        "(OUT/train.yaml, OUT/fleet.yaml with a gate, OUT/eval.yaml): make demo-loop")
    s.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from ..synthetic import SynthSpec, build_fixture, write_fleet_config, write_loop_configs, write_loop_data

    spec = SynthSpec(arch=args.arch, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                     rank=args.rank, dtype=args.dtype, seed=args.seed)
    paths = build_fixture(args.out, spec, n_finetunes=args.finetunes)
    for role, path in paths.items():
        print(f"{role}: {path}")
    if args.write_config:
        print(f"fleet config: {write_fleet_config(args.out, output=args.output)}")
    if args.loop:
        for role, path in {**write_loop_data(args.out), **write_loop_configs(args.out, output=args.output)}.items():
            print(f"{role}: {path}")
    return ExitStatus.OK
