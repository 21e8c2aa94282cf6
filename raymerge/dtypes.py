"""Safetensors dtype names, their torch dtypes and sizes, and config dtype aliases."""

from __future__ import annotations

from raymerge.errors import ConfigError, shown
from raymerge.lazy import torch

# safetensors dtype name -> (torch dtype's name, bytes per element); names, not torch
# objects, so the driver never imports torch
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
# FP8 weights come with per-block scale tensors; merging them without those is wrong
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})

# names a config or the CLI may use for an output dtype (mergekit's spelling first)
CONFIG_DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float64": "F64",
    "fp64": "F64",
}


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, SAFETENSORS_DTYPES[name][0])


def itemsize(name: str) -> int:
    return SAFETENSORS_DTYPES[name][1]


def parse_config_dtype(value: object, where: str) -> str:
    """Map a config dtype ('bfloat16', 'float16', ...) to its safetensors name."""
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in CONFIG_DTYPE_ALIASES:
            return CONFIG_DTYPE_ALIASES[key]
    allowed = ", ".join(sorted({k for k in CONFIG_DTYPE_ALIASES if k.endswith(("16", "32", "64"))}))
    raise ConfigError(f"{where}: unknown dtype {shown(value)}; allowed: {allowed}")
