"""The lazy safetensors reader on damaged files and model directories: clear errors, never a wrong tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safemerge_ray.errors import SafeMergeError
from safemerge_ray.io import Checkpoint, LocalDir, SafetensorsFile
from tensorfiles import assert_same, raw_file, sample_tensors

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
    raw_file(p, [1, 2, 3], b"")


def _damage_range_mismatch(p: Path):
    raw_file(p, {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 12)


def _damage_hole(p: Path):
    raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, b"\0" * 24)


def _damage_overlap(p: Path):
    raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)


def _damage_leading_hole(p: Path):
    raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16)


def _damage_trailing_bytes(p: Path):
    _valid_file(p)
    p.write_bytes(p.read_bytes() + b"\0" * 7)


def _damage_unknown_dtype(p: Path):
    raw_file(p, {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")


def _damage_non_string_dtype(p: Path):
    raw_file(p, {"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)


def _damage_missing_offsets(p: Path):
    raw_file(p, {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)


def _damage_negative_shape(p: Path):
    raw_file(p, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)


def _damage_reversed_offsets(p: Path):
    raw_file(p, {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8)


def _damage_entry_not_object(p: Path):
    raw_file(p, {"a": [1, 2, 3]}, b"")


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
    t = sample_tensors(torch.float32)
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
        assert_same(ckpt.read(name), t)


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

