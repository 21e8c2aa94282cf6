"""The docs name what the code has: every method, every command, every config key."""

from __future__ import annotations

from pathlib import Path

from raymerge.cli import main
from raymerge.config import RAYMERGE_KEYS, TOP_LEVEL_KEYS
from raymerge.methods import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def test_every_method_has_a_row_in_methods_md():
    text = (ROOT / "docs" / "methods.md").read_text()
    missing = [name for name in REGISTRY if f"| `{name}` |" not in text]
    assert not missing, f"docs/methods.md lacks rows for {missing}"


def test_every_method_parameter_is_documented():
    text = (ROOT / "docs" / "methods.md").read_text()
    names = {p.name for m in REGISTRY.values() for p in m.params}
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/methods.md never mentions {missing}"


def test_every_command_is_in_the_readme():
    text = (ROOT / "README.md").read_text()
    missing = [name for name in main.commands if f"raymerge {name}" not in text]
    assert not missing, f"README.md does not show {missing}"


def test_every_config_key_is_in_configs_md():
    text = (ROOT / "docs" / "configs.md").read_text()
    keys = TOP_LEVEL_KEYS | {f"raymerge.{k}" for k in RAYMERGE_KEYS}
    missing = sorted(k for k in keys if f"`{k}`" not in text and f"{k}:" not in text)
    assert not missing, f"docs/configs.md does not document {missing}"
