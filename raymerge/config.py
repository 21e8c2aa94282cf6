"""Reading mergekit's YAML into a MergeSpec, checked completely before anything is read.

Every problem in a config is collected and reported at once, each with its YAML path, the bad
value and what is allowed. Unknown keys are errors (mergekit silently ignores them, so a
top-level `normalize: true` there does nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import yaml

from raymerge.dtypes import parse_config_dtype
from raymerge.errors import ConfigError, RaymergeError, shown
from raymerge.methods import REGISTRY, get_method
from raymerge.methods.base import MergeMethod
from raymerge.params import check_setting
from raymerge.sizes import parse_size
from raymerge.spec import InputModel, MergeSpec, OutputSlice, SliceSource, TokenSource, VocabSpec
from raymerge.storage import uri_scheme

TOP_LEVEL_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "raymerge",
}  # fmt: skip
RAYMERGE_KEYS = {"seed", "shard_size", "part_size"}


MAX_CONFIG_BYTES = 1 << 20  # a mergekit config is a few KiB
MAX_YAML_VALUES = 100_000  # after expanding aliases: stops "billion laughs" configs
MAX_MESSAGE_CHARS = 600  # one problem's message, however long the values it quotes
KEY_KINDS = {
    "int": "an integer", "float": "a number", "bool": "a boolean", "null": "null",
    "timestamp": "a date",
}  # fmt: skip


def load_spec(path: str, overrides: dict[str, Any] | None = None) -> MergeSpec:
    """Read and check a YAML config file; relative model paths are tried against the current
    folder, then the config's folder."""
    data = _load_yaml(path)
    return parse_spec(data, path, os.path.dirname(os.path.abspath(path)), overrides or {})


def _load_yaml(path: str) -> Any:
    """The config's one YAML document: string keys only, no duplicates, bounded size."""
    return load_documents(path, single=True)[0]


def load_documents(path: str, single: bool = False) -> list[Any]:
    """The file's YAML documents (one, with `single`), each checked as `_load_yaml` checks
    a config."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {shown(path)} does not exist") from None
    except OSError as exc:
        raise ConfigError(
            f"config file {shown(path)} cannot be read ({exc.strerror or exc}); give a YAML file"
        ) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: more than {MAX_CONFIG_BYTES} bytes, too large for a merge config; "
            "is it the right file?"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); a config is a "
            "YAML text file"
        ) from None
    if "\x00" in text:
        raise ConfigError(
            f"{path}: holds NUL bytes (first at character {text.index(chr(0))}); a config is a "
            "YAML text file, not a binary one"
        )
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        if not loader.check_node():
            raise ConfigError(
                f"{path}: the file is empty; a config is a YAML mapping with merge_method and "
                "models: or slices: (see docs/configs.md)"
            )
        documents = []
        while loader.check_node():
            if single and documents:
                line = loader.peek_event().start_mark.line + 1
                raise ConfigError(
                    f"{path}: holds more than one YAML document (another starts at line "
                    f"{line}, after '---'); put each merge in its own config file, or run "
                    "several with `raymerge batch`"
                )
            node = loader.get_node()
            _check_nodes(node, path)
            documents.append(loader.construct_document(node))
        return documents
    except yaml.reader.ReaderError as exc:
        raise ConfigError(
            f"{path}: character {exc.character!r} at position {exc.position} is not allowed in "
            "YAML; a config is a YAML text file"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {_clip(problem)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply to be a merge config") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of 5000 digits
        problem = _clip(str(exc).split(";")[0])
        raise ConfigError(f"{path}: a value cannot be read ({problem}); fix or remove it") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_nodes(root: yaml.Node, path: str) -> None:
    """Refuse duplicate or non-string keys, recursive aliases and aliases that expand beyond
    MAX_YAML_VALUES values; walks each distinct node once."""
    sizes: dict[int, int] = {}  # node id -> values it expands to
    open_nodes: set[int] = set()

    def at(node: yaml.Node) -> str:
        return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError(
                f"{path}: the alias at {at(node)} refers to a value that contains it (a "
                "recursive structure); write the value out instead"
            )
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, path, at)
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{path}: the YAML expands to more than {MAX_YAML_VALUES} values through "
                    f"its aliases (*name, near {at(node)}); a merge config needs far fewer: "
                    "write it without nested aliases"
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _check_keys(node: yaml.MappingNode, path: str, at: Callable[[yaml.Node], str]) -> None:
    seen: dict[str, yaml.Node] = {}
    for key, _ in node.value:
        if key.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`
        if not isinstance(key, yaml.ScalarNode):
            kind = "list" if isinstance(key, yaml.SequenceNode) else "mapping"
            raise ConfigError(
                f"{path}: a {kind} is used as a key at {at(key)}; config keys are names like "
                "merge_method or models"
            )
        if key.tag != "tag:yaml.org,2002:str":
            kind = KEY_KINDS.get(key.tag.rsplit(":", 1)[-1], key.tag)
            raise ConfigError(
                f"{path}: key {shown(key.value)} at {at(key)} is read as {kind}, not a string; "
                "config keys are names like merge_method or models (quote it if it is meant as "
                "text)"
            )
        if key.value in seen:
            raise ConfigError(
                f"{path}: key {shown(key.value)} appears twice in the same mapping, at "
                f"{at(seen[key.value])} and {at(key)}; keep one (YAML would silently use the "
                "last)"
            )
        seen[key.value] = key


def _clip(message: str) -> str:
    """A message cut to MAX_MESSAGE_CHARS, keeping its start (where) and end (what to do)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    keep = MAX_MESSAGE_CHARS // 2
    return f"{message[:keep]} ... {message[-keep:]}"


