"""The lazy safetensors reader: exact reads, byte-range-only I/O, and clear errors on damaged files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safemerge_ray.errors import SafeMergeError
from safemerge_ray.io import Checkpoint, LocalDir, SafetensorsFile
from safemerge_ray.synthetic import SynthSpec, make_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- helpers


def _sample_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
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


def _raw_file(path: Path, header: dict, data: bytes, *, header_len: int | None = None) -> Path:
    """Write a safetensors-shaped file by hand: u64 header length, JSON header, data."""
    hbytes = json.dumps(header).encode()
    n = len(hbytes) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + hbytes + data)
    return path


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
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


# --------------------------------------------------------------------------- exact reads


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_single_file_reads_equal_load_file(tmp_path, dtype_name):
    tensors = _sample_tensors(DTYPES[dtype_name])
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reference = load_file(str(tmp_path / "model.safetensors"))

    ckpt = Checkpoint(LocalDir(tmp_path), "test model")
    assert set(ckpt.locations) == set(reference)
    for name, want in reference.items():
        assert name in ckpt
        info = ckpt.info(name)
        assert info.shape == tuple(want.shape)
        assert info.nbytes == want.numel() * want.element_size()
        _assert_same(ckpt.read(name), want)
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
        _assert_same(got, want)


def test_fingerprint_is_stable_and_changes_with_content(tmp_path):
    tensors = _sample_tensors(torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    fp1 = Checkpoint(LocalDir(tmp_path), "m").fingerprint()
    assert fp1 == Checkpoint(LocalDir(tmp_path), "m").fingerprint()
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert Checkpoint(LocalDir(tmp_path), "m").fingerprint() != fp1


# --------------------------------------------------------------------------- lazy I/O


def test_reading_one_tensor_reads_only_header_and_that_tensor(tmp_path):
    tensors = _sample_tensors(torch.float32)
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
    _assert_same(got, tensors[name])

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


# --------------------------------------------------------------------------- damaged files


def _valid_file(path: Path) -> Path:
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.ones(4, dtype=torch.float32)}, str(path))
    return path


def _damage_truncated_data(p: Path):
    _valid_file(p)
    p.write_bytes(p.read_bytes()[:-5])


def _damage_header_too_long(p: Path):
    _valid_file(p)
    raw = bytearray(p.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) + 1000)
    p.write_bytes(bytes(raw))


def _damage_header_huge(p: Path):
    _valid_file(p)
    raw = bytearray(p.read_bytes())
    raw[:8] = struct.pack("<Q", 2**63)
    p.write_bytes(bytes(raw))


def _damage_header_not_json(p: Path):
    body = b"{this is not json at all" + b" " * 8
    p.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 16)


def _damage_header_not_utf8(p: Path):
    body = b"\xff\xfe\x00garbage"
    p.write_bytes(struct.pack("<Q", len(body)) + body)


def _damage_header_not_object(p: Path):
    _raw_file(p, [1, 2, 3], b"")


def _damage_range_mismatch(p: Path):
    _raw_file(p, {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 12)


def _damage_hole(p: Path):
    _raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, b"\0" * 24)


def _damage_overlap(p: Path):
    _raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)


def _damage_leading_hole(p: Path):
    _raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16)


def _damage_trailing_bytes(p: Path):
    _valid_file(p)
    p.write_bytes(p.read_bytes() + b"\0" * 7)


def _damage_unknown_dtype(p: Path):
    _raw_file(p, {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")


def _damage_non_string_dtype(p: Path):
    _raw_file(p, {"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)


def _damage_missing_offsets(p: Path):
    _raw_file(p, {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)


def _damage_negative_shape(p: Path):
    _raw_file(p, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)


def _damage_reversed_offsets(p: Path):
    _raw_file(p, {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8)


def _damage_entry_not_object(p: Path):
    _raw_file(p, {"a": [1, 2, 3]}, b"")


def _damage_tiny_file(p: Path):
    p.write_bytes(b"\x01\x02\x03\x04\x05")


def _damage_empty_file(p: Path):
    p.write_bytes(b"")


DAMAGED = [
    ("truncated_data", _damage_truncated_data, "truncated"),
    ("header_longer_than_file", _damage_header_too_long, "header claims"),
    ("header_length_huge", _damage_header_huge, "header claims"),
    ("header_not_json", _damage_header_not_json, "corrupt safetensors header"),
    ("header_not_utf8", _damage_header_not_utf8, "corrupt safetensors header"),
    ("header_not_object", _damage_header_not_object, "not a JSON object"),
    ("byte_range_mismatch", _damage_range_mismatch, "needs 16 bytes but its header gives 12"),
    ("hole", _damage_hole, "overlaps or has holes"),
    ("overlap", _damage_overlap, "overlaps or has holes"),
    ("leading_hole", _damage_leading_hole, "overlaps or has holes"),
    ("trailing_bytes", _damage_trailing_bytes, "7 trailing bytes"),
    ("unknown_dtype", _damage_unknown_dtype, "unsupported dtype F4"),
    ("non_string_dtype", _damage_non_string_dtype, "tensor 'a'"),
    ("missing_offsets", _damage_missing_offsets, "corrupt header entry for tensor 'a'"),
    ("negative_shape", _damage_negative_shape, "corrupt header entry for tensor 'a'"),
    ("reversed_offsets", _damage_reversed_offsets, "corrupt header entry for tensor 'a'"),
    ("entry_not_object", _damage_entry_not_object, "corrupt header entry for tensor 'a'"),
    ("shorter_than_8_bytes", _damage_tiny_file, "not a safetensors file (5 bytes)"),
    ("empty_file", _damage_empty_file, "not a safetensors file (0 bytes)"),
]


@pytest.mark.parametrize("damage,expected", [pytest.param(d, e, id=n) for n, d, e in DAMAGED])
def test_damaged_file_raises_clear_error(tmp_path, damage, expected):
    damage(tmp_path / "model.safetensors")
    with pytest.raises(SafeMergeError) as exc:
        SafetensorsFile(LocalDir(tmp_path), "model.safetensors")
    msg = str(exc.value)
    assert expected in msg
    assert str(tmp_path / "model.safetensors") in msg  # says which file
    # The same damage through a whole checkpoint is the same clear error.
    with pytest.raises(SafeMergeError) as exc2:
        Checkpoint(LocalDir(tmp_path), "aligned model")
    assert expected in str(exc2.value)


def test_truncated_file_message_names_the_sizes(tmp_path):
    _damage_truncated_data(tmp_path / "model.safetensors")
    with pytest.raises(SafeMergeError,
                       match=r"tensor '(a|b)' ends at byte \d+ of the data but the file holds only \d+"):
        SafetensorsFile(LocalDir(tmp_path), "model.safetensors")


def test_file_shrinking_after_open_is_a_clear_error(tmp_path):
    """The header was fine when opened; the data went missing before the read (e.g. a concurrent rewrite)."""
    p = _valid_file(tmp_path / "model.safetensors")
    f = SafetensorsFile(LocalDir(tmp_path), "model.safetensors")
    p.write_bytes(p.read_bytes()[: f.tensors["b"].offset + 2])
    with pytest.raises(SafeMergeError, match="truncated"):
        f.read("b")


# --------------------------------------------------------------------------- model directories


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SafeMergeError) as exc:
        Checkpoint(LocalDir(tmp_path), "aligned model")
    msg = str(exc.value)
    assert "pickle" in msg
    assert "pytorch_model.bin" in msg
    assert "safetensors" in msg  # says what to do instead
    assert msg.startswith("aligned model")


def test_empty_directory_errors_clearly(tmp_path):
    with pytest.raises(SafeMergeError) as exc:
        Checkpoint(LocalDir(tmp_path), "unaligned model")
    msg = str(exc.value)
    assert "no model.safetensors or model.safetensors.index.json" in msg
    assert str(tmp_path) in msg


def _sharded_by_hand(d: Path) -> dict:
    t = _sample_tensors(torch.float32)
    names = sorted(t)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({k: t[k] for k in first}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in second}, str(d / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_hand_written_index_reads(tmp_path):
    _sharded_by_hand(tmp_path)
    want = {**load_file(str(tmp_path / "model-00001-of-00002.safetensors")),
            **load_file(str(tmp_path / "model-00002-of-00002.safetensors"))}
    ckpt = Checkpoint(LocalDir(tmp_path), "m")
    for name, t in want.items():
        _assert_same(ckpt.read(name), t)


def test_index_listing_a_tensor_its_shard_lacks_errors(tmp_path):
    index = _sharded_by_hand(tmp_path)
    index["weight_map"]["model.layers.5.mlp.gate_proj.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SafeMergeError) as exc:
        Checkpoint(LocalDir(tmp_path), "aligned model")
    msg = str(exc.value)
    assert "index lists tensors its shards lack" in msg
    assert "model.layers.5.mlp.gate_proj.weight" in msg


def test_index_naming_a_missing_shard_errors(tmp_path):
    _sharded_by_hand(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SafeMergeError, match="missing file: .*model-00002-of-00002.safetensors"):
        Checkpoint(LocalDir(tmp_path), "aligned model")


@pytest.mark.parametrize("text", ["{not json", "[]", '{"metadata": {}}', '{"weight_map": []}',
                                  '{"weight_map": {"a": 7}}'],
                         ids=["not_json", "not_object", "no_weight_map", "weight_map_list", "shard_not_string"])
def test_corrupt_index_errors(tmp_path, text):
    _sharded_by_hand(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(SafeMergeError, match="model.safetensors.index.json"):
        Checkpoint(LocalDir(tmp_path), "aligned model")


def test_damaged_shard_is_named_in_the_error(tmp_path):
    _sharded_by_hand(tmp_path)
    p = tmp_path / "model-00002-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(SafeMergeError, match="model-00002-of-00002.safetensors.*truncated"):
        Checkpoint(LocalDir(tmp_path), "aligned model")


def test_tensor_in_two_shards_follows_the_index_or_errors(tmp_path):
    """A tensor present in two shards: reading must give the copy the index points at (or refuse)."""
    save_file({"w": torch.zeros(4), "x": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"w": torch.full((4,), 7.0), "y": torch.ones(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "x": "model-00001-of-00002.safetensors",
                            "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint(LocalDir(tmp_path), "m")
    except SafeMergeError as exc:
        assert "'w'" in str(exc)
        return
    assert torch.equal(ckpt.read("w"), torch.zeros(4)), "read the shard the index does not name"


def test_hub_id_without_hub_access_is_a_clear_error(monkeypatch, tmp_path):
    """A hub id is fetched for users who have the hub; here (offline) it fails with a message, not a traceback."""
    import huggingface_hub.constants

    from safemerge_ray.io import open_dir

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SafeMergeError, match="could not be fetched from the Hugging Face hub"):
        open_dir("meta-llama/Llama-2-7b-chat-hf", what="aligned model")


def test_read_many_reads_neighbours_at_once_and_bounds_gaps(tmp_path):
    tensors = _sample_tensors(torch.float32)
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
        _assert_same(got[name], tensors[name])
    store.reset()  # a small gap is read through: one read
    got = f.read_many(wanted, finite=True)
    assert store.ranges == [("model.safetensors", by_offset[1].offset,
                             by_offset[6].offset + by_offset[6].nbytes - by_offset[1].offset)]
    for name in wanted:
        _assert_same(got[name], tensors[name])
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

    tensors = {k: (v * 50).to(dtype) for k, v in _sample_tensors(torch.float32).items() if k != "specials"}
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
