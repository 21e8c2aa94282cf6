"""The shape of a Llama-style decoder, read from config.json, and its tensor names.

Torch-free: the driver checks and plans ZipIt from these alone; the worker's forward
(forward.py) computes with them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_ROLES = ("gate_proj", "up_proj", "down_proj")
_NORM_ROLES = ("input_layernorm", "post_attention_layernorm")
ROLES = _NORM_ROLES[:1] + _ATTN_ROLES + _NORM_ROLES[1:] + _MLP_ROLES


# ----------------------------------------------------------------------------- shape


@dataclass(frozen=True)
class LlamaShape:
    """The sizes and constants of a Llama-style decoder that the forward depends on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: tuple | None
    tie_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LlamaShape:
        """Read a config.json dict, refusing anything this forward would compute wrongly."""
        _check_architecture(config)
        hidden = _positive_int(config, "hidden_size")
        heads = _positive_int(config, "num_attention_heads")
        kv_heads = _positive_int(config, "num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                f"({kv_heads}); only grouped-query attention with whole groups is supported."
            )
        theta, scaling = _rope_settings(config)
        return cls(
            hidden=hidden,
            intermediate=_positive_int(config, "intermediate_size"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=_head_dim(config, hidden, heads),
            layers=_positive_int(config, "num_hidden_layers"),
            vocab=_positive_int(config, "vocab_size"),
            rms_eps=_positive_float(config, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON), for stage settings; `from_dict` reverses it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LlamaShape:
        scaling = values.get("rope_scaling")
        scaling = None if scaling is None else tuple(tuple(pair) for pair in scaling)
        return cls(**{**values, "rope_scaling": scaling})

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
            f"{self.heads} heads ({self.kv_heads} KV) of {self.head_dim}, vocab {self.vocab}"
        )

    @property
    def group(self) -> int:
        """How many consecutive query heads share one key/value head."""
        return self.heads // self.kv_heads


def _check_architecture(config: Mapping[str, Any]) -> None:
    """Refuse the config features whose math this forward does not implement."""
    model_type = config.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the ZipIt forward; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(
                f"{key} is true, but the ZipIt forward supports only bias-free Llama "
                f"projections ({key}: false)."
            )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' is.")
    window = config.get("sliding_window")
    if window is not None:
        raise ValueError(
            f"sliding_window is {window!r}, but the ZipIt forward implements only full causal "
            "attention (sliding_window: null)."
        )


def _positive_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """A required (or defaulted) size: a positive int, not a bool or float."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config key {key} is missing; it must be a positive integer.")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config key {key} is {value!r}; it must be a positive integer.")
    return value


def _positive_float(config: Mapping[str, Any], key: str, default: float) -> float:
    """A positive number, with HF's default when the key is absent or null."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"config key {key} is {value!r}; it must be a positive number.")
    return float(value)


def _head_dim(config: Mapping[str, Any], hidden: int, heads: int) -> int:
    """The explicit head_dim, else hidden // heads; RoPE needs it even."""
    if config.get("head_dim") is not None:
        head_dim = _positive_int(config, "head_dim")
    elif hidden % heads:
        raise ValueError(
            f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and "
            "head_dim is absent; set head_dim explicitly."
        )
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise ValueError(f"head_dim is {head_dim}; rotary embeddings need an even head_dim.")
    return head_dim


def _rope_settings(config: Mapping[str, Any]) -> tuple[float, tuple | None]:
    """rope_theta and the hashable llama3 scaling, from either the legacy keys (rope_theta,
    rope_scaling) or transformers 5's rope_parameters, which holds both."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        key, scaling = "rope_parameters", params
        theta_source = params if params.get("rope_theta") is not None else config
    else:
        key, scaling = "rope_scaling", config.get("rope_scaling")
        theta_source = config
    theta = _positive_float(theta_source, "rope_theta", 10000.0)
    return theta, _rope_scaling(key, scaling)


def _rope_scaling(key: str, scaling: Mapping[str, Any] | None) -> tuple | None:
    """None for plain RoPE, else the llama3 parameters as a sorted tuple of pairs."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"config key {key} is {scaling!r}; it must be null or a dict.")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(
            f"{key} has rope type {kind!r}, which is not supported; supported: "
            "none, 'default', 'llama3'."
        )
    values = {}
    for name in LLAMA3_KEYS:
        value = scaling.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(
                f"{key}.{name} is {value!r}; llama3 rope scaling needs it as a positive number."
            )
        values[name] = float(value)
    if values["high_freq_factor"] <= values["low_freq_factor"]:
        raise ValueError(
            f"{key}.high_freq_factor must be larger than {key}.low_freq_factor for llama3 "
            "rope scaling."
        )
    return (("rope_type", "llama3"), *sorted(values.items()))


# ----------------------------------------------------------------------------- names


def layer_tensor_names(layer: int) -> dict[str, str]:
    """Role -> Hugging Face tensor name for one decoder layer."""
    prefix = f"model.layers.{layer}"
    names = {role: f"{prefix}.{role}.weight" for role in _NORM_ROLES}
    names.update({role: f"{prefix}.self_attn.{role}.weight" for role in _ATTN_ROLES})
    names.update({role: f"{prefix}.mlp.{role}.weight" for role in _MLP_ROLES})
    return {role: names[role] for role in ROLES}


# ----------------------------------------------------------------------------- pieces


LAYER_TENSOR = re.compile(
    r"model\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?"
    r"(input_layernorm|post_attention_layernorm|[qkvo]_proj|gate_proj|up_proj|down_proj)\.weight"
)
MODEL_TENSORS = {EMBED: "embed_tokens", FINAL_NORM: "norm", LM_HEAD: "lm_head"}


def role_of(name: str) -> tuple[int | None, str] | None:
    """(layer or None, role) of a Llama tensor name; None for a name of no known role."""
    if name in MODEL_TENSORS:
        return None, MODEL_TENSORS[name]
    found = LAYER_TENSOR.fullmatch(name)
    if found is None:
        return None
    layer, role = int(found.group(1)), found.group(2)
    return (layer, role) if layer_tensor_names(layer)[role] == name else None