class _Reader:
    """Collects problems while walking a config; knows the method and the inputs so far."""

    def __init__(self, config_dir: str, method: MergeMethod | None) -> None:
        self.config_dir = config_dir
        self.method = method
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.inputs: list[InputModel] = []
        self.hub_models: dict[str, str | None] = {}  # repo id or hf:// URI -> what it resolved to

    def input_index(self, ref: Any, where: str) -> int | None:
        """The index of the model `ref` names, adding it to the inputs on first sight."""
        path = self.resolve_path(ref, where)
        if path is None:
            return None
        for index, model in enumerate(self.inputs):
            if model.path == path:
                return index
        self.inputs.append(InputModel(path, str(ref)))
        return len(self.inputs) - 1

    def resolve_path(self, ref: Any, where: str) -> str | None:
        if not isinstance(ref, str) or not ref.strip():
            self.errors.append(
                f"{where}: {shown(ref)} must be a path to a checkpoint folder or .safetensors file"
            )
            return None
        if self._is_lora_ref(ref):
            return self._resolve_lora(ref, where)  # MODEL+ADAPTER, as mergekit splits it
        scheme = uri_scheme(ref)
        if scheme == "s3":
            return ref.rstrip("/")  # opened (and checked) with the other inputs
        if scheme == "virtual":  # a named layout without files (storage/virtual.py)
            from raymerge.storage.virtual import parse_uri

            try:
                parse_uri(ref)
            except ConfigError as exc:
                self.errors.append(f"{where}: {exc}")
                return None
            return ref.rstrip("/")
        if scheme == "hf":  # a Hugging Face model repo (storage/hub.py)
            return self._hub_model(ref, where)
        if scheme is not None:
            self.errors.append(
                f"{where}: {shown(ref)}: {scheme}:// models are not supported; raymerge "
                "reads local checkpoint folders, .safetensors files, s3://bucket/prefix and "
                "Hugging Face repo ids (org/name, org/name@revision)"
            )
            return None
        expanded = os.path.expanduser(ref)
        candidates = [expanded]
        if not os.path.isabs(expanded):
            candidates.append(os.path.join(self.config_dir, expanded))
        for candidate in candidates:
            if os.path.exists(candidate):
                return os.path.abspath(candidate)
        from raymerge.storage.hub import parse_ref

        if parse_ref(ref) is not None:  # org/name or org/name@revision: a Hugging Face repo
            return self._hub_model(ref, where)
        looked = " or ".join(shown(os.path.abspath(c)) for c in candidates)
        self.errors.append(
            f"{where}: {shown(ref)} not found (looked for {looked}); raymerge reads local "
            "checkpoint folders, .safetensors files, s3://bucket/prefix and Hugging Face repo "
            "ids (org/name or org/name@revision)"
        )
        return None

    def _hub_model(self, ref: str, where: str) -> str | None:
        """A Hugging Face repo id or hf:// URI: a cache snapshot folder or a pinned hf:// URI
        (storage/hub.py), resolved once per config; a run-time failure (the Hub cannot be
        reached) stops the parse at once."""
        from raymerge.storage import hub

        if ref not in self.hub_models:
            self.hub_models[ref] = None
            if uri_scheme(ref) is None:
                repo, revision = hub.parse_ref(ref) or (ref, None)
                at, what = None, f"{shown(ref)} is no local path; as a Hugging Face repo id"
            else:
                try:
                    parsed = hub.parse_uri(ref)
                except ConfigError as exc:
                    self.errors.append(f"{where}: {exc}")
                    return None
                repo, revision, at, what = parsed.repo, parsed.revision, parsed.endpoint, shown(ref)
            try:
                self.hub_models[ref] = hub.resolve(repo, revision, at)
            except ConfigError as exc:
                self.errors.append(f"{where}: {what}: {exc}")
            except RaymergeError as exc:
                raise type(exc)(f"{where}: {what}: {exc}") from None
        return self.hub_models[ref]

    def _exists(self, ref: str) -> bool:
        """Whether `ref` names an existing local path (here, or beside the config)."""
        expanded = os.path.expanduser(ref)
        return os.path.exists(expanded) or (
            not os.path.isabs(expanded) and os.path.exists(os.path.join(self.config_dir, expanded))
        )

    def _there(self, ref: str) -> bool:
        return uri_scheme(ref) is not None or self._exists(ref)

    def _is_lora_ref(self, ref: str) -> bool:
        """MODEL+ADAPTER or lora://...: a '+' in a reference that is no existing path (in a
        URI, only before an adapter that is a URI or an existing path: keys may hold '+')."""
        if ref.lower().startswith("lora://"):
            return True
        if "+" not in ref or self._exists(ref):
            return False
        cuts = [i for i, c in enumerate(ref) if c == "+"]
        return uri_scheme(ref) is None or any(self._there(ref[i + 1 :]) for i in cuts)

    def _resolve_lora(self, ref: str, where: str) -> str | None:
        """MODEL+ADAPTER (or lora://MODEL+ADAPTER): each half resolved as any reference is,
        the adapter folder checked; the input is lora://MODEL+ADAPTER (storage/lora.py)."""
        from raymerge.storage.lora import ADAPTER_CONFIG, is_lora, lora_uri, parse_uri

        if is_lora(ref):
            try:
                halves = parse_uri(ref)
            except ConfigError as exc:
                self.errors.append(f"{where}: {exc}")
                return None
        else:
            cuts = [i for i, c in enumerate(ref) if c == "+"]
            if uri_scheme(ref) is not None:  # a URI: only before an adapter that is there
                cuts = [i for i in cuts if self._there(ref[i + 1 :])]
            if len(cuts) > 1:  # the one cut whose halves both exist (or are URIs)
                cuts = [i for i in cuts if self._there(ref[:i]) and self._there(ref[i + 1 :])]
            if len(cuts) != 1:
                self.errors.append(
                    f"{where}: {shown(ref)}: cannot tell where the model ends and its LoRA "
                    "adapter begins (MODEL+ADAPTER, one '+'); rename the folders that hold a '+'"
                )
                return None
            halves = (ref[: cuts[0]], ref[cuts[0] + 1 :])
        base = self.resolve_path(halves[0], f"{where} (the model before '+')")
        adapter = self.resolve_path(halves[1], f"{where} (the LoRA adapter after '+')")
        if base is None or adapter is None:
            return None
        if is_lora(base) or is_lora(adapter):
            self.errors.append(
                f"{where}: {shown(ref)}: one LoRA adapter per model; merge the others first"
            )
            return None
        if uri_scheme(adapter) is None and not os.path.isfile(
            os.path.join(adapter, ADAPTER_CONFIG)
        ):  # a remote adapter is checked when it is opened
            kind = "a file" if os.path.isfile(adapter) else f"a folder without {ADAPTER_CONFIG}"
            self.errors.append(
                f"{where}: {shown(ref)}: the part after '+' ({shown(adapter)}) is {kind}; give "
                f"a PEFT LoRA adapter folder (with {ADAPTER_CONFIG} and "
                "adapter_model.safetensors)"
            )
            return None
        return lora_uri(base, adapter)

    def parameters(self, raw: Any, where: str, per_model_only: bool) -> dict:
        """A `parameters:` mapping, each value checked against the method's declarations."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.errors.append(f"{where}: must be a mapping of parameter names to values")
            return {}
        if self.method is not None:
            for name, setting in raw.items():
                p = self.method.param(name)
                if p is None:
                    allowed = ", ".join(q.name for q in self.method.params) or "none"
                    self.errors.append(
                        f"{where}.{name}: unknown parameter {shown(name)} for {self.method.name}; "
                        f"its parameters: {allowed}"
                    )
                elif per_model_only and p.scope == "shared":
                    self.errors.append(
                        f"{where}.{name}: {shown(name)} is a global parameter of "
                        f"{self.method.name}; move it to the top-level `parameters:` (or the "
                        "slice's)"
                    )
                else:
                    check_setting(setting, f"{where}.{name}", p.validate, self.errors,
                                  whole=p.type is tuple)  # fmt: skip
        return dict(raw)

    def keys(self, entry: dict, allowed: set[str], where: str) -> None:
        unknown = sorted(str(k) for k in entry if k not in allowed)
        if unknown:
            self.errors.append(
                f"{where}: unknown key(s) {shown(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )


def parse_spec(
    data: Any, source: str, config_dir: str, overrides: dict[str, Any] | None = None
) -> MergeSpec:
    overrides = overrides or {}
    if not isinstance(data, dict):
        kinds = {list: "a list", str: "a single string", type(None): "empty", bool: "a boolean"}
        kind = kinds.get(type(data), "a number" if isinstance(data, int | float) else "no mapping")
        raise ConfigError(
            f"{source}: the config must be a YAML mapping (merge_method, models, ...), but it "
            f"is {kind}"
        )
    method = _parse_method(data)
    reader = _Reader(config_dir, method if isinstance(method, MergeMethod) else None)
    if isinstance(method, str):
        reader.errors.append(method)
    _check_top_level_keys(data, reader)
    base_input = None
    if data.get("base_model") is not None:
        base_input = reader.input_index(data["base_model"], "base_model")
    if data.get("slices") is not None:
        slices = _parse_slices(data["slices"], base_input, reader)
    else:
        slices = _parse_models(data.get("models"), base_input, reader)
    parameters = reader.parameters(data.get("parameters"), "parameters", per_model_only=False)
    if reader.method is not None:
        for index, out_slice in enumerate(slices):
            _check_slice_against_method(reader, out_slice, parameters, base_input, data, index)
    out_dtype = _parse_dtypes(data, overrides, reader.errors)
    tokenizer_source, resize_vocab, vocab = _parse_tokenizer(data, base_input, reader)
    if "chat_template" in data:
        reader.warnings.append(
            "chat_template: not applied by raymerge; the tokenizer files are copied as is"
        )
    options = _parse_raymerge_section(data.get("raymerge"), overrides, reader.errors)
    if reader.errors:
        raise ConfigError(_format_errors(source, reader.errors))
    assert reader.method is not None
    return MergeSpec(
        method=reader.method,
        inputs=tuple(reader.inputs),
        slices=tuple(slices),
        parameters=parameters,
        base_input=base_input,
        uses_slices=data.get("slices") is not None,
        out_dtype=out_dtype,
        tokenizer_source=tokenizer_source,
        resize_vocab=resize_vocab,
        vocab=vocab,
        source=source,
        warnings=tuple(reader.warnings),
        **options,
    )


def _parse_method(data: dict) -> MergeMethod | str:
    """The method, or the problem with `merge_method` as a message."""
    if "merge_method" not in data:
        return f"merge_method: missing; one of {', '.join(sorted(REGISTRY))}"
    try:
        return get_method(data["merge_method"])
    except ConfigError as exc:
        return str(exc)


def _format_errors(source: str, errors: list[str]) -> str:
    errors = [_clip(e) for e in errors]
    if len(errors) == 1:
        return f"{source}: {errors[0]}"
    return f"{source}: {len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors)


def _check_top_level_keys(data: dict, reader: _Reader) -> None:
    for key in data:
        if key in TOP_LEVEL_KEYS:
            continue
        hint = ""
        if any(key in (p.name for p in m.params) for m in REGISTRY.values()):
            hint = f"; method parameters go under `parameters:` (parameters.{key})"
        elif key == "modules":
            hint = "; multi-module configs are not supported yet: use `models:` or `slices:`"
        allowed = ", ".join(sorted(TOP_LEVEL_KEYS))
        reader.errors.append(f"{key}: unknown top-level key{hint}; allowed: {allowed}")
    if (data.get("models") is None) == (data.get("slices") is None):
        reader.errors.append(
            "models/slices: give exactly one of `models:` (whole models) or `slices:` "
            "(layer ranges)"
        )


def _parse_models(raw: Any, base_input: int | None, reader: _Reader) -> list[OutputSlice]:
    """`models:` is one slice over all layers of every model, the base added if unlisted."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        reader.errors.append("models: must be a non-empty list of `- model: PATH` entries")
        return []
    sources = []
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            entry = {"model": entry}
        source = _parse_source(entry, f"models[{i}]", {"model", "parameters"}, reader)
        if source is not None:
            sources.append(source)
    _check_distinct(sources, reader)
    if base_input is not None and all(s.input != base_input for s in sources):
        sources.append(SliceSource(base_input, None, {}, "base_model"))
    return [OutputSlice(tuple(sources), _base_position(sources, base_input, reader), {}, "models")]


