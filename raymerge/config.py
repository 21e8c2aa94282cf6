"""The merge spec: mergekit's YAML, checked completely before anything is read.

Every problem in a config is collected and reported at once, each with its YAML path, the bad
value and what is allowed. Unknown keys are errors (mergekit silently ignores them, so a
top-level `normalize: true` there does nothing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from raymerge.dtypes import parse_config_dtype
from raymerge.errors import ConfigError
from raymerge.methods import REGISTRY, get_method
from raymerge.methods.base import MergeMethod, Param
from raymerge.params import check_setting, evaluate
from raymerge.sizes import parse_size

TOP_LEVEL_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
    "raymerge",
}
RAYMERGE_KEYS = {"seed", "shard_size", "part_size"}
DEFAULT_SHARD_SIZE = 5 * 10**9
DEFAULT_PART_SIZE = 64 * 2**20


@dataclass(frozen=True)
class InputModel:
    """One input checkpoint: where it is, how the config named it, its own parameters."""

    path: str
    given: str
    parameters: dict[str, Any] = field(default_factory=dict)
    yaml_path: str = ""


@dataclass(frozen=True)
class MergeSpec:
    method: MergeMethod
    inputs: tuple[InputModel, ...]
    base_index: int | None
    parameters: dict[str, Any]
    out_dtype: str | None = None
    tokenizer_source: int | None = None  # index of the input whose tokenizer is copied
    seed: int = 0
    shard_size: int = DEFAULT_SHARD_SIZE
    part_size: int = DEFAULT_PART_SIZE
    source: str = "<config>"
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A canonical description of the merge, for hashing and the run record."""
        return {
            "merge_method": self.method.name,
            "inputs": [{"path": m.path, "parameters": m.parameters} for m in self.inputs],
            "base_index": self.base_index,
            "parameters": self.parameters,
            "out_dtype": self.out_dtype,
            "seed": self.seed,
        }

    def resolve(self, tensor_name: str, t: float, present: list[int]) -> tuple[dict, list[dict]]:
        """Parameter values for one tensor: (shared, one dict per present input).

        Precedence as in mergekit: the model's own setting, then the global one, then the
        method's default. A filter that matches nothing falls through to the next level.
        """
        shared = {
            p.name: self._value(p, [self.parameters], tensor_name, t, "parameters")
            for p in self.method.params
            if p.scope == "shared"
        }
        per_input = []
        for i in present:
            model = self.inputs[i]
            values = {}
            for p in self.method.params:
                if p.scope == "shared" or (p.scope == "non_base" and i == self.base_index):
                    continue
                values[p.name] = self._value(
                    p, [model.parameters, self.parameters], tensor_name, t, model.yaml_path
                )
            per_input.append(values)
        return shared, per_input

    def _value(self, p: Param, levels: list[dict], tensor_name: str, t: float, where: str) -> Any:
        for level in levels:
            if p.name in level:
                value = evaluate(level[p.name], tensor_name, t, p.validate, f"{where}.{p.name}")
                if value is not None:
                    return value
        if p.required:
            raise ConfigError(
                f"{self.source}: no value of {p.name!r} applies to tensor {tensor_name!r} "
                f"({where}); add a setting without a filter as a fallback"
            )
        return p.default


