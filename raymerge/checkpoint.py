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

from raymerge.errors import CheckpointError, ConfigError, shown
from raymerge.safetensors_format import TensorEntry, read_header
from raymerge.storage import open_source, uri_scheme
from raymerge.storage.base import Source

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_SIDE_FILE_BYTES = 16 * 1024 * 1024  # config.json and the like
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
        """A small JSON side file (config.json) as a new dict, or None if absent.

        Raises CheckpointError when it is too large, not JSON, or not a JSON object."""
        if not self.source.exists(name):
            return None
        where = self.source.describe(name)
        size = self.source.size(name)
        if size > MAX_SIDE_FILE_BYTES:
            raise CheckpointError(
                f"{where}: {size} bytes is too large for a model config (limit "
                f"{MAX_SIDE_FILE_BYTES}); replace it with the model's real {name}"
            )
        try:
            value = json.loads(self.source.read_range(name, 0, size))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            problem = str(exc).split(";")[0][:200] or type(exc).__name__
            raise CheckpointError(
                f"{where}: not valid JSON ({problem}); fix the file or restore the model's "
                f"original {name}"
            ) from None
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{where}: must be a JSON object ({{...}}), not {type(value).__name__}; fix the "
                f"file or restore the model's original {name}"
            )
        return value

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(uri: str) -> Checkpoint:
    """Open `uri` (folder or .safetensors file), reading and validating headers only, and
    config.json if there is one (so a broken one stops a merge before any weight is read)."""
    if uri_scheme(uri) == "lora":
        return _open_lora(uri)
    if uri_scheme(uri) is not None:
        source, files, weight_map = _locate_remote(uri)
    elif uri.endswith(".safetensors") and os.path.isfile(uri):
        source = open_source(os.path.dirname(os.path.abspath(uri)))
        files = [os.path.basename(uri)]
        weight_map = None
    elif os.path.isdir(uri):
        source = open_source(uri)
        files, weight_map = _find_shards(source)
    elif os.path.exists(uri):
        raise ConfigError(
            f"checkpoint {shown(uri)} is not a .safetensors file; give a folder holding "
            "*.safetensors files or a .safetensors file (pickle .bin/.pt weights must be "
            "converted first)"
        )
    else:
        raise ConfigError(
            f"checkpoint {shown(uri)} does not exist; give a folder holding *.safetensors files "
            "or a .safetensors file"
        )
    tensors: dict[str, TensorEntry] = {}
    fingerprints = {}
    for file in files:
        entries, _ = read_header(source, file)
        fingerprints[file] = source.fingerprint(file)
        for name, entry in entries.items():
            if name in tensors:
                raise CheckpointError(
                    f"{uri}: tensor {shown(name)} is stored twice, in {tensors[name].file} and "
                    f"{file}; the checkpoint is corrupt"
                )
            tensors[name] = entry
    if weight_map is not None:
        _check_weight_map(uri, weight_map, tensors)
    if not tensors:
        raise CheckpointError(f"{uri}: holds no tensors")
    checkpoint = Checkpoint(uri, source, tensors, files, fingerprints)
    checkpoint.read_json("config.json")
    return checkpoint


def _open_lora(uri: str) -> Checkpoint:
    """A base model with a PEFT LoRA adapter (lora://BASE+ADAPTER, storage/lora.py): the
    base's files, layout and side files, read through a LoraSource; the adapter is checked
    against the base's headers here, before any weight is read."""
    from raymerge.storage.lora import LoraSource, lora_uri, parse_uri

    base_ref, adapter_ref = parse_uri(uri)
    base = open_checkpoint(base_ref)  # the base decides the layout (a folder, a file, S3)
    source = LoraSource(lora_uri(base.source.root, adapter_ref))
    source.check(base.tensors, base.files)
    fingerprints = {file: source.fingerprint(file) for file in base.files}
    return Checkpoint(uri, source, base.tensors, base.files, fingerprints)


def _locate_remote(uri: str) -> tuple[Source, list[str], dict[str, str] | None]:
    """An object-store checkpoint: one .safetensors object, or a prefix holding a checkpoint's
    files (found with one listing)."""
    source = open_source(uri.rstrip("/"))
    if uri.endswith(".safetensors"):
        folder, _, file = source.root.rpartition("/")
        parent = open_source(folder)
        if parent.exists(file):
            return parent, [file], None
    if not source.list():
        raise ConfigError(
            f"checkpoint {shown(uri)}: nothing is stored under this prefix; give the prefix "
            "that holds the checkpoint's *.safetensors files (s3://bucket/path/to/model)"
        )
    files, weight_map = _find_shards(source)
    return source, files, weight_map


def _find_shards(source: Source) -> tuple[list[str], dict[str, str] | None]:
    names = source.list()
    if INDEX_NAME in names:
        _check_is_file(source, INDEX_NAME)
        weight_map = _read_index(source)
        return sorted(set(weight_map.values())), weight_map
    shards = [n for n in names if n.endswith(".safetensors")]
    if shards:
        for name in shards:
            _check_is_file(source, name)
        return shards, None
    hint = ""
    if any(n.endswith(".bin") or n.endswith(".pt") for n in names):
        hint = (
            "; it holds pickle (.bin/.pt) weights, which raymerge does not load: convert them "
            "with `transformers` (save_pretrained(..., safe_serialization=True))"
        )
    if source.root.endswith(".safetensors"):
        hint += "; this is a folder, not a .safetensors file"
    raise ConfigError(f"{source.root}: no *.safetensors files or {INDEX_NAME} found{hint}")


def _check_is_file(source: Source, name: str) -> None:
    if not source.exists(name):
        raise CheckpointError(
            f"{source.describe(name)}: not a regular file (a folder?); move it out of the "
            "checkpoint folder or replace it with the real file"
        )


def _read_index(source: Source) -> dict[str, str]:
    where = source.describe(INDEX_NAME)
    size = source.size(INDEX_NAME)
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{where}: {size} bytes is too large for an index file")
    try:
        index = json.loads(source.read_range(INDEX_NAME, 0, size))
    except (ValueError, RecursionError) as exc:
        problem = str(exc).split(";")[0][:200] or type(exc).__name__
        raise CheckpointError(f"{where}: not valid JSON ({problem})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{where}: 'weight_map' must map tensor names to shard file names")
    for tensor, file in weight_map.items():
        if not _is_safe_relative(file):
            raise CheckpointError(
                f"{where}: tensor {shown(tensor)} points to {shown(file)}, outside the checkpoint "
                "folder; shard names must be plain relative paths without '..'"
            )
        if not source.exists(file):
            raise CheckpointError(
                f"{where}: tensor {shown(tensor)} points to {shown(file)}, which does not exist "
                "or is not a file (incomplete download?)"
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
                f"{uri}/{INDEX_NAME}: lists tensor {shown(name)} in {shown(file)}, but that "
                "file's header does not hold it"
            )