def _parse_slices(raw: Any, base_input: int | None, reader: _Reader) -> list[OutputSlice]:
    if not isinstance(raw, list) or not raw:
        reader.errors.append("slices: must be a non-empty list of `- sources: [...]` entries")
        return []
    slices = []
    for i, entry in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(entry, dict):
            reader.errors.append(f"{where}: must be a mapping with `sources:`")
            continue
        reader.keys(entry, {"sources", "base_model", "parameters", "residual_weight"}, where)
        if "residual_weight" in entry:
            reader.errors.append(f"{where}.residual_weight: not supported yet")
        raw_sources = entry.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            reader.errors.append(f"{where}.sources: must be a non-empty list of models")
            continue
        allowed = {"model", "layer_range", "parameters"}
        sources = [
            s
            for j, src in enumerate(raw_sources)
            if (s := _parse_source(src, f"{where}.sources[{j}]", allowed, reader)) is not None
        ]
        _check_distinct(sources, reader)
        base = base_input
        if entry.get("base_model") is not None:
            base = reader.input_index(entry["base_model"], f"{where}.base_model")
        params = reader.parameters(entry.get("parameters"), f"{where}.parameters", False)
        slices.append(
            OutputSlice(tuple(sources), _base_position(sources, base, reader), params, where)
        )
    return slices


