"""The command line: `main` and one module per command group (nothing in the package imports it).

    entry    `main` and the parser, made of the groups' parsers, and the one place errors become exit statuses
    merge    `merge`: one adapter
    fleet    `fleet`, `submit`, `sweep`: the fleet job
    output   `verify`, `rollback`, `gc`, `status`, `report`, `runs`, `diff`: a fleet output
    loop     `train-safety`, `eval`
    synth    `synth`: synthetic models and adapters
    submit   the fleet job through Ray's job API; records: the run record handed on
"""

from .entry import build_parser, main

__all__ = [
    "build_parser", "main",
]
