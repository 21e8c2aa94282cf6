"""Open a checkpoint from its headers alone: every tensor's file, dtype, shape and byte range.

Accepted layouts: a folder with `model.safetensors.index.json`; a folder with one
`model.safetensors` (as `save_pretrained` writes small models); a folder of `*.safetensors`
without an index; a single `.safetensors` file. The index file is untrusted: its shard names
must stay inside the checkpoint.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field

from raymerge.errors import CheckpointError, ConfigError
from raymerge.safetensors_format import TensorEntry, read_header
from raymerge.storage import open_source
from raymerge.storage.base import Source

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024
# files besides the weights that make a folder a usable Hugging Face checkpoint
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
CONFIG_FILES = ("config.json", "generation_config.json")


@dataclass
class Checkpoint:
    """A checkpoint's tensor directory, read from headers only."""

    uri: str
    source: Source
    tensors: dict[str, TensorEntry]
    files: list[str]
    fingerprints: dict[str, str] = field(default_factory=dict)

    def read_json(self, name: str) -> dict | None:
        """A small JSON side file (config.json), or None if absent or unreadable."""
        if not self.source.exists(name):
            return None
        try:
            value = json.loads(self.source.read_range(name, 0, self.source.size(name)))
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(uri: str) -> Checkpoint:
    """Open `uri` (folder or .safetensors file), reading and validating headers only."""
    if uri.endswith(".safetensors") and os.path.isfile(uri):
        source = open_source(os.path.dirname(os.path.abspath(uri)))
        files = [os.path.basename(uri)]
        weight_map = None
    elif os.path.isdir(uri):
        source = open_source(uri)
        files, weight_map = _find_shards(source)
    else:
        raise ConfigError(
            f"checkpoint {uri!r} does not exist; give a folder holding *.safetensors files or a "
            ".safetensors file"
        )
    tensors: dict[str, TensorEntry] = {}
    fingerprints = {}
    for file in files:
        entries, _ = read_header(source, file)
        fingerprints[file] = source.fingerprint(file)
        for name, entry in entries.items():
            if name in tensors:
                raise CheckpointError(
                    f"{uri}: tensor {name!r} is stored twice, in {tensors[name].file} and {file}"
                )
            tensors[name] = entry
    if weight_map is not None:
        _check_weight_map(uri, weight_map, tensors)
    if not tensors:
        raise CheckpointError(f"{uri}: holds no tensors")
    return Checkpoint(uri, source, tensors, files, fingerprints)


def _find_shards(source: Source) -> tuple[list[str], dict[str, str] | None]:
    names = source.list()
    if INDEX_NAME in names:
        weight_map = _read_index(source)
        return sorted(set(weight_map.values())), weight_map
    shards = [n for n in names if n.endswith(".safetensors")]
    if shards:
        return shards, None
    hint = ""
    if any(n.endswith(".bin") or n.endswith(".pt") for n in names):
        hint = (
            "; it holds pickle (.bin/.pt) weights, which raymerge does not load: convert them "
            "with `transformers` (save_pretrained(..., safe_serialization=True))"
        )
    raise ConfigError(f"{source.root}: no *.safetensors files or {INDEX_NAME} found{hint}")


def _read_index(source: Source) -> dict[str, str]:
    where = source.describe(INDEX_NAME)
    size = source.size(INDEX_NAME)
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{where}: {size} bytes is too large for an index file")
    try:
        index = json.loads(source.read_range(INDEX_NAME, 0, size))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{where}: 'weight_map' must map tensor names to shard file names")
    for tensor, file in weight_map.items():
        if not _is_safe_relative(file):
            raise CheckpointError(
                f"{where}: tensor {tensor!r} points to {file!r}, outside the checkpoint folder; "
                "shard names must be plain relative paths without '..'"
            )
        if not source.exists(file):
            raise CheckpointError(
                f"{where}: tensor {tensor!r} points to {file!r}, which does not exist "
                "(incomplete download?)"
            )
    return weight_map


def _is_safe_relative(file: str) -> bool:
    if not file or "\\" in file or "\x00" in file or file.startswith("/"):
        return False
    normal = posixpath.normpath(file)
    return not (normal.startswith("..") or posixpath.isabs(normal) or ":" in file.split("/")[0])


def _check_weight_map(
    uri: str, weight_map: dict[str, str], tensors: dict[str, TensorEntry]
) -> None:
    for name, file in weight_map.items():
        entry = tensors.get(name)
        if entry is None or entry.file != file:
            raise CheckpointError(
                f"{uri}/{INDEX_NAME}: lists tensor {name!r} in {file}, but that file's header "
                "does not hold it"
            )
