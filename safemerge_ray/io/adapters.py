"""PEFT LoRA adapter directories: config, key <-> module mapping, and per-module scaling.

Saved PEFT keys look like `base_model.model.<module>.lora_A.weight`; `<module>` is the module path
inside the base model (`model.layers.0.self_attn.q_proj`), whose weight is `<module>.weight` in the
model's checkpoint. Everything is matched by these names, never by position in a file.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..core import natural_key
from ..errors import SafeMergeError
from .dirs import Dir, json_bytes, sha256_of
from .tensors import DTYPES, SafetensorsFile, safetensors_bytes
from .untrusted import check_pattern, load_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MAX_CONFIG = 16 * 1024 * 1024  # a PEFT config is a few KB; rank_pattern of a huge model, a few hundred
_FLOATS = {"F64", "F32", "F16", "BF16"}

# Config switches for LoRA variants whose update is not `scaling * B @ A` on a 2-D weight.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (its magnitude vector changes the update; SafeMERGE merges plain LoRA)",
    "lora_bias": "LoRA with a bias on lora_B",
    "target_parameters": "LoRA on raw nn.Parameters",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
}


@dataclass(frozen=True, slots=True)  # one per module of every adapter a fleet holds: no __dict__
class LoraModule:
    module: str  # PEFT module path, e.g. model.layers.0.self_attn.q_proj
    rank: int
    alpha: float
    scaling: float
    a_shape: tuple[int, int]  # [r, in]
    b_shape: tuple[int, int]  # [out, r]

    @property
    def a_key(self) -> str:
        return f"{PREFIX}{self.module}.lora_A.weight"

    @property
    def b_key(self) -> str:
        return f"{PREFIX}{self.module}.lora_B.weight"


@dataclass
class LoraAdapter:
    uri: str
    config: dict
    modules: dict[str, LoraModule]
    extra_keys: list[str]  # modules_to_save tensors, passed through
    fingerprint: str
    file: SafetensorsFile
    layout: str  # the header and the config fields the modules depend on: adapters that share it plan alike
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # every layer's factors, where kept

    def keep_in_memory(self) -> None:
        """Read every layer's factors once and serve reads from memory (the safety adapter: every assembly
        on a worker reads its repaired layers)."""
        if self.kept is None:
            self.kept = self.read_loras(list(self.modules))

    @property
    def factor_bytes(self) -> int:
        return sum(4 * m.rank * (m.a_shape[1] + m.b_shape[0]) for m in self.modules.values())

    def read_lora(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module as float32, checked for NaN/Inf (one read: they are neighbours in the file)."""
        return self.read_loras([module])[module]

    def read_loras(self, modules: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) of several modules as float32, checked for NaN/Inf, read in as few reads as their layout
        allows (an adapter's modules are mostly neighbours)."""
        if self.kept is not None:
            return {m: self.kept[m] for m in modules}
        keys = [key for module in modules for key in (self.modules[module].a_key, self.modules[module].b_key)]
        tensors = self.file.read_many(keys, finite=True)
        return {m: (tensors[self.modules[m].a_key].float(), tensors[self.modules[m].b_key].float()) for m in modules}

    def read_extra(self) -> dict[str, torch.Tensor]:
        return {k: self.file.read(k) for k in self.extra_keys}

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])