def _parse_source(entry: Any, where: str, allowed: set[str], reader: _Reader) -> SliceSource | None:
    if not isinstance(entry, dict):
        reader.errors.append(f"{where}: must be a mapping with `model:`")
        return None
    reader.keys(entry, allowed, where)
    if "model" not in entry:
        reader.errors.append(f"{where}.model: missing")
        return None
    index = reader.input_index(entry["model"], f"{where}.model")
    params = reader.parameters(entry.get("parameters"), f"{where}.parameters", per_model_only=True)
    layer_range = _parse_layer_range(entry, where, reader) if "layer_range" in allowed else None
    return None if index is None else SliceSource(index, layer_range, params, where)


def _parse_layer_range(entry: dict, where: str, reader: _Reader) -> tuple[int, int] | None:
    raw = entry.get("layer_range")
    if raw is None:
        reader.errors.append(f"{where}.layer_range: missing; give [first, end) layer indices")
        return None
    if (
        isinstance(raw, list)
        and len(raw) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw)
        and raw[0] < raw[1]
    ):
        return (raw[0], raw[1])
    reader.errors.append(
        f"{where}.layer_range: {shown(raw)} must be [start, end] with 0 <= start < end "
        "(end excluded)"
    )
    return None


def _check_distinct(sources: list[SliceSource], reader: _Reader) -> None:
    seen: dict[int, str] = {}
    for source in sources:
        if source.input in seen:
            given = reader.inputs[source.input].given
            reader.errors.append(
                f"{source.yaml_path}: {shown(given)} is listed twice (also {seen[source.input]})"
            )
        seen[source.input] = source.yaml_path