def load_spec(path: str, overrides: dict[str, Any] | None = None) -> MergeSpec:
    """Read and check a YAML config file; relative model paths are tried against the current
    folder, then the config's folder."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}") from None
    return parse_spec(data, path, os.path.dirname(os.path.abspath(path)), overrides or {})


def parse_spec(
    data: Any, source: str, config_dir: str, overrides: dict[str, Any] | None = None
) -> MergeSpec:
    overrides = overrides or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the config must be a YAML mapping (merge_method, models, ...)"
        )
    errors: list[str] = []
    warnings: list[str] = []
    _check_top_level_keys(data, errors)
    if "merge_method" not in data:
        errors.append(f"merge_method: missing; one of {', '.join(sorted(REGISTRY))}")
        method = None
    else:
        try:
            method = get_method(data["merge_method"])
        except ConfigError as exc:
            errors.append(str(exc))
            method = None

    inputs, base_index = _parse_models(data, method, config_dir, errors)
    parameters = _parse_global_parameters(data.get("parameters"), method, errors)
    if method is not None:
        _check_inputs_against_method(method, inputs, base_index, parameters, errors)
        _check_constant_params(method, inputs, base_index, parameters, errors)
    out_dtype = _parse_dtypes(data, overrides, errors)
    tokenizer_source = _parse_tokenizer(data, inputs, base_index, config_dir, errors, warnings)
    if "chat_template" in data:
        warnings.append(
            "chat_template: not applied by raymerge; the tokenizer files are copied as is"
        )
    options = _parse_raymerge_section(data.get("raymerge"), overrides, errors)

    if errors:
        raise ConfigError(_format_errors(source, errors))
    assert method is not None
    return MergeSpec(
        method=method,
        inputs=tuple(inputs),
        base_index=base_index,
        parameters=parameters,
        out_dtype=out_dtype,
        tokenizer_source=tokenizer_source,
        source=source,
        warnings=tuple(warnings),
        **options,
    )


def _format_errors(source: str, errors: list[str]) -> str:
    if len(errors) == 1:
        return f"{source}: {errors[0]}"
    return f"{source}: {len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors)


def _check_top_level_keys(data: dict, errors: list[str]) -> None:
    for key in data:
        if key in TOP_LEVEL_KEYS:
            continue
        hint = ""
        if any(key in (p.name for p in m.params) for m in REGISTRY.values()):
            hint = f"; method parameters go under `parameters:` (parameters.{key})"
        elif key == "modules":
            hint = "; multi-module configs are not supported yet: use `models:`"
        errors.append(
            f"{key}: unknown top-level key{hint}; allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    if "slices" in data:
        errors.append("slices: not supported yet; list whole models under `models:`")


def _parse_models(
    data: dict, method: MergeMethod | None, config_dir: str, errors: list[str]
) -> tuple[list[InputModel], int | None]:
    raw_models = data.get("models")
    inputs: list[InputModel] = []
    if raw_models is None:
        if "slices" not in data:
            errors.append("models: missing; list the input models as `- model: PATH`")
    elif not isinstance(raw_models, list) or not raw_models:
        errors.append("models: must be a non-empty list of `- model: PATH` entries")
    else:
        for i, entry in enumerate(raw_models):
            model = _parse_model_entry(entry, f"models[{i}]", method, config_dir, errors)
            if model is not None:
                inputs.append(model)
    seen: dict[str, str] = {}
    for model in inputs:
        if model.path in seen:
            errors.append(
                f"{model.yaml_path}: {model.given!r} is listed twice (also {seen[model.path]})"
            )
        seen[model.path] = model.yaml_path

    base_index = None
    if data.get("base_model") is not None:
        base_path = _resolve_path(data["base_model"], "base_model", config_dir, errors)
        if base_path is not None:
            matches = [i for i, m in enumerate(inputs) if m.path == base_path]
            if matches:
                base_index = matches[0]
            else:
                inputs.append(InputModel(base_path, str(data["base_model"]), {}, "base_model"))
                base_index = len(inputs) - 1
    return inputs, base_index


def _parse_model_entry(
    entry: Any, where: str, method: MergeMethod | None, config_dir: str, errors: list[str]
) -> InputModel | None:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict):
        errors.append(f"{where}: must be a mapping with `model:` (and optional `parameters:`)")
        return None
    unknown = sorted(set(entry) - {"model", "parameters"})
    if unknown:
        errors.append(f"{where}: unknown key(s) {unknown}; allowed: model, parameters")
    if "model" not in entry:
        errors.append(f"{where}.model: missing")
        return None
    path = _resolve_path(entry["model"], f"{where}.model", config_dir, errors)
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        errors.append(f"{where}.parameters: must be a mapping of parameter names to values")
        params = {}
    if method is not None:
        for name, setting in params.items():
            p = method.param(name)
            if p is None:
                errors.append(f"{where}.parameters.{name}: {_unknown_param(method, name)}")
            elif p.scope == "shared":
                errors.append(
                    f"{where}.parameters.{name}: {name!r} is a global parameter of "
                    f"{method.name}; move it to the top-level `parameters:`"
                )
            else:
                check_setting(setting, f"{where}.parameters.{name}", p.validate, errors)
    if path is None:
        return None
    return InputModel(path, str(entry["model"]), dict(params), where)


def _resolve_path(ref: Any, where: str, config_dir: str, errors: list[str]) -> str | None:
    if not isinstance(ref, str) or not ref.strip():
        errors.append(
            f"{where}: {ref!r} must be a path to a checkpoint folder or .safetensors file"
        )
        return None
    if "+" in ref and not os.path.exists(ref):
        errors.append(
            f"{where}: {ref!r}: LoRA adapters (model+lora) are not supported yet; "
            "merge the adapter into its model first"
        )
        return None
    expanded = os.path.expanduser(ref)
    candidates = (
        [expanded] if os.path.isabs(expanded) else [expanded, os.path.join(config_dir, expanded)]
    )
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    looked = " or ".join(repr(os.path.abspath(c)) for c in candidates)
    errors.append(
        f"{where}: {ref!r} not found (looked for {looked}); raymerge reads local checkpoint "
        "folders and .safetensors files (download hub models first, e.g. with "
        "`huggingface-cli download`)"
    )
    return None


def _unknown_param(method: MergeMethod, name: str) -> str:
    allowed = ", ".join(p.name for p in method.params) or "none"
    return f"unknown parameter {name!r} for {method.name}; its parameters: {allowed}"


def _parse_global_parameters(raw: Any, method: MergeMethod | None, errors: list[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append("parameters: must be a mapping of parameter names to values")
        return {}
    if method is not None:
        for name, setting in raw.items():
            p = method.param(name)
            if p is None:
                errors.append(f"parameters.{name}: {_unknown_param(method, name)}")
            else:
                check_setting(setting, f"parameters.{name}", p.validate, errors)
    return dict(raw)


def _check_inputs_against_method(
    method: MergeMethod,
    inputs: list[InputModel],
    base_index: int | None,
    parameters: dict,
    errors: list[str],
) -> None:
    if method.base == "required" and base_index is None:
        errors.append(f"base_model: {method.name} needs a base model (task vectors are x_i - base)")
    count = len(inputs)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        wanted = (
            f"exactly {method.min_inputs}"
            if method.min_inputs == method.max_inputs
            else f"at least {method.min_inputs}"
            if method.max_inputs is None
            else f"{method.min_inputs} to {method.max_inputs}"
        )
        errors.append(
            f"models: {method.name} takes {wanted} input models (base included); got {count}"
        )
    for i, model in enumerate(inputs):
        for p in method.params:
            if not p.required or p.scope == "shared" or (p.scope == "non_base" and i == base_index):
                continue
            if p.name not in model.parameters and p.name not in parameters:
                fix = (
                    f"set {model.yaml_path}.parameters.{p.name}"
                    if model.yaml_path != "base_model"
                    else f"list the base model under `models:` with parameters.{p.name}"
                )
                errors.append(
                    f"{model.yaml_path}: {method.name} needs {p.name!r} for {model.given!r}; "
                    f"{fix}, or a default in the top-level parameters.{p.name}"
                )


def _check_constant_params(
    method: MergeMethod,
    inputs: list[InputModel],
    base_index: int | None,
    parameters: dict,
    errors: list[str],
) -> None:
    """Run the method's own check once on values that do not vary by tensor."""
    if method.check is None:
        return
    constant = all(
        not isinstance(v, list | dict)
        for level in [parameters] + [m.parameters for m in inputs]
        for v in level.values()
    )
    if not constant:
        return  # checked per tensor at plan time
    try:
        spec = MergeSpec(method, tuple(inputs), base_index, parameters)
        shared, per_input = spec.resolve("", 0.0, list(range(len(inputs))))
    except (ConfigError, ValueError):
        return  # reported elsewhere
    problem = method.check(shared, per_input)
    if problem:
        errors.append(f"parameters: {problem}")


