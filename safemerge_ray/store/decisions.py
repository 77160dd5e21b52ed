"""The decision table: one row per (adapter, layer), as `decisions.parquet` in every run (and `merge` output)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

DECISION_SCHEMA = pa.schema([
    ("adapter", pa.string()),
    ("module", pa.string()),
    ("rho", pa.float64()),
    ("rho_after", pa.float64()),  # rho of the repaired layer (null where kept): the repair's effect
    ("tau", pa.float64()),
    ("merged", pa.bool_()),
    ("action", pa.string()),
    ("policy", pa.string()),
    ("method", pa.string()),
    ("weight_finetuned", pa.float64()),
    ("weight_safety", pa.float64()),
    ("rank", pa.int32()),
    ("safety_lora_present", pa.bool_()),
])


def decisions_table(rows: list[dict]) -> pa.Table:
    """Rows as a columnar table: a fleet's workers send these, a few bytes per row, not dicts."""
    return pa.Table.from_pylist(rows, schema=DECISION_SCHEMA)


def decisions_bytes(decisions: list[dict] | pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(decisions if isinstance(decisions, pa.Table) else decisions_table(decisions), sink)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    """A Parquet file's bytes as a table, read from an Arrow-owned copy.

    Handed a Python file object (`io.BytesIO`), Arrow's reader keeps a reference to it that one of Arrow's
    pool threads may drop last, at interpreter exit; releasing a Python object then needs the GIL, which a
    finalizing interpreter refuses by ending the thread, and a C++ destructor on its stack turns that into
    `terminate called without an active exception` (exit 134). Bytes copied into Arrow's own memory are
    released without Python."""
    sink = pa.BufferOutputStream()
    sink.write(data)
    return pq.read_table(pa.BufferReader(sink.getvalue()))


def read_decisions(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def counts(rows: list[dict]) -> dict:
    actions: dict[str, int] = {}
    for r in rows:
        actions[r["action"]] = actions.get(r["action"], 0) + 1
    return {"modules": len(rows), "repaired": sum(r["merged"] for r in rows), "actions": actions}
