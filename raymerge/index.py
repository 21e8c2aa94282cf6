"""The output's indexes: the Hugging Face weight map, and an Arrow table of every tensor.

`tensors.parquet` has one row per tensor (name, shard, dtype, shape, absolute byte range,
CRC-32, layer, method, sources), so any tensor can be fetched with one ranged read and every
byte can be checked by `verify`.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from raymerge.errors import CheckpointError, shown
from raymerge.plan import Plan
from raymerge.safetensors_format import read_header
from raymerge.storage import is_remote, open_source

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


MAX_TENSOR_INDEX_BYTES = 1 << 30
# the columns `verify` reads (their types are TENSOR_SCHEMA's)
VERIFY_COLUMNS = ("name", "shard", "dtype", "shape", "start", "end", "checksum")


def verify(out: str) -> VerifyReport:
    """Recompute every tensor's checksum and check each shard's header against the index.

    tensors.parquet is untrusted: its schema is checked, shard names must be plain file names
    in `out`, and each row's dtype, shape and byte range must match the shard's own header.
    """
    source = open_source(out)
    if not is_remote(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: not a folder; give the output folder of `raymerge run`")
    if not source.exists(TENSOR_INDEX):
        raise CheckpointError(
            f"{out}: no {TENSOR_INDEX}; this is not a complete raymerge output "
            "(an unfinished run? rerun `raymerge run` with the same config to resume)"
        )
    rows = read_tensor_index(source)
    problems: list[str] = []
    if not source.exists(COMPLETE):
        problems.append(f"{COMPLETE} marker is missing: the run did not finish")
    checked = 0
    headers: dict[str, dict | None] = {}
    listed: dict[str, set[str]] = {}
    for number, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            problems.append(f"{TENSOR_INDEX} row {number}: {problem}")
            continue
        shard, name = row["shard"], row["name"]
        if name in listed.get(shard, ()):
            problems.append(f"{shard}: tensor {shown(name)} is listed twice in {TENSOR_INDEX}")
            continue
        listed.setdefault(shard, set()).add(name)
        if shard not in headers:
            headers[shard] = _shard_header(source, shard, problems)
        header = headers[shard]
        if header is None:
            continue
        entry = header.get(name)
        if entry is None or (entry.start, entry.end) != (row["start"], row["end"]):
            problems.append(f"{shard}: tensor {shown(name)} is not where the index says")
            continue
        if (entry.dtype, list(entry.shape)) != (row["dtype"], row["shape"]):
            problems.append(
                f"{shard}: tensor {shown(name)} is {entry.dtype} {list(entry.shape)} in the "
                f"shard's header but {shown(row['dtype'])} {shown(row['shape'])} in {TENSOR_INDEX}"
            )
            continue
        data = source.read_range(shard, row["start"], row["end"] - row["start"])
        checked += len(data)
        actual = f"{zlib.crc32(data):08x}"
        if actual != row["checksum"]:
            problems.append(
                f"{shard}: tensor {shown(name)} checksum {actual} != index {shown(row['checksum'])}"
            )
    for shard, header in headers.items():
        unlisted = sorted(set(header or ()) - listed.get(shard, set()))
        if unlisted:
            problems.append(
                f"{shard}: holds {len(unlisted)} tensor(s) that {TENSOR_INDEX} does not list, "
                f"first {shown(unlisted[0])}"
            )
    return VerifyReport(len(rows), len(headers), checked, problems)


def read_tensor_index(source) -> list[dict]:
    """tensors.parquet's rows, after checking it is Parquet with the columns verify needs."""
    where = source.describe(TENSOR_INDEX)
    size = source.size(TENSOR_INDEX)
    if size > MAX_TENSOR_INDEX_BYTES:
        raise CheckpointError(f"{where}: {size} bytes is too large for a tensor index")
    try:
        # no Arrow thread pools: they can abort the interpreter at exit (apache/arrow#34314)
        table = pq.read_table(
            io.BytesIO(source.read_range(TENSOR_INDEX, 0, size)),
            use_threads=False,
            pre_buffer=False,
        )
    except (pa.ArrowException, OSError, ValueError) as exc:
        problem = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{where}: not a readable Parquet file ({problem}); the output is damaged: rerun "
            "the merge with --force"
        ) from None
    for column in VERIFY_COLUMNS:
        expected = TENSOR_SCHEMA.field(column).type
        count = table.column_names.count(column)
        if count != 1:
            raise CheckpointError(
                f"{where}: column {column!r} is {'missing' if not count else 'duplicated'}; this "
                "is not a raymerge tensor index (or it is damaged): rerun the merge with --force"
            )
        actual = table.schema.field(column).type
        if not actual.equals(expected):
            raise CheckpointError(
                f"{where}: column {column!r} has type {actual}, expected {expected}; the index "
                "is damaged: rerun the merge with --force"
            )
    return table.select(list(VERIFY_COLUMNS)).to_pylist()


def row_problem(row: dict) -> str | None:
    """What is wrong with one row's values, or None."""
    for column in ("name", "shard", "dtype", "checksum"):
        if not isinstance(row[column], str) or not row[column]:
            return f"{column} is empty"
    if not is_plain_file_name(row["shard"]):
        return (
            f"shard {shown(row['shard'])} is not a plain *.safetensors file name in the output "
            "folder; the index is damaged or was tampered with"
        )
    start, end = row["start"], row["end"]
    if start is None or end is None or not 0 <= start <= end:
        return f"byte range [{start}, {end}) of tensor {shown(row['name'])} is not valid"
    shape = row["shape"]
    if shape is None or any(d is None or d < 0 for d in shape):
        return f"shape {shown(shape)} of tensor {shown(row['name'])} is not valid"
    return None


def is_plain_file_name(name: str) -> bool:
    """A shard name that stays inside its folder: no separators, no '..', no NUL."""
    return name.endswith(".safetensors") and not any(c in name for c in "/\\:\x00")


def _shard_header(source, shard: str, problems: list[str]) -> dict | None:
    if not source.exists(shard):
        problems.append(f"{shard}: missing (or not a regular file)")
        return None
    try:
        entries, _ = read_header(source, shard)
    except CheckpointError as exc:
        problems.append(str(exc))
        return None
    return entries