@dataclass
class FactorRows:
    """Many adapters' factors for a stretch of neighbouring modules, one row per adapter: adapters of one
    layout hold those tensors at the same offsets, so each is read in one request into its row, and a
    module's [N, r, in] and [N, out, r] stacks are views of the rows (no work per adapter and module)."""

    rows: torch.Tensor  # [N, elements] float32
    offsets: dict[str, int]  # tensor name -> its first element in a row
    index: dict[str, int]  # adapter URI -> its row

    def stacks(self, uris: list[str], module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [self.index[u] for u in uris]
        (r, inp), out = module.a_shape, module.b_shape[0]
        a = self.rows[:, self.offsets[module.a_key]:self.offsets[module.a_key] + r * inp]
        b = self.rows[:, self.offsets[module.b_key]:self.offsets[module.b_key] + out * r]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            a, b = a[idx[0]:idx[-1] + 1], b[idx[0]:idx[-1] + 1]
        else:
            sel = torch.tensor(idx)
            a, b = a[sel], b[sel]
        return a.reshape(len(idx), r, inp), b.reshape(len(idx), out, r)


def read_factor_rows(adapters: list[LoraAdapter], modules: list[str],
                     retrying: Callable) -> tuple[FactorRows | None, dict[str, SafeMergeError]]:
    """The factors of `modules` for adapters of one layout, one read each (through `retrying(fn, *args)`).
    None where the stretch holds other dtypes (read tensor by tensor instead); adapters whose read fails,
    or whose factors are not finite, come back with their error and no row."""
    first = adapters[0].file
    names = [key for m in modules for key in (adapters[0].modules[m].a_key, adapters[0].modules[m].b_key)]
    infos = sorted((first.tensors[n] for n in names), key=lambda i: i.offset)
    start, end = infos[0].offset, infos[-1].offset + infos[-1].nbytes
    dtypes = {i.dtype for i in first.tensors.values() if start <= i.offset < end}
    if len(dtypes) != 1 or (dtype := DTYPES[dtypes.pop()]) not in (torch.float32, torch.float16, torch.bfloat16):
        return None, {}
    raw = torch.empty(len(adapters), end - start, dtype=torch.uint8)
    failed: dict[str, SafeMergeError] = {}
    for k, adapter in enumerate(adapters):
        try:
            retrying(adapter.file.store.read_into, adapter.file.name, start, raw[k].numpy().data)
        except SafeMergeError as exc:
            failed[adapter.uri] = exc
    rows = raw.view(dtype).float()
    if not bool(torch.isfinite(rows.sum())):  # NaN/Inf poison the sum: find whose
        for k in (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist():
            try:
                adapters[k].read_loras(modules)  # names the tensor
            except SafeMergeError as exc:
                failed.setdefault(adapters[k].uri, exc)
    offsets = {i.name: (i.offset - start) // dtype.itemsize for i in infos}
    return FactorRows(rows, offsets, {a.uri: k for k, a in enumerate(adapters) if a.uri not in failed}), failed


# `train-safety` publishes each adapter under a new version and names it in its manifest, written last;
# given as an adapter, its output stands for the version named there, so a second training never changes
# the bytes under someone reading the first.
TRAINED_MANIFEST = "manifest.json"
TRAINED_KIND = "safety-adapter"
_VERSION = re.compile(r"adapter|adapters/[A-Za-z0-9][A-Za-z0-9._-]*")


def published_version(store: Dir, what: str) -> Dir:
    """The adapter directory `store` stands for: itself, or the version a train-safety manifest names."""
    if store.exists(CONFIG) or not store.exists(TRAINED_MANIFEST):
        return store
    manifest = load_json(store.read(TRAINED_MANIFEST), f"{what}: corrupt {TRAINED_MANIFEST} in {store.uri}",
                         _MAX_CONFIG)
    if not isinstance(manifest, dict) or manifest.get("kind") != TRAINED_KIND:
        return store
    version = manifest.get("adapter", "adapter")  # outputs written before versions: adapter/
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise SafeMergeError(f"{what}: {store.uri.rstrip('/')}/{TRAINED_MANIFEST} names no adapter version "
                             f"({version!r})")
    return store.child(version)


def load_adapter(store: Dir, what: str) -> LoraAdapter:
    """Parse an adapter directory: its config and safetensors header; tensors stay on storage.

    The fingerprint hashes the config, the header and the weights file's version tag (size and mtime
    locally, the ETag on S3), like a model's: a fleet of large adapters is not read twice to hash it.
    """
    store = published_version(store, what)
    if not store.exists(CONFIG):
        pickles = [n for n in store.list() if n.startswith("adapter_model.") and n != WEIGHTS]
        hint = f" (found {', '.join(pickles)})" if pickles else ""
        raise SafeMergeError(f"{what}: {store.uri} is not a PEFT adapter directory: no {CONFIG}{hint}")
    _check_inside(store, [CONFIG, WEIGHTS], what)
    raw_config = store.read(CONFIG)
    config = load_json(raw_config, f"{what}: corrupt {CONFIG} in {store.uri}", _MAX_CONFIG)
    if not isinstance(config, dict):
        raise SafeMergeError(f"{what}: corrupt {CONFIG} in {store.uri} (not a JSON object)")
    if not store.exists(WEIGHTS):
        others = [n for n in store.list() if n.startswith("adapter_model.")]
        if others:
            raise SafeMergeError(
                f"{what}: {store.uri} holds {', '.join(others)} but no {WEIGHTS}; pickle checkpoints run "
                "arbitrary code when loaded, so they are refused. Re-save with safe_serialization=True."
            )
        raise SafeMergeError(f"{what}: missing {WEIGHTS} in {store.uri}")
    _check_config(config, what)
    weights = SafetensorsFile(store, WEIGHTS)
    layout = sha256_of(weights.header_bytes + json.dumps({k: config.get(k) for k in _LAYOUT_FIELDS},
                                                         sort_keys=True).encode())
    with _LAYOUTS_LOCK:
        parsed = _LAYOUTS.get(layout)
    if parsed is None:
        parsed = _parse_keys(weights, config, what)
        with _LAYOUTS_LOCK:
            _LAYOUTS[layout] = parsed
            while len(_LAYOUTS) > 32:
                _LAYOUTS.popitem(last=False)
    digest = sha256_of(b"\0".join([raw_config, weights.header_bytes, store.version_tag(WEIGHTS).encode()]))
    modules, extra = parsed
    return LoraAdapter(store.uri, config, modules, extra, digest, weights, layout)


# An adapter's modules follow from its header and these config fields alone; a fleet's adapters mostly share
# them, so they are worked out once per layout (a module table of 896 layers takes ~15 ms), and shared.
_LAYOUT_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules",
                  "modules_to_save", "fan_in_fan_out")
_LAYOUTS: OrderedDict[str, tuple[dict[str, LoraModule], list[str]]] = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()


def _check_inside(store: Dir, names: list[str], what: str) -> None:
    """A local adapter's files must be its own: a symlink out of its directory (to /etc/passwd, to
    another team's adapter) is refused. A Hugging Face cache snapshot links into its repo's blobs/."""
    if store.local_path is None:
        return
    root = os.path.realpath(store.local_path)
    blobs = os.path.join(os.path.dirname(os.path.dirname(root)), "blobs")
    for name in names:
        path = os.path.join(store.local_path, name)
        if not os.path.lexists(path):
            continue
        target = os.path.realpath(path)
        if not (_within(target, root) or os.path.basename(os.path.dirname(root)) == "snapshots"
                and _within(target, blobs)):
            raise SafeMergeError(f"{what}: {name} in {store.uri} is a link to a file outside the adapter's "
                                 "directory; refused")


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _check_config(config: dict, what: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise SafeMergeError(f"{what}: peft_type {peft_type} is not LoRA; SafeMERGE merges LoRA adapters")
    for flag, name in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise SafeMergeError(f"{what}: {name} is not supported ({flag} is set in {CONFIG})")
    for key in ("r", "lora_alpha"):
        if not _positive(config.get(key)):
            raise SafeMergeError(f"{what}: {CONFIG} needs a positive {key!r}, got {config.get(key)!r:.80}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise SafeMergeError(f"{what}: {CONFIG}: {key} must be an object of pattern: number")
        for pattern, value in patterns.items():
            check_pattern(pattern, f"{what}: {CONFIG}: {key}")
            if not _positive(value):
                raise SafeMergeError(f"{what}: {CONFIG}: {key} gives {pattern!r:.80} a value that is not a "
                                     "positive number")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        check_pattern(targets, f"{what}: {CONFIG}: target_modules")
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise SafeMergeError(f"{what}: {CONFIG}: target_modules must be a pattern or a list of module names")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def _targeted(module: str, targets: str | list[str] | None) -> bool:
    """Whether PEFT's `check_target_module_exists` would put a LoRA layer on `module`: a string is a
    regular expression matched against the whole name; a list names modules by suffix."""
    if targets is None or targets == "all-linear":
        return True  # PEFT fills these in from the architecture; nothing to check here
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """PEFT's `peft.utils.other.get_pattern_key`, verbatim, so rank/alpha patterns resolve exactly as in
    PEFT (a test checks every module's scaling against PEFT's) without importing PEFT in workers."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _parse_keys(weights: SafetensorsFile, config: dict, what: str) -> tuple[dict[str, LoraModule], list[str]]:
    halves: dict[str, dict[str, tuple]] = {}
    extra: list[str] = []
    to_save = list(config.get("modules_to_save") or [])
    for key, info in weights.tensors.items():
        if not key.startswith(PREFIX):
            raise SafeMergeError(f"{what}: unexpected tensor {key!r} (PEFT keys start with {PREFIX!r})")
        path = key[len(PREFIX):]
        module, _, tail = path.rpartition(".lora_")
        if module and tail in ("A.weight", "B.weight"):
            if info.dtype not in _FLOATS:
                raise SafeMergeError(f"{what}: module {module}: LoRA weight is {info.dtype}, not a float type")
            if len(info.shape) != 2:
                raise SafeMergeError(
                    f"{what}: module {module} has a {len(info.shape)}-D LoRA weight (convolution LoRA); "
                    "only linear layers are supported"
                )
            halves.setdefault(module, {})[tail[0]] = info.shape
        elif module and tail.startswith(("embedding_A", "embedding_B")):
            raise SafeMergeError(f"{what}: module {module} is an embedding LoRA, which SafeMERGE does not cover")
        elif module and tail.startswith("magnitude_vector"):
            raise SafeMergeError(f"{what}: module {module} is a DoRA layer, which SafeMERGE does not cover")
        elif module and tail == "B.bias":
            raise SafeMergeError(f"{what}: module {module} has a lora_B bias, which SafeMERGE does not cover")
        elif any(path == m or path.startswith(m + ".") or f".{m}." in f".{path}" for m in to_save):
            extra.append(key)
        else:
            raise SafeMergeError(f"{what}: unexpected tensor {key!r}: neither LoRA nor modules_to_save")

    use_rslora = bool(config.get("use_rslora"))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module in sorted(halves, key=natural_key):
        shapes = halves[module]
        if set(shapes) != {"A", "B"}:
            raise SafeMergeError(f"{what}: module {module} has lora_{''.join(shapes)} but not both lora_A and lora_B")
        a_shape, b_shape = shapes["A"], shapes["B"]
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
        if a_shape[0] != r or b_shape[1] != r:
            raise SafeMergeError(
                f"{what}: module {module}: config gives rank {r} but lora_A is {list(a_shape)} and "
                f"lora_B is {list(b_shape)}"
            )
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        modules[module] = LoraModule(module, int(r), float(alpha), scaling, tuple(a_shape), tuple(b_shape))
    if not modules:
        raise SafeMergeError(f"{what}: {WEIGHTS} holds no LoRA layers")
    untargeted = [m for m in modules if not _targeted(m, config.get("target_modules"))]
    if untargeted:  # PEFT would not create these layers, so neither the fine-tune nor its repair loads
        raise SafeMergeError(f"{what}: target_modules in {CONFIG} does not match module {untargeted[0]}"
                             f"{f' (and {len(untargeted) - 1} more)' if len(untargeted) > 1 else ''}; "
                             "PEFT could not load this adapter")
    return modules, sorted(extra)


def adapter_files(tensors: dict, config: dict) -> dict[str, bytes]:
    """A PEFT adapter directory as bytes: the same inputs always give the same bytes."""
    return {CONFIG: json_bytes(config), WEIGHTS: safetensors_bytes(tensors, {"format": "pt"})}
