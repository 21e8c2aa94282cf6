"""Reading single tensors of a raymerge output, local or in object storage.

`tensors.parquet` says where every tensor's bytes are, so one tensor costs one read of the
index (once) and one ranged read of its bytes (one GET on S3), checked against its CRC-32.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

from raymerge.dtypes import torch_dtype
from raymerge.errors import CheckpointError, shown
from raymerge.index import TENSOR_INDEX, read_tensor_index, row_problem
from raymerge.storage import open_source


class MergedModel(Mapping):
    """The tensors of one merge output, by name; each is read when asked for."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.source = open_source(uri)
        if not self.source.exists(TENSOR_INDEX):
            raise CheckpointError(
                f"{uri}: no {TENSOR_INDEX}; not a complete raymerge output (rerun the merge "
                "to finish it)"
            )
        self.rows: dict[str, dict] = {}
        for number, row in enumerate(read_tensor_index(self.source)):
            problem = row_problem(row)
            if problem:
                where = self.source.describe(TENSOR_INDEX)
                raise CheckpointError(f"{where} row {number}: {problem}")
            self.rows[row["name"]] = row

    def __getitem__(self, name: str):
        import torch

        row = self.rows.get(name)
        if row is None:
            raise KeyError(name)
        start, end = row["start"], row["end"]
        data = bytearray(self.source.read_range(row["shard"], start, end - start))
        crc = f"{zlib.crc32(data):08x}"
        if crc != row["checksum"]:
            raise CheckpointError(
                f"{self.source.describe(row['shard'])}: tensor {shown(name)} has checksum {crc}, "
                f"the index says {row['checksum']}; the output is damaged: rerun the merge"
            )
        dtype = torch_dtype(row["dtype"])
        if not data:
            return torch.empty(row["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(row["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)