def _base_position(sources: list[SliceSource], base: int | None, reader: _Reader) -> int | None:
    if base is None or reader.method is None or reader.method.base == "ignored":
        return None
    return next((i for i, s in enumerate(sources) if s.input == base), None)


def _check_slice_against_method(
    reader: _Reader, out_slice: OutputSlice, parameters: dict, base_input: int | None,
    data: dict, index: int,
) -> None:  # fmt: skip
    method = reader.method
    assert method is not None
    where = out_slice.yaml_path
    if method.base == "required" and out_slice.base is None:
        entry = data["slices"][index] if data.get("slices") is not None else {}
        if base_input is not None or entry.get("base_model") is not None:
            problem = f"{where}: {method.name} needs its base model among the slice's sources"
        else:
            problem = f"base_model: {method.name} needs a base model (task vectors are x_i - base)"
        if problem not in reader.errors:
            reader.errors.append(problem)
    count = len(out_slice.sources)
    low, high = method.min_inputs, method.max_inputs
    if count < low or (high is not None and count > high):
        wanted = (
            f"exactly {low}" if low == high
            else f"at least {low}" if high is None
            else f"{low} to {high}"
        )  # fmt: skip
        reader.errors.append(
            f"{where}: {method.name} takes {wanted} input models (base included); got {count}"
        )
    for position, source in enumerate(out_slice.sources):
        for p in method.params:
            if not p.required or p.scope == "shared":
                continue
            if p.scope == "non_base" and position == out_slice.base:
                continue
            if not any(
                p.name in level for level in (source.parameters, out_slice.parameters, parameters)
            ):
                given = reader.inputs[source.input].given
                fix = (
                    f"list the base under `models:` with parameters.{p.name}"
                    if source.yaml_path == "base_model"
                    else f"set {source.yaml_path}.parameters.{p.name}"
                )
                reader.errors.append(
                    f"{source.yaml_path}: {method.name} needs {p.name!r} for {shown(given)}; "
                    f"{fix}, or a default in the top-level parameters.{p.name}"
                )
    _check_constant_params(reader, out_slice, parameters)


