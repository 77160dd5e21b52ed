"""Safetensors: lazy reading (parse headers, then read single tensors by their byte range) and writing.

A model directory is either one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Pickle checkpoints are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import math
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_torch_bytes

from ..errors import SafeMergeError
from .dirs import Dir, sha256_of
from .untrusted import load_json

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    nbytes: int


# Checked headers by content (and file size): a fleet's adapters of one layout have the same header byte for
# byte, so it is parsed and checked once per process (a 1,792-tensor header takes ~25 ms), not per adapter.
_CHECKED: OrderedDict[tuple[bytes, int], tuple[dict, dict[str, TensorInfo]]] = OrderedDict()
_CHECKED_LOCK = threading.Lock()
_CACHED_HEADERS, _CACHED_HEADER = 32, 4 * 2**20  # entries; bytes of one header


class SafetensorsFile:
    """One .safetensors file: its header is parsed and checked on open, tensors are read on demand."""

    def __init__(self, store: Dir, name: str):
        self.store, self.name = store, name
        self.where = f"{store.uri.rstrip('/')}/{name}"
        size = store.size(name)
        if size < 8:
            raise SafeMergeError(f"{self.where}: not a safetensors file ({size} bytes)")
        prefix = bytearray(8)
        store.read_into(name, 0, memoryview(prefix))
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER):
            raise SafeMergeError(
                f"{self.where}: header claims {header_len} bytes but the file has {size} "
                "(truncated or not a safetensors file)"
            )
        raw = bytearray(header_len)
        store.read_into(name, 8, memoryview(raw))
        self.header_bytes = bytes(raw)
        key = (self.header_bytes, size)
        with _CHECKED_LOCK:
            checked = _CHECKED.get(key)
        if checked is None:
            header = load_json(self.header_bytes, f"{self.where}: corrupt safetensors header", _MAX_HEADER)
            if not isinstance(header, dict):
                raise SafeMergeError(f"{self.where}: corrupt safetensors header (not a JSON object)")
            metadata = header.pop("__metadata__", None) or {}
            checked = metadata, self._check(header, data_start=8 + header_len, data_len=size - 8 - header_len)
            if len(self.header_bytes) <= _CACHED_HEADER:
                with _CHECKED_LOCK:
                    _CHECKED[key] = checked
                    while len(_CHECKED) > _CACHED_HEADERS:
                        _CHECKED.popitem(last=False)
        self.metadata, self.tensors = checked  # shared with every file of the same header: read-only

    def _check(self, header: dict, data_start: int, data_len: int) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for tname, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                ok = (isinstance(dtype, str) and begin <= end
                      and all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)))
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise SafeMergeError(f"{self.where}: corrupt header entry for tensor {tname!r}")
            if dtype not in DTYPES:
                raise SafeMergeError(f"{self.where}: tensor {tname!r} has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            if end - begin != nbytes:
                raise SafeMergeError(
                    f"{self.where}: tensor {tname!r} of shape {list(shape)} {dtype} needs {nbytes} bytes "
                    f"but its header gives {end - begin}"
                )
            if end > data_len:
                raise SafeMergeError(
                    f"{self.where}: tensor {tname!r} ends at byte {end} of the data but the file holds "
                    f"only {data_len} (truncated?)"
                )
            infos[tname] = TensorInfo(tname, dtype, shape, data_start + begin, nbytes)
        # The format allows no holes and no overlaps; a violation means a damaged or forged file.
        pos = 0
        for info in sorted(infos.values(), key=lambda i: i.offset):
            if info.offset - data_start != pos:
                raise SafeMergeError(f"{self.where}: tensor data overlaps or has holes near {info.name!r}")
            pos += info.nbytes
        if pos != data_len:
            raise SafeMergeError(f"{self.where}: {data_len - pos} trailing bytes after the last tensor")
        return infos

    def read(self, tname: str, pin_memory: bool = False) -> torch.Tensor:
        """One tensor, read straight into its own buffer (page-locked when bound for a GPU)."""
        info = self.tensors[tname]
        buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        if info.nbytes:
            self.store.read_into(self.name, info.offset, buf.numpy().data)
        return buf.view(DTYPES[info.dtype]).reshape(info.shape)

    def read_many(self, tnames: list[str], max_span: int = 64 * 2**20, max_gap: int = 256 * 2**10,
                  finite: bool = False) -> dict[str, torch.Tensor]:
        """Several tensors with as few reads as their layout allows: neighbours in the file (a LoRA's A and
        B, a layer's modules) share one read of at most `max_span` bytes, read through gaps of at most
        `max_gap` bytes (the safety adapter's repaired layers). `finite`: the tensors asked for are checked
        for NaN/Inf, one reduction per read where the read holds one float dtype."""
        infos = sorted((self.tensors[t] for t in tnames), key=lambda i: i.offset)
        spans: list[list[TensorInfo]] = []
        for info in infos:
            last = spans[-1][-1] if spans else None
            if last is not None and 0 <= info.offset - (last.offset + last.nbytes) <= max_gap \
                    and info.offset + info.nbytes - spans[-1][0].offset <= max_span:
                spans[-1].append(info)
            else:
                spans.append([info])
        out = {}
        for span in spans:
            start = span[0].offset
            buf = torch.empty(span[-1].offset + span[-1].nbytes - start, dtype=torch.uint8)
            if len(buf):
                self.store.read_into(self.name, start, buf.numpy().data)
            out.update(_views(buf, span))
            if finite:
                self._check_finite(span, buf, out)
        return out

    def _check_finite(self, span: list[TensorInfo], buf: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        dtypes = {DTYPES[i.dtype] for i in span}
        if len(dtypes) == 1:  # one dtype: one sum over the read (NaN and Inf poison it; 40x faster than
            (dtype,) = dtypes  # isfinite().all()); when it is not finite (or overflowed), tensor by tensor
            if not dtype.is_floating_point:
                return
            gapless = sum(i.nbytes for i in span) == len(buf)
            whole = buf.view(dtype) if gapless else torch.cat([tensors[i.name].view(-1) for i in span])
            if bool(torch.isfinite(whole.sum())):
                return
        for info in span:
            t = tensors[info.name]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise SafeMergeError(f"{self.where}: tensor {info.name} contains NaN or Inf")


def _views(buf: torch.Tensor, span: list[TensorInfo]) -> dict[str, torch.Tensor]:
    """The span's tensors as views of the bytes read (one split, not a slice per tensor: a read of a
    thousand small layers would otherwise spend more on slicing than on reading)."""
    start = span[0].offset
    dtypes = {i.dtype for i in span}
    if len(dtypes) == 1 and sum(i.nbytes for i in span) == len(buf):  # one dtype, no gaps: split it typed
        flat = buf.view(DTYPES[span[0].dtype])
        pieces = flat.split([i.nbytes // flat.element_size() for i in span])
        return {i.name: p.view(i.shape) for i, p in zip(span, pieces, strict=True)}
    sizes, ends = [], start  # tensor, gap, tensor, ... in bytes
    for i in span:
        sizes += [i.offset - ends, i.nbytes]
        ends = i.offset + i.nbytes
    pieces = buf.split(sizes)[1::2]
    out = {}
    for i, raw in zip(span, pieces, strict=True):
        if (i.offset - start) % DTYPES[i.dtype].itemsize:
            raw = raw.clone()  # a view must start on its dtype's alignment
        out[i.name] = raw.view(DTYPES[i.dtype]).view(i.shape)
    return out


class Checkpoint:
    """A Hugging Face model directory of safetensors, single file or sharded, read tensor by tensor."""

    SINGLE = "model.safetensors"
    INDEX = "model.safetensors.index.json"

    def __init__(self, store: Dir, what: str):
        self.store, self.what = store, what
        names = store.list()
        if self.INDEX in names:
            weight_map = self._read_index(store, what)
            shard_names = sorted(set(weight_map.values()))
        elif self.SINGLE in names:
            shard_names, weight_map = [self.SINGLE], None
        else:
            pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise SafeMergeError(
                    f"{what}: {store.uri} holds only pickle checkpoints ({', '.join(pickles)}); loading "
                    "those runs arbitrary code, so they are refused. Convert the model to safetensors "
                    "(model.save_pretrained(dir, safe_serialization=True))."
                )
            raise SafeMergeError(f"{what}: no {self.SINGLE} or {self.INDEX} in {store.uri}")
        self.shards = {n: SafetensorsFile(store, n) for n in shard_names}
        self.locations: dict[str, SafetensorsFile] = {}
        for shard in self.shards.values():
            for tname in shard.tensors:
                if tname in self.locations:
                    raise SafeMergeError(
                        f"{what}: tensor {tname!r} is in both {self.locations[tname].name} and {shard.name}"
                    )
                self.locations[tname] = shard
        if weight_map is not None:
            wrong = [t for t, shard in weight_map.items() if self.locations.get(t) is not self.shards[shard]]
            if wrong:
                raise SafeMergeError(f"{what}: index lists tensors its shards lack: {wrong[:5]}")

    @classmethod
    def _read_index(cls, store: Dir, what: str) -> dict[str, str]:
        try:
            weight_map = load_json(store.read(cls.INDEX), f"{what}: corrupt {cls.INDEX} in {store.uri}",
                                   _MAX_HEADER)["weight_map"]  # type: ignore[index]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
            for shard in weight_map.values():
                # Shards live beside the index; a path elsewhere is a damaged or forged index.
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                    raise ValueError(f"bad shard name {shard!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise SafeMergeError(f"{what}: corrupt {cls.INDEX} in {store.uri} ({exc})") from None
        return weight_map

    def __contains__(self, tname: str) -> bool:
        return tname in self.locations

    def info(self, tname: str) -> TensorInfo:
        return self.locations[tname].tensors[tname]

    def read(self, tname: str, pin_memory: bool = False) -> torch.Tensor:
        return self.locations[tname].read(tname, pin_memory)

    def fingerprint(self) -> str:
        """Cheap content fingerprint: every shard's header, size and version tag (mtime or ETag).

        Hashing every weight byte would double the run's I/O, the only real cost it has.
        """
        parts = []
        for name, shard in sorted(self.shards.items()):
            parts.append(f"{name}:{sha256_of(shard.header_bytes)}:{self.store.version_tag(name)}")
        return sha256_of("\n".join(parts).encode())


def release_freed_buffers(threshold: int = 1 << 20) -> None:
    """Serve every buffer of 1 MB or more by mmap, so freeing a module's weights returns the memory.

    glibc raises its mmap threshold (up to 32 MB) each time such a buffer is freed; after that, one
    module's tensors come from the heap and fragment it, and a process that reads module after
    module grows with the model's depth. Fixing the threshold keeps its peak at a few modules.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic adjustment)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")  # names and metadata JSON writes as they are, unescaped


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes safetensors writes for these tensors. A merged adapter is float32 tensors with plain names:
    those are laid out here, in one copy (safetensors' API spends ~25 us per tensor on checks and
    conversions: much of an assembly of a thousand small layers); anything else goes through safetensors.
    tests/test_tensors.py checks both give the same bytes."""
    plain = all(_PLAIN.fullmatch(x) for x in (*metadata, *metadata.values()))
    if not (plain and all(t.dtype == torch.float32 and t.device.type == "cpu" and _PLAIN.fullmatch(k)
                          for k, t in tensors.items())):
        return safetensors_torch_bytes({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata)
    names = sorted(tensors)  # safetensors: by dtype (one here), then by name
    entries, offset = [], 0
    for name in names:
        size = 4 * tensors[name].numel()
        shape = ",".join(str(d) for d in tensors[name].shape)
        entries.append(f'"{name}":{{"dtype":"F32","shape":[{shape}],"data_offsets":[{offset},{offset + size}]}}')
        offset += size
    meta = ",".join(f'"{k}":"{v}"' for k, v in metadata.items())
    header = ("{" + ",".join(([f'"__metadata__":{{{meta}}}'] if metadata else []) + entries) + "}").encode()
    header += b" " * (-len(header) % 8)
    return b"".join([struct.pack("<Q", len(header)), header, *(tensors[n].contiguous().numpy().data for n in names)])


def float32_finite(weights: bytes) -> bool:
    """Whether a safetensors file of float32 tensors holds only finite values: one sum over its data (NaN and
    Inf poison it; a sum that overflows says False, and the caller looks tensor by tensor)."""
    (header_len,) = struct.unpack("<Q", weights[:8])
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.frombuffer(weights, dtype=np.float32, offset=8 + header_len).sum()))
