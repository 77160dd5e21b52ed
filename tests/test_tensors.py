"""The lazy safetensors reader: exact reads, byte-range-only I/O, batched reads, adapters as safetensors writes them
(damaged files and model directories: tests/test_tensors_damaged.py)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from safemerge_ray.errors import SafeMergeError
from safemerge_ray.io import Checkpoint, LocalDir, SafetensorsFile
from safemerge_ray.synthetic import SynthSpec, make_model
from tensorfiles import DTYPES, CountingDir, assert_same, sample_tensors

# --------------------------------------------------------------------------- exact reads


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_single_file_reads_equal_load_file(tmp_path, dtype_name):
    tensors = sample_tensors(DTYPES[dtype_name])
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reference = load_file(str(tmp_path / "model.safetensors"))

    ckpt = Checkpoint(LocalDir(tmp_path), "test model")
    assert set(ckpt.locations) == set(reference)
    for name, want in reference.items():
        assert name in ckpt
        info = ckpt.info(name)
        assert info.shape == tuple(want.shape)
        assert info.nbytes == want.numel() * want.element_size()
        assert_same(ckpt.read(name), want)
    assert ckpt.shards["model.safetensors"].metadata == {"format": "pt"}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_sharded_checkpoint_reads_equal_load_file(tmp_path, dtype_name):
    model = make_model(SynthSpec(hidden=32, layers=2, heads=4, dtype=dtype_name))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1, "the fixture should be sharded"
    assert not (tmp_path / "model.safetensors").exists()

    reference: dict[str, torch.Tensor] = {}
    for shard in shard_files:
        reference.update(load_file(str(tmp_path / shard)))
    assert set(reference) == set(index["weight_map"])

    ckpt = Checkpoint(LocalDir(tmp_path), "sharded model")
    assert set(ckpt.shards) == set(shard_files)
    assert set(ckpt.locations) == set(reference)
    for name, want in reference.items():
        assert ckpt.locations[name].name == index["weight_map"][name]
        got = ckpt.read(name)
        assert got.dtype == DTYPES[dtype_name]
        assert_same(got, want)


def test_fingerprint_is_stable_and_changes_with_content(tmp_path):
    tensors = sample_tensors(torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    fp1 = Checkpoint(LocalDir(tmp_path), "m").fingerprint()
    assert fp1 == Checkpoint(LocalDir(tmp_path), "m").fingerprint()
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert Checkpoint(LocalDir(tmp_path), "m").fingerprint() != fp1


# --------------------------------------------------------------------------- lazy I/O


def test_reading_one_tensor_reads_only_header_and_that_tensor(tmp_path):
    tensors = sample_tensors(torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    file_size = (tmp_path / "model.safetensors").stat().st_size
    (header_len,) = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])

    store = CountingDir(tmp_path)
    f = SafetensorsFile(store, "model.safetensors")
    assert store.bytes_read == 8 + header_len  # opening reads the header only
    assert store.whole_reads == []

    name = "model.layers.10.mlp.down_proj.weight"
    info = f.tensors[name]
    store.reset()
    got = f.read(name)
    assert store.ranges == [("model.safetensors", info.offset, info.nbytes)]
    assert store.bytes_read == info.nbytes == 8 * 24 * 4
    assert store.bytes_read < file_size / 4
    assert_same(got, tensors[name])

    # A zero-size tensor costs no I/O at all.
    store.reset()
    assert f.read("empty").shape == (0, 3)
    assert store.bytes_read == 0


def test_sharded_open_reads_headers_only_and_read_touches_one_shard(tmp_path):
    model = make_model(SynthSpec(hidden=32, layers=2, heads=4))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard_names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    header_bytes = 0
    for shard in shard_names:
        (n,) = struct.unpack("<Q", (tmp_path / shard).read_bytes()[:8])
        header_bytes += 8 + n

    store = CountingDir(tmp_path)
    ckpt = Checkpoint(store, "sharded model")
    assert store.bytes_read == header_bytes
    assert store.whole_reads == ["model.safetensors.index.json"]

    name = "model.layers.1.self_attn.v_proj.weight"
    info = ckpt.info(name)
    store.reset()
    ckpt.read(name)
    assert store.ranges == [(ckpt.locations[name].name, info.offset, info.nbytes)]
    assert store.whole_reads == []



def test_read_many_reads_neighbours_at_once_and_bounds_gaps(tmp_path):
    tensors = sample_tensors(torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    store = CountingDir(tmp_path)
    f = SafetensorsFile(store, "model.safetensors")
    by_offset = sorted(f.tensors.values(), key=lambda i: i.offset)
    wanted = [by_offset[1].name, by_offset[2].name, by_offset[3].name, by_offset[6].name]  # 3 neighbours, then a gap
    store.reset()
    got = f.read_many(wanted, finite=True, max_gap=0)
    assert store.ranges == [("model.safetensors", by_offset[1].offset,
                             by_offset[3].offset + by_offset[3].nbytes - by_offset[1].offset),
                            ("model.safetensors", by_offset[6].offset, by_offset[6].nbytes)]
    for name in wanted:
        assert_same(got[name], tensors[name])
    store.reset()  # a small gap is read through: one read
    got = f.read_many(wanted, finite=True)
    assert store.ranges == [("model.safetensors", by_offset[1].offset,
                             by_offset[6].offset + by_offset[6].nbytes - by_offset[1].offset)]
    for name in wanted:
        assert_same(got[name], tensors[name])
    store.reset()  # a span limit splits a run of neighbours
    f.read_many(wanted[:3], max_span=by_offset[1].nbytes + by_offset[2].nbytes)
    assert len(store.ranges) == 2


def test_read_many_names_the_tensor_that_is_not_finite(tmp_path):
    tensors = {"a": torch.ones(4, 4), "b": torch.ones(3), "c": torch.ones(5, 2)}
    tensors["b"][1] = float("nan")
    save_file(tensors, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(LocalDir(tmp_path), "x.safetensors")
    assert f.read_many(["a", "c"], finite=True)["c"].shape == (5, 2)  # b lies between them, but is not read
    with pytest.raises(SafeMergeError, match=r"x.safetensors: tensor b contains NaN or Inf"):
        f.read_many(["a", "b", "c"], finite=True)
    assert torch.isnan(f.read_many(["b"])["b"][1])  # unchecked unless asked


def test_read_many_copes_with_a_tensor_off_its_dtype_alignment(tmp_path):
    """A 3-byte uint8 tensor before a float32 one: the float32 view starts off a 4-byte boundary of the read."""
    tensors = {"a_bytes": torch.tensor([1, 2, 3], dtype=torch.uint8), "b_floats": torch.arange(4.0)}
    path = tmp_path / "odd.safetensors"
    header = {"a_bytes": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b_floats": {"dtype": "F32", "shape": [4], "data_offsets": [3, 19]}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tensors["a_bytes"].numpy().tobytes()
                     + tensors["b_floats"].numpy().tobytes())
    got = SafetensorsFile(LocalDir(tmp_path), "odd.safetensors").read_many(["a_bytes", "b_floats"], finite=True)
    assert torch.equal(got["a_bytes"], tensors["a_bytes"]) and torch.equal(got["b_floats"], tensors["b_floats"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.int64, torch.int32,
                                   torch.int16, torch.int8, torch.uint8, torch.bool, torch.bfloat16])
def test_adapter_bytes_equal_safetensors_torch_api(dtype):
    """Adapters are written through safetensors' numpy API where it has the dtype: byte for byte the torch API's."""
    from safetensors.torch import save

    from safemerge_ray.io import safetensors_bytes

    tensors = {k: (v * 50).to(dtype) for k, v in sample_tensors(torch.float32).items() if k != "specials"}
    tensors["z.float32_too"] = torch.ones(3, 2)  # mixed dtypes are ordered the same way
    assert safetensors_bytes(tensors, {"format": "pt"}) == save(tensors, metadata={"format": "pt"})


def test_merged_adapters_are_laid_out_as_safetensors_writes_them(tmp_path):
    """float32 tensors with plain names are laid out by safemerge-ray itself: byte for byte safetensors'."""
    from safetensors.torch import save

    from safemerge_ray.io import safetensors_bytes

    gen = torch.Generator().manual_seed(5)
    tensors = {f"base_model.model.model.layers.{i}.mlp.{p}.lora_{x}.weight": torch.randn(r, 24, generator=gen)
               for i in (0, 1, 10, 2) for p in ("up_proj", "down_proj") for x, r in (("A", 4), ("B", 3))}
    tensors["scalar"], tensors["empty"] = torch.tensor(1.5), torch.zeros(0, 3)
    for metadata in ({"format": "pt"}, {}):
        assert safetensors_bytes(tensors, metadata) == save(tensors, metadata=metadata or None)
    assert safetensors_bytes({}, {"format": "pt"}) == save({}, metadata={"format": "pt"})
    odd = {"a name with spaces": torch.ones(2)}  # not plain: safetensors' own writer
    assert safetensors_bytes(odd, {"format": "pt"}) == save(odd, metadata={"format": "pt"})


def test_an_assembled_adapter_with_nan_or_inf_is_not_written_and_large_finite_values_are():
    from safemerge_ray.engine import AssembledAdapter

    big = torch.full((4, 4), 3e38)  # finite, but their sum overflows: looked at tensor by tensor, and passes
    assert AssembledAdapter("x", {"a": torch.ones(2, 2), "b": big}, {"r": 1}, []).files()
    for bad in (float("nan"), float("inf")):
        t = torch.ones(3, 3)
        t[1, 2] = bad
        with pytest.raises(SafeMergeError, match=r"adapter x: merged tensor b is not finite"):
            AssembledAdapter("x", {"a": torch.ones(2, 2), "b": t}, {"r": 1}, []).files()
