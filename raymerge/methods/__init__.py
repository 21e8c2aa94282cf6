"""The registry of merge methods: a plain dict from name to `MergeMethod`."""

from __future__ import annotations

from raymerge.errors import ConfigError
from raymerge.methods import linear, task_arithmetic, ties
from raymerge.methods.base import MergeInputs, MergeMethod, Param

REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> None:
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    REGISTRY[method.name] = method


def get_method(name: object, where: str = "merge_method") -> MergeMethod:
    if isinstance(name, str) and name in REGISTRY:
        return REGISTRY[name]
    raise ConfigError(
        f"{where}: unknown merge method {name!r}; available: {', '.join(sorted(REGISTRY))}"
    )


for _method in (linear.METHOD, task_arithmetic.TASK_ARITHMETIC, ties.METHOD):
    register(_method)

__all__ = ["REGISTRY", "MergeInputs", "MergeMethod", "Param", "get_method", "register"]
