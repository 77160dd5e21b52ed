"""Safetensors files built by hand for the reader's tests (tests/test_tensors*.py): sample tensors, raw files
with any header, and a directory that counts the bytes it serves."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from safemerge_ray.io import LocalDir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (17, 8),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.self_attn.q_proj.bias": (8,),
        "model.layers.10.mlp.down_proj.weight": (8, 24),
        "model.layers.9.mlp.up_proj.weight": (24, 8),
        "lm_head.weight": (17, 8),
        "scalar": (),
        "empty": (0, 3),
    }
    out = {name: (torch.randn(shape, generator=gen) * 3).to(dtype) for name, shape in shapes.items()}
    # Values that must survive bit for bit: signed zero, subnormal-ish, extremes of the format.
    info = torch.finfo(dtype)
    out["specials"] = torch.tensor([0.0, -0.0, info.tiny, info.max, -info.max, info.eps], dtype=dtype)
    return out


def raw_file(path: Path, header: dict, data: bytes, *, header_len: int | None = None) -> Path:
    """Write a safetensors-shaped file by hand: u64 header length, JSON header, data."""
    hbytes = json.dumps(header).encode()
    n = len(hbytes) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + hbytes + data)
    return path


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    # Compare the raw bits: equality of values would accept -0.0 == 0.0.
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8))


class CountingDir(LocalDir):
    """A LocalDir that records every byte it hands out."""

    def __init__(self, path):
        super().__init__(path)
        self.ranges: list[tuple[str, int, int]] = []  # (name, offset, length) per read_into
        self.whole_reads: list[str] = []

    def read_into(self, name, offset, buffer):
        self.ranges.append((name, offset, len(buffer)))
        super().read_into(name, offset, buffer)

    def read(self, name):
        self.whole_reads.append(name)
        return super().read(name)

    @property
    def bytes_read(self) -> int:
        return sum(n for _, _, n in self.ranges)

    def reset(self):
        self.ranges.clear()
        self.whole_reads.clear()
