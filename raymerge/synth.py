"""Generate small Llama-layout checkpoints: a shared random base plus per-model deltas.

Real Hugging Face tensor names, config.json, sharded safetensors with an index. Every tensor
comes from a generator seeded by (seed, role, tensor name), so the files are reproducible and
task vectors (model - base) are meaningful for the task-vector methods.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from raymerge.errors import ConfigError
from raymerge.layouts import Layout, tensors

DELTA_SCALE = 0.1  # deltas are this fraction of the base's scale


@dataclass(frozen=True)
class SynthOptions:
    models: int = 2
    with_base: bool = True
    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    vocab: int = 256
    heads: int | None = None
    kv_heads: int | None = None
    shard_size: int = 500 * 10**6
    seed: int = 0
    dtype: torch.dtype = torch.bfloat16


def llama_tensors(o: SynthOptions) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint, in the order `save_pretrained` uses (the
    names of layouts.tensors, at these widths)."""
    heads = o.heads or max(1, o.hidden // 64)
    shape = Layout("synth", o.layers, o.hidden, o.intermediate, o.vocab, heads,
                   o.kv_heads or heads, o.hidden // heads)  # fmt: skip
    return tensors(shape)


def llama_config(o: SynthOptions) -> dict:
    heads = o.heads or max(1, o.hidden // 64)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": o.hidden,
        "intermediate_size": o.intermediate,
        "num_hidden_layers": o.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": o.kv_heads or heads,
        "vocab_size": o.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": str(o.dtype).removeprefix("torch."),
    }


def _generator(seed: int, role: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{role}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _base_tensor(o: SynthOptions, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:  # norm weights start near one
        return 1.0 + 0.05 * torch.randn(shape, generator=_generator(o.seed, "base", name))
    return 0.02 * torch.randn(shape, generator=_generator(o.seed, "base", name))


def _delta(o: SynthOptions, model: int, name: str, like: torch.Tensor) -> torch.Tensor:
    scale = DELTA_SCALE * (0.05 if like.dim() == 1 else 0.02)
    noise = torch.randn(like.shape, generator=_generator(o.seed, f"delta{model}", name))
    return scale * noise


def model_dirs(out: str, o: SynthOptions) -> dict[str, str]:
    """Role -> folder: 'base' (when written) and 'model_1'..'model_K'."""
    roles = (["base"] if o.with_base else []) + [f"model_{k}" for k in range(1, o.models + 1)]
    return {role: os.path.join(out, role) for role in roles}


def synthesize(out: str, o: SynthOptions, progress=None) -> dict[str, str]:
    """Write the checkpoints under `out`; returns role -> folder."""
    if o.models < 1 or o.layers < 1 or min(o.hidden, o.intermediate, o.vocab) < 1:
        raise ConfigError(
            "synth: --models, --layers, --hidden, --intermediate, --vocab must be >= 1"
        )
    dirs = model_dirs(out, o)
    for path in dirs.values():
        if os.path.exists(path) and os.listdir(path):
            raise ConfigError(f"synth: {path} is not empty; choose another OUT folder")
        os.makedirs(path, exist_ok=True)
    writers = {role: _ShardWriter(path, o.shard_size) for role, path in dirs.items()}
    for name, shape in llama_tensors(o):
        base = _base_tensor(o, name, shape)
        if "base" in writers:
            writers["base"].add(name, base.to(o.dtype))
        for k in range(1, o.models + 1):
            writers[f"model_{k}"].add(name, (base + _delta(o, k, name, base)).to(o.dtype))
        if progress is not None:
            progress(base.numel() * o.dtype.itemsize * len(writers))
    config = json.dumps(llama_config(o), indent=2) + "\n"
    for role, writer in writers.items():
        writer.close()
        with open(os.path.join(dirs[role], "config.json"), "w") as f:
            f.write(config)
    return dirs


class _ShardWriter:
    """Buffers tensors up to the shard size, then writes a shard; names them at close."""

    def __init__(self, folder: str, shard_size: int) -> None:
        self.folder = folder
        self.shard_size = shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_size:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        index = len(self.written)
        save_file(self.pending, os.path.join(self.folder, f"shard-{index}.tmp"), {"format": "pt"})
        self.written.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        count = len(self.written)
        weight_map = {}
        for index, names in enumerate(self.written):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(
                os.path.join(self.folder, f"shard-{index}.tmp"), os.path.join(self.folder, final)
            )
            weight_map.update(dict.fromkeys(names, final))
        index_body = {
            "metadata": {"total_size": _total_size(self.folder, weight_map)},
            "weight_map": weight_map,
        }
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index_body, f, indent=2)
            f.write("\n")


def _total_size(folder: str, weight_map: dict[str, str]) -> int:
    from raymerge.safetensors_format import read_header
    from raymerge.storage.local import LocalSource

    source = LocalSource(folder)
    return sum(
        entry.nbytes
        for file in sorted(set(weight_map.values()))
        for entry in read_header(source, file)[0].values()
    )
