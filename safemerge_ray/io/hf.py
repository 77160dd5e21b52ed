"""Models, tokenizers and adapters for transformers and PEFT, from a local dir, s3:// or a hub id.

transformers and PEFT load from local paths (or the hub), so an s3:// location is first copied into a
local cache, in bounded chunks, keyed by the objects' version tags: a second load of the same bytes
copies nothing, and a changed object is copied again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from ..errors import SafeMergeError, first_line
from .s3 import S3Settings
from .storage import HUB, open_dir, resolve_location

CHUNK = 64 * 2**20
# Files a model or adapter directory needs for transformers / PEFT (never pickles: *.bin, *.pt).
_WANTED = (".safetensors", ".json", ".model", ".txt", ".jinja", ".tiktoken")


def cache_root() -> Path:
    return Path(os.environ.get("SAFEMERGE_CACHE", Path(tempfile.gettempdir()) / "safemerge-ray-cache"))


def local_copy(location: str, what: str, s3: S3Settings = S3Settings()) -> str:
    """A local directory holding `location`'s files (itself, when it is local or a hub snapshot)."""
    d = open_dir(location, what=what, s3=s3)
    if d.local_path is not None:
        return str(d.local_path)
    names = [n for n in d.walk() if n.endswith(_WANTED)]
    if not names:
        raise SafeMergeError(f"{what}: no model or adapter files under {d.uri}")
    key = hashlib.sha256("\n".join(f"{n} {d.version_tag(n)}" for n in names).encode()).hexdigest()[:16]
    target = cache_root() / key
    if (target / ".complete").exists():
        return str(target)
    stage = target.parent / f".{key}.partial-{uuid.uuid4().hex[:8]}"
    try:
        for name in names:
            path = stage / name
            path.parent.mkdir(parents=True, exist_ok=True)
            size, buffer = d.size(name), bytearray(CHUNK)
            with open(path, "wb") as f:
                for offset in range(0, size, CHUNK):
                    view = memoryview(buffer)[:min(CHUNK, size - offset)]
                    d.read_into(name, offset, view)
                    f.write(view)
        (stage / ".complete").touch()
        try:
            stage.rename(target)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return str(target)


def model_path(location: str, what: str, s3: S3Settings = S3Settings()) -> str:
    """What `from_pretrained` takes: a local directory (s3:// copied here), or a hub id for the hub."""
    resolved = resolve_location(location)
    if resolved.startswith(HUB):
        return resolved[len(HUB):]  # transformers fetches it itself (with the user's hub access)
    return local_copy(location, what, s3)


def load_tokenizer(path: str, what: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise SafeMergeError(f"{what}: no usable tokenizer in {path} ({first_line(exc, 200)})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise SafeMergeError(f"{what}: the tokenizer in {path} has no chat template; an aligned chat model's has one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, what: str, device: str = "cpu", dtype: str = "auto") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if device == "cpu" else dtype)
    except (OSError, ValueError) as exc:
        raise SafeMergeError(f"{what}: cannot load a causal LM from {path} ({first_line(exc, 200)})") \
            from None
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped `to`
