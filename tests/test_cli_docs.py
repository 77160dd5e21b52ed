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


def _schema_keys():
    from pydantic import BaseModel

    from safemerge_ray.fleet.config import FleetSchema

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            if isinstance(field.default, BaseModel):
                yield from walk(type(field.default), f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field
    return dict(walk(FleetSchema))


def test_the_config_reference_matches_the_schema():
    import yaml

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \| [^|]+ \| ([^|]+) \|", doc, re.M)}
    keys = _schema_keys()
    assert set(rows) == set(keys), f"docs/config.md differs from the schema: {set(rows) ^ set(keys)}"
    for key, field in keys.items():
        documented = rows[key].strip()
        if field.is_required():
            assert documented == "required", key
            continue
        shown = re.match(r"`([^`]*)`", documented)
        assert shown, (key, documented)
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        assert yaml.safe_load(shown.group(1)) == default, (key, documented, field.default)
    # And the example parses.
    from safemerge_ray.fleet.config import parse_config

    example = re.search(r"```yaml\n(.*?)```", doc, re.S).group(1)
    config = parse_config(yaml.safe_load(example))
    assert config.memory_per_worker == 24 * 2**30 and config.settings_for("legal").select == "top_k"


def _named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for each `test_x.py::name` in `text`, and each `::name` after one (the same file)."""
    named, current = [], ""
    for file, test in re.findall(r"`(?:tests/)?(test_\w+\.py)?::(\w+)`", text):
        current = file or current
        named.append((current, test))
    return named


def test_the_tests_the_docs_name_exist():
    """Each test README.md and BENCHMARKS.md cite as evidence is there, in the file they name."""
    tests = Path(__file__).resolve().parent
    named = [pair for doc in ("README.md", "BENCHMARKS.md")
             for pair in _named_tests((tests.parent / doc).read_text())]
    assert len(named) > 20  # the README's table of promises cites its tests this way
    missing = [f"{file}::{test}" for file, test in named
               if not (tests / file).is_file() or not re.search(rf"^def {test}\(", (tests / file).read_text(), re.M)]
    assert missing == [], f"the docs cite tests that are not where they say: {missing}"
