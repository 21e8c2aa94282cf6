"""Reading a batch file into recipes: mergekit-multi's documents, grids and combinations.

A batch file is first of all mergekit-multi's format: a multi-document YAML, each document a
full merge config with a `name:`; a model that names another recipe reads that recipe's
output, which makes it a later stage. Two compact forms expand one document into several
recipes: `grid:` (every combination of parameter values, keys as dotted paths into the
config) and `combinations:` (every k models out of a list). Each recipe gets a stable,
readable name, and its own output folder OUT_PREFIX/NAME.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any

from raymerge.config import load_documents
from raymerge.errors import ConfigError, shown

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}$")
MAX_RECIPES = 1000
BATCH_KEYS = ("grid", "combinations")


@dataclass(frozen=True)
class Recipe:
    name: str
    config: dict[str, Any]  # a merge config; models naming recipes are not resolved yet
    needs: tuple[str, ...]  # the recipes whose outputs it reads
    stage: int  # 0 for recipes that read only existing models


def load_batch(path: str) -> list[Recipe]:
    """The batch file's recipes in stage order (file order within a stage)."""
    documents = load_documents(path)
    if not documents:
        raise ConfigError(f"{path}: the file is empty; a batch holds one merge config or more")
    recipes: list[tuple[str, dict]] = []
    for number, document in enumerate(documents, 1):
        where = f"{path}: document {number}"
        if not isinstance(document, dict):
            raise ConfigError(f"{where}: must be a merge config (a YAML mapping)")
        recipes += _expand(document, where)
    if len(recipes) > MAX_RECIPES:
        raise ConfigError(f"{path}: expands to {len(recipes)} recipes, more than {MAX_RECIPES}")
    seen: set[str] = set()
    for name, _ in recipes:
        if name in seen:
            raise ConfigError(
                f"{path}: two recipes are named {shown(name)}; give each document its own name:"
            )
        seen.add(name)
    return _order(path, recipes)


def _expand(document: dict, where: str) -> list[tuple[str, dict]]:
    name = document.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(
            f"{where}: needs a `name:` of letters, digits and . _ + = - (at most 128, starting "
            f"with a letter or digit), got {shown(name)}: it names the recipe's output folder"
        )
    config = {k: v for k, v in document.items() if k not in BATCH_KEYS}
    variants: list[tuple[str, dict]] = [(name, config)]
    if "combinations" in document:
        variants = [v for n, c in variants for v in _combinations(n, c, document, where)]
    if "grid" in document:
        variants = [v for n, c in variants for v in _grid(n, c, document["grid"], where)]
    return [(n, {**c, "name": n}) for n, c in variants]


def _combinations(name: str, config: dict, document: dict, where: str) -> list[tuple[str, dict]]:
    """`combinations: {models: [...], k: 2}`: one recipe per k models (in list order), each
    with those as `models:`; names join the models' short names with '+'."""
    spec = document["combinations"]
    if not isinstance(spec, dict) or set(spec) - {"models", "k"} or "models" not in spec:
        raise ConfigError(
            f"{where}: combinations: must be a mapping with models: (a list of model entries) "
            "and k: (how many to merge at once, default 2)"
        )
    if "models" in config:
        raise ConfigError(f"{where}: give models: or combinations:, not both")
    models, k = spec["models"], spec.get("k", 2)
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: combinations.models must be a non-empty list of models")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(models):
        raise ConfigError(
            f"{where}: combinations.k must be an integer from 1 to {len(models)}, got {shown(k)}"
        )
    shorts = [_short_name(m, f"{where}: combinations.models[{i}]") for i, m in enumerate(models)]
    if len(set(shorts)) < len(shorts):
        shorts = [str(i) for i in range(len(models))]  # ambiguous names: positions instead
    return [
        (f"{name}-" + "+".join(shorts[i] for i in chosen),
         {**config, "models": [copy.deepcopy(models[i]) for i in chosen]})
        for chosen in itertools.combinations(range(len(models)), k)
    ]  # fmt: skip


def _short_name(entry: Any, where: str) -> str:
    model = entry.get("model") if isinstance(entry, dict) else entry
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"{where}: must be a model path or a mapping with model:")
    last = model.rstrip("/").rsplit("/", 1)[-1].rsplit("@", 1)[0]
    short = re.sub(r"[^A-Za-z0-9._=-]+", "_", last).strip("._") or "model"
    return short[:40]


