"""Named model architectures: the tensor names and shapes of real checkpoints, without files.

`tensors(layout)` lists a Hugging Face Llama checkpoint's tensors (names as `save_pretrained`
writes them, real shapes); `scale` divides every width (hidden, intermediate, vocabulary,
head dimension) and keeps the names and the number of tensors, so a merge of thousands of
tiny tensors schedules like the real one. `layers` replaces the layer count (more tensors of
the same kinds). `virtual_config` turns a mergekit config's model references into
`virtual://LAYOUT/MODEL` sources (storage/virtual.py), so a merge can be planned or run for a
real architecture with no checkpoint on disk.

This module never imports torch: the driver uses it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from raymerge.errors import ConfigError, shown


@dataclass(frozen=True)
class Layout:
    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)

    def scaled(self, scale: int = 1, layers: int | None = None) -> Layout:
        """Widths divided by `scale` (at least 1 each; powers of two up to 128 keep every
        ratio of the real model exact), the layer count replaced by `layers`."""
        scale = check_scale(scale)
        valid = isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1
        if layers is not None and not valid:
            raise ConfigError(f"layers: {shown(layers)} must be a positive integer")

        def div(width: int) -> int:
            return max(1, width // scale)

        return Layout(
            self.name, layers or self.layers, div(self.hidden), div(self.intermediate),
            div(self.vocab), self.heads, self.kv_heads, div(self.head_dim),
            self.max_position_embeddings, self.rope_theta, self.rms_norm_eps,
            self.tie_word_embeddings, dict(self.extra_config),
        )  # fmt: skip


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama3(name: str, layers: int, hidden: int, intermediate: int, heads: int, **more) -> Layout:
    """A Llama 3 model: 128256-token vocabulary, 8 KV heads of 128 dimensions, untied head."""
    return Layout(name, layers, hidden, intermediate, 128256, heads, 8, 128, **more)


LAYOUTS: dict[str, Layout] = {
    "llama-3-8b": _llama3("llama-3-8b", 32, 4096, 14336, 32),
    "llama-3-70b": _llama3("llama-3-70b", 80, 8192, 28672, 64),
    "llama-3.1-405b": _llama3(
        "llama-3.1-405b",
        126,
        16384,
        53248,
        128,
        max_position_embeddings=131072,
        extra_config={"rope_scaling": _LLAMA3_ROPE},
    ),
}


def check_scale(scale: Any) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"scale: {shown(scale)} must be a positive integer (widths / scale)")
    return scale


def get_layout(name: str) -> Layout:
    layout = LAYOUTS.get(name)
    if layout is None:
        raise ConfigError(f"layout {shown(name)} is not known; known layouts: {', '.join(LAYOUTS)}")
    return layout


def _resolve(layout: Layout | str, scale: int, layers: int | None) -> Layout:
    base = get_layout(layout) if isinstance(layout, str) else layout
    return base.scaled(scale, layers)


def tensors(
    layout: Layout | str, scale: int = 1, layers: int | None = None
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the layout's checkpoint, in the order `save_pretrained` uses
    (the same names and order as synth.llama_tensors)."""
    o = _resolve(layout, scale, layers)
    q_rows, kv_rows = o.heads * o.head_dim, o.kv_heads * o.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (o.vocab, o.hidden))]
    for i in range(o.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (o.hidden,)),
            (p + "self_attn.q_proj.weight", (q_rows, o.hidden)),
            (p + "self_attn.k_proj.weight", (kv_rows, o.hidden)),
            (p + "self_attn.v_proj.weight", (kv_rows, o.hidden)),
            (p + "self_attn.o_proj.weight", (o.hidden, q_rows)),
            (p + "post_attention_layernorm.weight", (o.hidden,)),
            (p + "mlp.gate_proj.weight", (o.intermediate, o.hidden)),
            (p + "mlp.up_proj.weight", (o.intermediate, o.hidden)),
            (p + "mlp.down_proj.weight", (o.hidden, o.intermediate)),
        ]
    out.append(("model.norm.weight", (o.hidden,)))
    if not o.tie_word_embeddings:
        out.append(("lm_head.weight", (o.vocab, o.hidden)))
    return out


def parameter_count(layout: Layout | str, scale: int = 1, layers: int | None = None) -> int:
    return sum(math.prod(shape) for _, shape in tensors(layout, scale, layers))


def config(
    layout: Layout | str, scale: int = 1, layers: int | None = None, dtype: str = "bfloat16"
) -> dict[str, Any]:
    """The checkpoint's config.json (LlamaForCausalLM) for these widths."""
    o = _resolve(layout, scale, layers)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": o.hidden,
        "intermediate_size": o.intermediate,
        "num_hidden_layers": o.layers,
        "num_attention_heads": o.heads,
        "num_key_value_heads": o.kv_heads,
        "head_dim": o.head_dim,
        "vocab_size": o.vocab,
        "max_position_embeddings": o.max_position_embeddings,
        "rms_norm_eps": o.rms_norm_eps,
        "rope_theta": o.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "tie_word_embeddings": o.tie_word_embeddings,
        "torch_dtype": dtype,
        **o.extra_config,
    }


# --- configs of virtual models ---------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._~/-]")


def virtual_uri(layout: str, model: str, scale: int = 1, **options: Any) -> str:
    """`virtual://LAYOUT/MODEL?scale=N...` for a model reference of a config (the reference
    percent-quoted, slashes kept, so different references give different models)."""
    get_layout(layout)
    name = quote(model.strip().strip("/"), safe="/") or "model"
    query = {"scale": scale, **{k: v for k, v in options.items() if v is not None}}
    return f"virtual://{layout}/{name}?" + "&".join(f"{k}={v}" for k, v in query.items())


def virtual_config(data: Any, layout: str, scale: int = 1, **options: Any) -> Any:
    """A parsed mergekit config with every model reference (base_model, models[].model,
    slices[].sources[].model, slices[].base_model, a tokenizer_source path) replaced by a
    virtual model of `layout`; anything else is left for the config checks to judge."""
    get_layout(layout)
    check_scale(scale)

    def swap(ref: Any) -> Any:
        if isinstance(ref, str) and ref.strip() and not ref.startswith("virtual://"):
            return virtual_uri(layout, ref, scale, **options)
        return ref

    def swap_entry(entry: Any) -> Any:
        if isinstance(entry, str):
            return swap(entry)
        if isinstance(entry, dict) and "model" in entry:
            return {**entry, "model": swap(entry["model"])}
        return entry

    if not isinstance(data, dict):
        return data
    data = dict(data)
    if "base_model" in data:
        data["base_model"] = swap(data["base_model"])
    if isinstance(data.get("models"), list):
        data["models"] = [swap_entry(e) for e in data["models"]]
    if isinstance(data.get("slices"), list):
        slices = []
        for entry in data["slices"]:
            if isinstance(entry, dict):
                entry = dict(entry)
                if "base_model" in entry:
                    entry["base_model"] = swap(entry["base_model"])
                if isinstance(entry.get("sources"), list):
                    entry["sources"] = [swap_entry(s) for s in entry["sources"]]
            slices.append(entry)
        data["slices"] = slices
    source = data.get("tokenizer_source")
    if isinstance(source, str) and source not in ("base", "union"):
        data["tokenizer_source"] = swap(source)
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("source"), str):
        if tokenizer["source"] not in ("base", "union"):
            data["tokenizer"] = {**tokenizer, "source": swap(tokenizer["source"])}
    return data
