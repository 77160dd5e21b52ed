"""Fleet configs for the config tests (tests/test_config*.py): a minimal valid one, edited copies, files."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

# A minimal valid config (s3 paths: nothing on disk is consulted while parsing).
BASE = {
    "unaligned_model": "s3://models/base/",
    "aligned_model": "s3://models/chat/",
    "safety_adapter": "s3://adapters/safety/",
    "finetuned": ["s3://adapters/domains/gsm8k/"],
    "output": "s3://merged/out/",
}


def raw_config(**changes) -> dict:
    """BASE with top-level keys replaced; a value of `...` deletes the key."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def write_config(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path