def _grid(name: str, config: dict, grid: Any, where: str) -> list[tuple[str, dict]]:
    """`grid: {parameters.weight: [0.3, 0.5]}`: one recipe per combination of values, set at
    each dotted path (a list position is a number: models.1.parameters.weight); names add
    `LEAF=VALUE` per key."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(
            f"{where}: grid: must map dotted paths to lists of values, e.g. "
            "{parameters.weight: [0.3, 0.5]}"
        )
    for path, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{path} must be a non-empty list of values")
    variants = []
    for values in itertools.product(*grid.values()):
        variant = copy.deepcopy(config)
        label = []
        for path, value in zip(grid, values):
            _set_path(variant, path, value, f"{where}: grid.{path}")
            label.append(f"{path.rsplit('.', 1)[-1]}={_value_label(value)}")
        variants.append((f"{name}-" + "-".join(label), variant))
    return variants


def _set_path(config: dict, path: str, value: Any, where: str) -> None:
    keys = path.split(".")
    node: Any = config
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(
                    f"{where}: {shown(key)} is not a position in a list of {len(node)}"
                )
            index = int(key)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"{where}: {shown(key)} lies inside {shown(node)}, not a mapping")


def _value_label(value: Any) -> str:
    text = str(value) if not isinstance(value, float) else f"{value:g}"
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return label[:32] or "x"


def _order(path: str, recipes: list[tuple[str, dict]]) -> list[Recipe]:
    """Stages from the models that name recipes; refuses cycles."""
    names = {name for name, _ in recipes}
    needs = {name: tuple(sorted(set(model_refs(config)) & names - {name}))
             for name, config in recipes}  # fmt: skip
    for name, config in recipes:
        if name in model_refs(config):
            raise ConfigError(f"{path}: recipe {shown(name)} names itself as a model")
    stage: dict[str, int] = {}
    while len(stage) < len(recipes):
        ready = [n for n, _ in recipes if n not in stage and all(d in stage for d in needs[n])]
        if not ready:
            waiting = sorted(n for n, _ in recipes if n not in stage)
            raise ConfigError(
                f"{path}: recipes {', '.join(map(shown, waiting))} name each other in a cycle; "
                "a recipe can only read recipes that do not read it"
            )
        for name in ready:
            stage[name] = 1 + max((stage[d] for d in needs[name]), default=-1)
    ordered = sorted(range(len(recipes)), key=lambda i: (stage[recipes[i][0]], i))
    return [Recipe(recipes[i][0], recipes[i][1], needs[recipes[i][0]], stage[recipes[i][0]])
            for i in ordered]  # fmt: skip


def model_refs(config: dict) -> list[str]:
    """Every model a config names: base_model, models[].model, slices[].sources[].model,
    tokenizer_source and the tokenizer block's sources."""
    keyword = ("base", "union")  # tokenizer sources that name no model
    refs = [config.get("base_model")]
    if config.get("tokenizer_source") not in keyword:
        refs.append(config.get("tokenizer_source"))
    for entry in config.get("models") or []:
        refs.append(entry.get("model") if isinstance(entry, dict) else entry)
    for out_slice in config.get("slices") or []:
        for source in (out_slice.get("sources") or []) if isinstance(out_slice, dict) else []:
            refs.append(source.get("model") if isinstance(source, dict) else None)
    tokenizer = config.get("tokenizer")
    if isinstance(tokenizer, dict) and tokenizer.get("source") not in keyword:
        refs.append(tokenizer.get("source"))
    if isinstance(tokenizer, dict):
        for entry in _token_entries(tokenizer):
            source = entry.get("source") if isinstance(entry, dict) else None
            refs.append(source.get("model") if isinstance(source, dict) else source)
    return [r for r in refs if isinstance(r, str)]


def _token_entries(tokenizer: dict) -> list:
    tokens = tokenizer.get("tokens")
    return list(tokens.values()) if isinstance(tokens, dict) else []


def with_outputs(config: dict, outputs: dict[str, str]) -> dict:
    """`config` with each model that names a recipe replaced by that recipe's output
    (models, base_model, slices' sources, tokenizer_source and the tokenizer block's)."""
    config = copy.deepcopy(config)

    def swap(holder: dict, key: str) -> None:
        value = holder.get(key)
        if isinstance(value, str) and value in outputs:
            holder[key] = outputs[value]

    swap(config, "base_model")
    if config.get("tokenizer_source") not in ("base", "union"):
        swap(config, "tokenizer_source")
    models = config.get("models") or []
    for i, entry in enumerate(models):
        if isinstance(entry, dict):
            swap(entry, "model")
        elif isinstance(entry, str) and entry in outputs:
            models[i] = outputs[entry]
    for out_slice in config.get("slices") or []:
        for source in (out_slice.get("sources") or []) if isinstance(out_slice, dict) else []:
            if isinstance(source, dict):
                swap(source, "model")
    tokenizer = config.get("tokenizer")
    if isinstance(tokenizer, dict):
        if tokenizer.get("source") not in ("base", "union"):
            swap(tokenizer, "source")
        for entry in _token_entries(tokenizer):
            if isinstance(entry, dict):
                swap(entry, "source")
                if isinstance(entry.get("source"), dict):
                    swap(entry["source"], "model")
    return config
