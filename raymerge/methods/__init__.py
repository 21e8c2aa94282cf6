"""The registry of merge methods: a plain dict from name to `MergeMethod`.

Every module in this package that defines `METHODS` (a tuple of `MergeMethod`) is
registered, so adding a method is adding one module.
"""

from __future__ import annotations

import importlib
import pkgutil

from raymerge.errors import ConfigError
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


def _discover() -> None:
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for method in getattr(module, "METHODS", ()):
            register(method)


_discover()

__all__ = ["REGISTRY", "MergeInputs", "MergeMethod", "Param", "get_method", "register"]
