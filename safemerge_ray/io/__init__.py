"""Bytes in and out: one storage interface (local or S3), safetensors and PEFT adapters read lazily and
written byte-exactly, and untrusted JSON read with bounds.

    dirs       the `Dir` interface (reads, atomic and conditional writes), JSON as this tool writes it
    local, s3  its two backends: each one's differences stay inside its class
    storage    where a location lives (local path, s3://, hub id), opened as a Dir
    untrusted  JSON and name patterns an adapter's author controls, with bounds
    tensors    safetensors headers, tensors by byte range, and byte-exact writing
    adapters   PEFT LoRA adapter directories: config, modules, scaling, factor rows
    hf         models, tokenizers and adapters for transformers (s3:// copied to a local cache)
"""

from .adapters import (
    CONFIG,
    PREFIX,
    TRAINED_KIND,
    TRAINED_MANIFEST,
    WEIGHTS,
    FactorRows,
    LoraAdapter,
    LoraModule,
    adapter_files,
    load_adapter,
    published_version,
    read_factor_rows,
)
from .dirs import BYTES_READ, STAGED_TAG, TMP_PREFIX, Dir, json_bytes, read_json, sha256_of
from .hf import cache_root, load_causal_lm, load_tokenizer, local_copy, model_path
from .local import LocalDir
from .s3 import S3Dir, S3Settings
from .storage import HUB, is_hub_id, local_or_s3, local_path, open_dir, read_file, resolve_location
from .tensors import Checkpoint, SafetensorsFile, float32_finite, release_freed_buffers, safetensors_bytes, save_tensors
from .untrusted import check_pattern, json_depth, load_json

__all__ = [
    "BYTES_READ", "CONFIG", "HUB", "PREFIX", "STAGED_TAG", "TMP_PREFIX", "TRAINED_KIND", "TRAINED_MANIFEST",
    "WEIGHTS", "Checkpoint", "Dir", "FactorRows", "LocalDir", "LoraAdapter", "LoraModule", "S3Dir", "S3Settings",
    "SafetensorsFile", "adapter_files", "cache_root", "check_pattern", "float32_finite", "is_hub_id",
    "json_bytes", "json_depth", "load_adapter", "load_causal_lm", "load_json", "load_tokenizer", "local_copy",
    "local_or_s3", "local_path", "model_path", "open_dir", "published_version", "read_factor_rows", "read_file",
    "read_json", "release_freed_buffers", "resolve_location", "safetensors_bytes", "save_tensors", "sha256_of"
]