def _parse_dtypes(data: dict, overrides: dict[str, Any], errors: list[str]) -> str | None:
    out_dtype = None
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            try:
                value = parse_config_dtype(data[key], key)
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            if key == "out_dtype" or out_dtype is None:
                out_dtype = value
    if overrides.get("dtype") is not None:
        try:
            out_dtype = parse_config_dtype(overrides["dtype"], "--dtype")
        except ConfigError as exc:
            errors.append(str(exc))
    return out_dtype


def _parse_tokenizer(
    data: dict,
    inputs: list[InputModel],
    base_index: int | None,
    config_dir: str,
    errors: list[str],
    warnings: list[str],
) -> int | None:
    source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if source is not None:
            errors.append("tokenizer: give either tokenizer_source or tokenizer, not both")
        if not isinstance(tokenizer, dict) or set(tokenizer) - {"source"}:
            errors.append("tokenizer: only `tokenizer: {source: ...}` is supported yet")
            return None
        source = tokenizer.get("source")
    if source is None:
        return base_index if base_index is not None else (0 if inputs else None)
    if source == "base":
        if base_index is None:
            errors.append("tokenizer_source: 'base' needs a base_model")
        return base_index
    if source == "union":
        errors.append("tokenizer_source: 'union' is not supported yet; use 'base' or a model path")
        return None
    path = _resolve_path(source, "tokenizer_source", config_dir, errors)
    for i, model in enumerate(inputs):
        if model.path == path:
            return i
    if path is not None:
        errors.append("tokenizer_source: must be `base` or one of the input models")
    return None


def _parse_raymerge_section(raw: Any, overrides: dict[str, Any], errors: list[str]) -> dict:
    section = {}
    if raw is not None:
        if not isinstance(raw, dict):
            errors.append("raymerge: must be a mapping (seed, shard_size, part_size)")
        else:
            for key in sorted(set(raw) - RAYMERGE_KEYS):
                errors.append(
                    f"raymerge.{key}: unknown key; allowed: {', '.join(sorted(RAYMERGE_KEYS))}"
                )
            section = {k: v for k, v in raw.items() if k in RAYMERGE_KEYS}
    section.update({k: v for k, v in overrides.items() if k in RAYMERGE_KEYS and v is not None})
    options: dict[str, Any] = {}
    seed = section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        errors.append(f"raymerge.seed: {seed!r} must be a non-negative integer")
    else:
        options["seed"] = seed
    for key in ("shard_size", "part_size"):
        if key in section:
            try:
                options[key] = parse_size(section[key], f"raymerge.{key}")
            except ConfigError as exc:
                errors.append(str(exc))
    return options


def spec_digest_text(spec: MergeSpec) -> str:
    return json.dumps(spec.to_json(), sort_keys=True, separators=(",", ":"))
