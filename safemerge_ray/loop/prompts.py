"""Prompt files: JSONL, CSV or one prompt a line (local or s3://), every bad line named."""

from __future__ import annotations

import csv
import io
import json

from ..errors import SafeMergeError
from ..io import S3Settings, read_file
from .spec import BUILT_IN_JUDGES, EvalSpec, Prompt

_PROMPT_FIELDS = ("prompt", "instruction", "goal", "question", "text", "behavior", "Behavior")
_REFERENCE_FIELDS = ("reference", "answer", "target", "output", "label")


def read_prompts(location: str, what: str, s3: S3Settings, need_reference: bool = False,
                 limit: int | None = None) -> list[Prompt]:
    """JSONL (.jsonl / .json), CSV (.csv) or one prompt a line (anything else); bad lines named."""
    data = read_file(location, what, s3)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SafeMergeError(f"{what}: {location}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x})") from None
    name = location.lower().rsplit("/", 1)[-1]
    if name.endswith((".jsonl", ".json")):
        records = _jsonl(text, location, what)
    elif name.endswith(".csv"):
        records = [(i + 2, r) for i, r in enumerate(csv.DictReader(io.StringIO(text)))]
    else:
        records = [(i + 1, {"prompt": line.strip()}) for i, line in enumerate(text.splitlines()) if line.strip()]
    prompts, seen = [], set()
    for line, record in records:
        prompt = next((record[f] for f in _PROMPT_FIELDS if isinstance(record.get(f), str) and record[f].strip()),
                      None)
        if prompt is None:
            raise SafeMergeError(f"{what}: {location}:{line}: no prompt (a field named one of "
                                 f"{', '.join(_PROMPT_FIELDS[:5])})")
        reference = next((str(record[f]) for f in _REFERENCE_FIELDS if record.get(f) not in (None, "")), None)
        if need_reference and reference is None:
            raise SafeMergeError(f"{what}: {location}:{line}: no reference answer (a field named "
                                 f"{' or '.join(_REFERENCE_FIELDS[:2])})")
        pid = str(record.get("id", line))
        if pid in seen:
            raise SafeMergeError(f"{what}: {location}:{line}: prompt id {pid!r} appears twice")
        seen.add(pid)
        prompts.append(Prompt(pid, prompt, reference if need_reference else None))
    if not prompts:
        raise SafeMergeError(f"{what}: {location} has no prompts (empty file)")
    return prompts[:limit] if limit else prompts


def _jsonl(text: str, location: str, what: str) -> list[tuple[int, dict]]:
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SafeMergeError(f"{what}: {location}:{i}: not valid JSON ({exc.msg})") from None
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict):
            raise SafeMergeError(f"{what}: {location}:{i}: expected a JSON object or string")
        records.append((i, record))
    return records


def read_prompt_sets(spec: EvalSpec, s3: S3Settings) -> tuple[list[Prompt], list[Prompt]]:
    """The harmful and task prompts, checked (a fleet's gate checks them before any work)."""
    if spec.judge not in BUILT_IN_JUDGES and not spec.judge.startswith(("s3://", "hf://")):
        from pathlib import Path

        if not Path(spec.judge).is_dir():
            raise SafeMergeError(f"judge: {spec.judge} is not 'refusal', 'keywords' nor a classifier model's "
                                 "directory")
    harmful = read_prompts(spec.harmful_prompts, "harmful_prompts", s3, limit=spec.limit)
    task = (read_prompts(spec.task_prompts, "task_prompts", s3, need_reference=True, limit=spec.limit)
            if spec.task_prompts else [])
    return harmful, task
