"""What a merge method is: a pure function of one tensor's inputs, plus its parameters as data.

Methods declare their parameters (name, type, scope, default, range) so a config can be
checked completely before any weight is read, and so the planner can resolve each tensor's
values up front. Scopes follow mergekit: `shared` values are global (top-level
`parameters`), `input` values belong to every input model, `non_base` to every input but the
base.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

REQUIRED = object()
# elements per chunk where CPU work goes chunk by chunk: a chunk's fp32 scratch stays in cache
CPU_CHUNK = 1 << 16
Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    scope: Scope
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, where: str) -> Any:
        """Coerce a config value to this parameter's type; ValueError names `where`."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError(f"{where}: {value!r} is not a boolean (true/false)")
        if self.type is str:
            if isinstance(value, str) and (self.choices is None or value in self.choices):
                return value
            raise ValueError(f"{where}: {value!r} is not one of {list(self.choices or [])}")
        number = _as_number(value)
        if number is None or not math.isfinite(number):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        if self.type is int:
            if number != int(number):
                raise ValueError(f"{where}: {value!r} is not an integer")
            number = int(number)
        if (
            self.low is not None
            and number < self.low
            or self.high is not None
            and number > self.high
        ):
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            raise ValueError(f"{where}: {value!r} is outside [{low}, {high}]")
        return number


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if isinstance(value, float) else value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass
class MergeInputs:
    """One output tensor's inputs, in config order, as read (any dtype, on the work device)."""

    name: str
    tensors: list[torch.Tensor]
    base_index: int | None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    seed: int = 0

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    def task_vectors(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base and every other input's x_i - base, in the compute dtype (new tensors)."""
        dtype = compute_dtype(self.base)
        base = self.base.to(dtype)
        return base, [tensor.to(dtype) - base for _, tensor, _ in self.others()]

    def others(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """The non-base inputs as (position among the inputs, tensor, parameters)."""
        return [
            (i, t, p)
            for i, (t, p) in enumerate(zip(self.tensors, self.per_input))
            if i != self.base_index
        ]


MergeFn = Callable[[MergeInputs], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: MergeFn
    params: tuple[Param, ...]
    base: BasePolicy = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    summary: str = ""
    # True when each output element depends only on the same element of the inputs: workers
    # then merge in cache-sized chunks, which is several times faster on CPUs
    elementwise: bool = False
    # a check of one tensor's resolved parameters, run at plan time: returns a problem or None
    check: Callable[[dict[str, Any], list[dict[str, Any]]], str | None] | None = field(default=None)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else is merged in fp32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