def _check_constant_params(reader: _Reader, out_slice: OutputSlice, parameters: dict) -> None:
    """Run the method's own check once on values that do not vary by tensor."""
    method = reader.method
    if method is None or method.check is None or reader.errors:
        return
    levels = [parameters, out_slice.parameters] + [s.parameters for s in out_slice.sources]
    if any(isinstance(v, list | dict) for level in levels for v in level.values()):
        return  # varies by tensor: checked per tensor at plan time
    spec = MergeSpec(method, tuple(reader.inputs), (out_slice,), parameters)
    names = [""] * len(out_slice.sources)
    try:
        shared, per_input = spec.resolve(0, "", names, 0.0)
    except (ConfigError, ValueError):
        return  # reported elsewhere
    problem = method.check(shared, per_input)
    if problem:
        reader.errors.append(f"parameters: {problem}")


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


TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
MAX_PAD_MULTIPLE = 1 << 16


def _parse_tokenizer(
    data: dict, base_input: int | None, reader: _Reader
) -> tuple[int | None, bool, VocabSpec | None]:
    """(input whose tokenizer files are copied, whether vocab rows follow the base by
    position, how rows are matched by token string: `union`, or a `tokenizer:` block with
    `tokens` or `pad_to_multiple_of`)."""
    source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    block: dict = {}
    where = "tokenizer_source"
    if tokenizer is not None:
        if source is not None:
            reader.errors.append("tokenizer: give either tokenizer_source or tokenizer, not both")
        if not isinstance(tokenizer, dict):
            reader.errors.append(
                "tokenizer: must be a mapping (source, tokens, pad_to_multiple_of), as mergekit's "
                "tokenizer block"
            )
            return None, False, None
        reader.keys(tokenizer, TOKENIZER_KEYS, "tokenizer")
        block, where = tokenizer, "tokenizer.source"
        source = tokenizer.get("source", "union")  # mergekit's default for the block
    if source is None:
        default = base_input if base_input is not None else (0 if reader.inputs else None)
        return default, False, None
    tokens = _parse_tokens(block.get("tokens"), reader)
    pad = _parse_pad(block.get("pad_to_multiple_of"), reader)
    matched = source == "union" or bool(tokens) or pad is not None
    if source == "base":
        if base_input is None:
            reader.errors.append(f"{where}: 'base' needs a base_model")
            return None, False, None
        if not matched:
            return base_input, True, None
        return base_input, False, VocabSpec("base", base_input, tokens, pad)
    if source == "union":
        first = base_input if base_input is not None else 0
        return None, False, VocabSpec("union", first, tokens, pad)
    index = _input_of(source, where, reader, "`base`, `union` or one of the input models")
    if index is None:
        return None, False, None
    return index, False, (VocabSpec("model", index, tokens, pad) if matched else None)


