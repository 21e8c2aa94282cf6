"""torch, imported on first use.

The driver declares, checks and plans a merge with the method modules but never runs a
kernel, so it should not pay torch's import (about a second, and hundreds of MB); workers
touch `torch.<anything>` and get the real module.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later lookups skip this method
        return getattr(module, name)


torch: Any = _LazyModule("torch")
