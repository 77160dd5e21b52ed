"""Reading what an adapter's author wrote: JSON and name patterns, with bounds.

A fleet takes adapters from many teams; one hostile or broken file must fail that adapter alone, never
the driver. JSON nesting is bounded before parsing (Python's parser recurses: 200k `[` is a
RecursionError), and name patterns (PEFT's `rank_pattern`, `target_modules`, ...) are regular
expressions: those that could backtrack exponentially, or do not compile, are refused.
"""

from __future__ import annotations

import json
import re

from ..errors import SafeMergeError

MAX_JSON_DEPTH = 64  # PEFT configs and safetensors headers nest 3-4 deep
MAX_PATTERN = 512
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: linear, no per-character alternation
_BRACKET = re.compile(rb"[\[\]{}]")
# A group with a quantifier inside, itself quantified: `(a+)+`, `(\w*)*`, `(x|x?)+` ... the shapes that
# backtrack exponentially. Module-name patterns never need them.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[*+?}](?:[^()\\]|\\.)*\)\s*[*+{]")


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data` (strings skipped), without recursion."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub(b'""', data)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_json(data: bytes, where: str, max_bytes: int) -> object:
    """Parse JSON an adapter's author controls; a SafeMergeError names `where` and never echoes content."""
    if len(data) > max_bytes:
        raise SafeMergeError(f"{where}: {len(data)} bytes, more than the {max_bytes} allowed")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise SafeMergeError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SafeMergeError(f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


def check_pattern(pattern: object, where: str) -> str:
    """A name pattern PEFT will use as a regular expression: a string that compiles and cannot blow up."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN:
        raise SafeMergeError(f"{where}: a pattern must be a non-empty string of at most {MAX_PATTERN} characters")
    if _NESTED_QUANTIFIER.search(pattern):
        raise SafeMergeError(f"{where}: pattern {pattern!r} nests quantifiers (exponential matching); "
                             "use a plain module-name pattern")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SafeMergeError(f"{where}: pattern {pattern!r} is not a valid regular expression ({exc})") from None
    return pattern