def _input_of(ref: Any, where: str, reader: _Reader, allowed: str) -> int | None:
    """The index of the input model `ref` names (never adding one)."""
    path = reader.resolve_path(ref, where)
    for index, model in enumerate(reader.inputs):
        if model.path == path:
            return index
    if path is not None:
        reader.errors.append(
            f"{where}: {shown(ref)} is not one of the merge's models; use {allowed}"
        )
    return None


def _parse_pad(raw: Any, reader: _Reader) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_PAD_MULTIPLE:
        reader.errors.append(
            f"tokenizer.pad_to_multiple_of: {shown(raw)} must be an integer from 1 to "
            f"{MAX_PAD_MULTIPLE} (the embedding rows are padded to a multiple of it)"
        )
        return None
    return raw


def _parse_tokens(raw: Any, reader: _Reader) -> tuple[TokenSource, ...]:
    """`tokenizer.tokens`: token -> {source: MODEL | {kind: zero} | {kind: model_token,
    model: MODEL, token: TOKEN | token_id: ID}, force: bool}, as mergekit reads it."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        reader.errors.append(
            "tokenizer.tokens: must be a mapping of token strings to {source: ...}"
        )
        return ()
    models = "a model of the merge"
    out = []
    for token, entry in raw.items():
        where = f"tokenizer.tokens[{shown(token)}]"
        if not isinstance(token, str) or not token:
            reader.errors.append(f"{where}: a token must be a non-empty string")
            continue
        if not isinstance(entry, dict):
            reader.errors.append(f"{where}: must be a mapping with `source:` (and `force:`)")
            continue
        reader.keys(entry, TOKEN_KEYS, where)
        force = entry.get("force", False)
        if not isinstance(force, bool):
            reader.errors.append(f"{where}.force: {shown(force)} must be true or false")
            continue
        source = entry.get("source")
        if isinstance(source, str):
            index = _input_of(source, f"{where}.source", reader, models)
            if index is not None:
                out.append(TokenSource(token, "model", index, force=force))
            continue
        if not isinstance(source, dict) or source.get("kind") not in ("zero", "model_token"):
            reader.errors.append(
                f"{where}.source: {shown(source)} must be a model of the merge, {{kind: zero}}, "
                "or {kind: model_token, model: MODEL, token: TOKEN} (or token_id: ID)"
            )
            continue
        if source["kind"] == "zero":
            reader.keys(source, {"kind"}, f"{where}.source")
            out.append(TokenSource(token, "zero", force=force))
            continue
        reader.keys(source, {"kind", "model", "token", "token_id"}, f"{where}.source")
        index = _input_of(source.get("model"), f"{where}.source.model", reader, models)
        name, number = source.get("token"), source.get("token_id")
        if (name is None) == (number is None):
            reader.errors.append(f"{where}.source: give exactly one of `token` or `token_id`")
            continue
        if name is not None and (not isinstance(name, str) or not name):
            reader.errors.append(f"{where}.source.token: {shown(name)} must be a token string")
            continue
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int) or number < 0
        ):
            reader.errors.append(
                f"{where}.source.token_id: {shown(number)} must be an integer >= 0"
            )
            continue
        if index is not None:
            out.append(TokenSource(token, "model_token", index, name, number, force))
    return tuple(out)


def _parse_raymerge_section(raw: Any, overrides: dict[str, Any], errors: list[str]) -> dict:
    section = {}
    if raw is not None:
        if not isinstance(raw, dict):
            errors.append("raymerge: must be a mapping (seed, shard_size, part_size)")
        else:
            for key in sorted(str(k) for k in raw if k not in RAYMERGE_KEYS):
                errors.append(
                    f"raymerge.{key}: unknown key; allowed: {', '.join(sorted(RAYMERGE_KEYS))}"
                )
            section = {k: v for k, v in raw.items() if k in RAYMERGE_KEYS}
    section.update({k: v for k, v in overrides.items() if k in RAYMERGE_KEYS and v is not None})
    options: dict[str, Any] = {}
    seed = section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        errors.append(f"raymerge.seed: {shown(seed)} must be a non-negative integer")
    else:
        options["seed"] = seed
    for key in ("shard_size", "part_size"):
        if key in section:
            try:
                options[key] = parse_size(section[key], f"raymerge.{key}")
            except ConfigError as exc:
                errors.append(str(exc))
            except (OverflowError, ValueError):  # "1e999GB"
                errors.append(f"raymerge.{key}: {shown(section[key])} is too large a size")
    return options
