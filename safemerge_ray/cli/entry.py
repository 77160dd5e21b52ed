"""`safemerge-ray` command line. User mistakes print one clear line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import sys

from ..errors import ExitStatus, SafeMergeError
from . import fleet, loop, merge, output, synth


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemerge-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (merge, fleet, output, loop, synth):  # each adds its commands, in the order help lists them
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SafeMergeError as exc:  # inputs (2) or environment (1): one line, no traceback
        print(f"safemerge-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, permissions: the environment, not a bug
        print(f"safemerge-ray: error: {exc}", file=sys.stderr)
        return ExitStatus.ENVIRONMENT
    except KeyboardInterrupt:
        what = "nothing was committed" if args.command == "merge" else "pointers move only with a completed commit"
        print(f"safemerge-ray: interrupted; {what}", file=sys.stderr)
        return ExitStatus.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
