"""The output's indexes: the Hugging Face weight map, and an Arrow table of every tensor.

`tensors.parquet` has one row per tensor (name, shard, dtype, shape, absolute byte range,
CRC-32, layer, method, sources), so any tensor can be fetched with one ranged read and every
byte can be checked by `verify`.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from raymerge.errors import CheckpointError
from raymerge.plan import Plan
from raymerge.safetensors_format import read_header
from raymerge.storage import open_source

HF_INDEX = "model.safetensors.index.json"
TENSOR_INDEX = "tensors.parquet"
COMPLETE = "COMPLETE"
CHECKSUM_ALGORITHM = "crc32"

TENSOR_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("shard", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("checksum", pa.string()),
        ("layer", pa.int32()),
        ("method", pa.string()),
        ("sources", pa.list_(pa.string())),
    ],
    metadata={"checksum": CHECKSUM_ALGORITHM},
)


def hf_index(plan: Plan) -> bytes:
    """model.safetensors.index.json, as `save_pretrained` writes it."""
    weight_map = {t.name: plan.shards[t.shard].name for t in plan.tensors}
    total = sum(t.nbytes for t in plan.tensors)
    body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(body, indent=2) + "\n").encode()


def tensor_table(plan: Plan, checksums: dict[str, str], input_names: list[str]) -> pa.Table:
    rows = {field.name: [] for field in TENSOR_SCHEMA}
    for t in plan.tensors:
        rows["name"].append(t.name)
        rows["shard"].append(plan.shards[t.shard].name)
        rows["dtype"].append(t.dtype)
        rows["shape"].append(list(t.shape))
        rows["start"].append(t.start)
        rows["end"].append(t.end)
        rows["checksum"].append(checksums[t.name])
        rows["layer"].append(t.layer)
        rows["method"].append(plan.method if t.op == "merge" else t.op)
        rows["sources"].append([input_names[s.input] for s in t.sources])
    return pa.table(rows, schema=TENSOR_SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@dataclass
class VerifyReport:
    tensors: int
    shards: int
    bytes_checked: int
    problems: list[str]


def verify(out: str) -> VerifyReport:
    """Recompute every tensor's checksum and check each shard's header against the index."""
    source = open_source(out)
    if not source.exists(TENSOR_INDEX):
        raise CheckpointError(
            f"{out}: no {TENSOR_INDEX}; this is not a complete raymerge output "
            "(an unfinished run? rerun `raymerge run` with the same config to resume)"
        )
    try:
        # no Arrow thread pools: they can abort the interpreter at exit (apache/arrow#34314)
        table = pq.read_table(
            io.BytesIO(source.read_range(TENSOR_INDEX, 0, source.size(TENSOR_INDEX))),
            use_threads=False,
            pre_buffer=False,
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise CheckpointError(f"{source.describe(TENSOR_INDEX)}: unreadable ({exc})") from None
    problems: list[str] = []
    if not source.exists(COMPLETE):
        problems.append(f"{COMPLETE} marker is missing: the run did not finish")
    rows = table.to_pylist()
    checked = 0
    headers: dict[str, dict] = {}
    for row in rows:
        shard = row["shard"]
        if shard not in headers:
            headers[shard] = _shard_header(source, shard, problems)
        entry = headers[shard].get(row["name"]) if headers[shard] is not None else None
        if headers[shard] is None:
            continue
        if entry is None or (entry.start, entry.end) != (row["start"], row["end"]):
            problems.append(f"{shard}: tensor {row['name']!r} is not where the index says")
            continue
        data = source.read_range(shard, row["start"], row["end"] - row["start"])
        checked += len(data)
        actual = f"{zlib.crc32(data):08x}"
        if actual != row["checksum"]:
            problems.append(
                f"{shard}: tensor {row['name']!r} checksum {actual} != index {row['checksum']}"
            )
    return VerifyReport(len(rows), len(headers), checked, problems)


def _shard_header(source, shard: str, problems: list[str]) -> dict | None:
    if not source.exists(shard):
        problems.append(f"{shard}: missing")
        return None
    try:
        entries, _ = read_header(source, shard)
    except CheckpointError as exc:
        problems.append(str(exc))
        return None
    return entries
