"""Safetensors dtype names, their torch dtypes and sizes, and config dtype aliases."""

from __future__ import annotations

import torch

from raymerge.errors import ConfigError

# safetensors dtype name -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F64": (torch.float64, 8),
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})

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
    return SAFETENSORS_DTYPES[name][0]


def itemsize(name: str) -> int:
    return SAFETENSORS_DTYPES[name][1]


def parse_config_dtype(value: object, where: str) -> str:
    """Map a config dtype ('bfloat16', 'float16', ...) to its safetensors name."""
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in CONFIG_DTYPE_ALIASES:
            return CONFIG_DTYPE_ALIASES[key]
    allowed = ", ".join(sorted({k for k in CONFIG_DTYPE_ALIASES if k.endswith(("16", "32", "64"))}))
    raise ConfigError(f"{where}: unknown dtype {value!r}; allowed: {allowed}")
