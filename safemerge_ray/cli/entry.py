"""Repair LoRA fine-tunes whose safety alignment eroded (SafeMERGE, ICLR 2025): one adapter with `merge`, or a
whole fleet on Ray with `fleet`, and keep the published adapters verified, explained and servable.

Mistakes print one line; exit status 0: done, 1: environment (credentials, network, disk), 2: bad input or
config (nothing done), 3: some adapters failed or were held back (the rest are usable), 4: none is usable,
5: another run holds the output's lock, 130: interrupted. `safemerge-ray COMMAND --help` for each command.
"""

from __future__ import annotations

import argparse
import difflib
import sys

from .. import __version__
from ..errors import ExitStatus, SafeMergeError
from . import fleet, loop, merge, output, synth


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemerge-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"safemerge-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (merge, fleet, output, loop, synth):  # each adds its commands, in the order help lists them
        group.add_parsers(sub)
    for action in sub._choices_actions:  # each command's `--help` opens with its one line
        sub.choices[action.dest].description = action.help
    return parser


def _unknown_flag(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The first `--flag` the chosen command does not have, with the flag it is most like: argparse would
    report a missing required flag first (`--confg` as a missing `--config`)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None or command not in sub.choices:
        return None
    known = list(sub.choices[command]._option_string_actions)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and not any(k.startswith(flag) for k in known):  # argparse takes a prefix
            close = difflib.get_close_matches(flag, known, n=1)
            return f"unrecognized argument {flag}" + (f" (did you mean {close[0]}?)" if close else "")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    unknown = _unknown_flag(parser, argv)
    if unknown:
        parser.error(unknown)
    args = parser.parse_args(argv)
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
