"""The README and the CLI's own help agree: every command and flag is documented, and every
`safemerge-ray ...` line in the README uses only flags that command has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from safemerge_ray.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands() -> dict[str, set[str]]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: {opt for action in p._actions if action.help != argparse.SUPPRESS
                   for opt in action.option_strings if opt.startswith("--") and opt != "--help"}
            for name, p in sub.choices.items()}


def test_every_command_and_flag_is_in_the_readme():
    missing = [f"{cmd} {flag}" for cmd, flags in _commands().items() for flag in sorted(flags)
               if flag not in README]
    missing += [cmd for cmd in _commands() if f"safemerge-ray {cmd}" not in README]
    assert not missing, f"README.md does not document: {missing}"


def test_readme_command_lines_use_real_flags():
    commands = _commands()
    wrong = []
    for line in README.splitlines():
        for match in re.finditer(r"safemerge-ray (\w+)([^`#]*)", line):
            cmd, rest = match.groups()
            if cmd not in commands:
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                if flag not in commands[cmd]:
                    wrong.append(f"{cmd} {flag}: {line.strip()[:100]}")
    assert not wrong, "README uses flags a command does not have:\n" + "\n".join(wrong)
