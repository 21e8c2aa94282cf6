"""Calibration data for a data stage: token ids from `.npy` or Parquet, or text tokenized
with the model's own `tokenizer.json`, cut into fixed-length sequences and fixed blocks.

The blocks are a function of the data alone (never of the worker count), so statistics
summed block by block in block order are the same for any number of workers. Everything
here runs on the driver without torch.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass

import numpy as np

from raymerge.checkpoint import Checkpoint
from raymerge.errors import ConfigError, DataError
from raymerge.storage import is_remote, open_source

SEQUENCES_PER_BLOCK = 8  # sequences one stage item runs through every layer
TOKEN_COLUMNS = ("input_ids", "tokens", "token_ids")
TEXT_COLUMNS = ("text", "content")
MAX_TEXT_BYTES = 1 << 30


@dataclass(frozen=True)
class Calibration:
    sequences: np.ndarray  # int64 [count, sequence_length]
    fingerprint: str  # sha256 of the token ids used and the sequence length

    def blocks(self) -> list[np.ndarray]:
        """Fixed blocks of SEQUENCES_PER_BLOCK sequences (the last may be shorter)."""
        step = SEQUENCES_PER_BLOCK
        return [self.sequences[lo : lo + step] for lo in range(0, len(self.sequences), step)]


def resolve(path: str, config_source: str) -> str:
    """A calibration path as model paths are found: from the working directory, else from
    the config's folder."""
    path = os.path.expanduser(path)
    if is_remote(path) or os.path.isabs(path) or os.path.exists(path):
        return path if is_remote(path) else os.path.abspath(path)
    beside = os.path.join(os.path.dirname(os.path.abspath(config_source)), path)
    if not os.path.exists(beside):
        raise ConfigError(
            f"calibration {path!r} not found (looked for {os.path.abspath(path)!r} or "
            f"{beside!r}); give token ids (.npy, Parquet) or text (docs/zipit.md shows how "
            "to make some to try it out)"
        )
    return beside


def load(path: str, tokens: int, sequence_length: int, vocab: int,
         reference: Checkpoint) -> Calibration:  # fmt: skip
    """The first `tokens` token ids of `path`, as whole sequences of `sequence_length`
    (text is tokenized with the `reference` model's tokenizer.json)."""
    where = f"calibration {path!r}"
    ids = _token_ids(path, reference, where)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise DataError(
            f"{where}: token ids must lie in [0, {vocab}) for this model's vocabulary; found "
            f"{int(ids.min())}..{int(ids.max())}"
        )
    count = min(tokens, ids.size) // sequence_length
    if count == 0:
        raise ConfigError(
            f"{where} has {ids.size} tokens (calibration_tokens {tokens}), fewer than one "
            f"sequence of sequence_length {sequence_length}; give more data or a shorter "
            "sequence_length"
        )
    sequences = np.ascontiguousarray(ids[: count * sequence_length], dtype=np.int64)
    sequences = sequences.reshape(count, sequence_length)
    digest = hashlib.sha256(sequences.tobytes() + str(sequence_length).encode()).hexdigest()
    return Calibration(sequences, digest)


def _token_ids(path: str, reference: Checkpoint, where: str) -> np.ndarray:
    raw = _read(path, where)
    suffix = posixpath.splitext(path.split("?", 1)[0])[1].lower()
    if suffix == ".npy":
        return _from_npy(raw, where)
    if suffix == ".parquet":
        return _from_parquet(raw, reference, where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{where} is neither .npy, .parquet nor UTF-8 text; give token ids (.npy, or "
            "Parquet with an input_ids column) or text"
        ) from None
    return _tokenize([text], reference, where)


def _read(path: str, where: str) -> bytes:
    folder, name = posixpath.split(path) if is_remote(path) else os.path.split(path)
    try:
        source = open_source(folder)
        size = source.size(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} cannot be read: {exc}") from None
    if size > MAX_TEXT_BYTES:
        raise ConfigError(f"{where} is {size} bytes; calibration data is limited to 1 GiB")
    return source.read_range(name, 0, size)


def _from_npy(raw: bytes, where: str) -> np.ndarray:
    import io

    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{where} is not a readable .npy file: {exc}") from None
    if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (1, 2):
        raise DataError(
            f"{where}: a .npy of token ids is a 1-D or 2-D integer array; this one is "
            f"{array.ndim}-D {array.dtype}"
        )
    return array.reshape(-1).astype(np.int64)


def _from_parquet(raw: bytes, reference: Checkpoint, where: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{where} is not a readable Parquet file: {exc}") from None
    for name in TOKEN_COLUMNS:
        if name in table.column_names:
            column = table.column(name)
            kind = column.type
            if pa.types.is_list(kind) or pa.types.is_large_list(kind):
                kind = kind.value_type
                column = pa.chunked_array([c.flatten() for c in column.chunks], kind)
            if not pa.types.is_integer(kind):
                raise DataError(f"{where}: column {name!r} holds {kind}, not integer token ids")
            return column.to_numpy().astype(np.int64)
    for name in TEXT_COLUMNS:
        if name in table.column_names:
            texts = [t for t in table.column(name).to_pylist() if isinstance(t, str)]
            return _tokenize(texts, reference, where)
    raise DataError(
        f"{where}: no token column ({', '.join(TOKEN_COLUMNS)}) or text column "
        f"({', '.join(TEXT_COLUMNS)}); its columns: {', '.join(table.column_names)}"
    )


def _tokenize(texts: list[str], reference: Checkpoint, where: str) -> np.ndarray:
    from raymerge.tokenizer import text_tokenizer  # (it imports the method registry)

    tokenizer = text_tokenizer(reference)
    if tokenizer is None:
        raise ConfigError(
            f"{where} is text, but the first model has no tokenizer.json to tokenize it; "
            "give token ids (.npy or Parquet) instead"
        )
    ids = [token for encoding in tokenizer.encode_batch(texts) for token in encoding.ids]
    return np.asarray(ids, dtype=np.int64)
