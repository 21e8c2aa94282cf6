"""LoRA inputs: a base model with a PEFT LoRA adapter applied to its rows as they are read.

A config's `model: BASE+ADAPTER` (mergekit's syntax) becomes the input
`lora://BASE_URI+ADAPTER_URI`, each half with '%' and '+' percent-escaped (so a path that
holds a '+' round-trips; other characters stay as they are: `lora:///m/base+/m/adapter`).
`LoraSource` presents the base's files unchanged (names, sizes, headers), so the checkpoint
opens and plans as the base does; a read of bytes inside a tensor the adapter changes gets
that tensor's adapted rows, computed on the fly (no merged copy is ever written):

    W' = W + s * (B @ A)        (B @ A transposed with fan_in_fan_out)
    s  = lora_alpha / r         (lora_alpha / sqrt(r) with use_rslora; r and lora_alpha per
                                 module from rank_pattern / alpha_pattern, matched as PEFT does)

Arithmetic: fp32 (fp64 for an F64 base). B @ A is summed over the rank in order, one
elementwise product and one addition at a time (each exactly rounded), so a row's value does
not depend on which other rows are read with it nor on the thread count; then times s (as
fp32), plus W, rounded once to W's stored dtype. PEFT's merge_and_unload instead rounds the
delta to the adapter's dtype and adds it in the weight's dtype, so a bf16 result may differ
from PEFT's by a unit in the last place.

Full tensors in the adapter (`modules_to_save`, the biases of `bias: all` / `lora_only`:
keys without `lora_`, or with `.modules_to_save.<adapter>.`) replace the base's tensor, cast
once to its stored dtype, as merge_and_unload keeps the trained copy. Refused: DoRA,
embedding LoRA, lora_bias, trainable tokens, aLoRA/QALoRA, layer_replication,
target_parameters, inits that rewrite the base at load time (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA), and adapters that do not fit the base (a missing tensor, other shapes).

The driver reads the adapter's config and header only (no torch: `check`); a worker loads a
tensor's A and B once (cached up to FACTOR_CACHE_BYTES) and works through its rows in blocks.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from raymerge.dtypes import torch_dtype
from raymerge.errors import CheckpointError, ConfigError, shown
from raymerge.lazy import torch
from raymerge.safetensors_format import TensorEntry, read_header
from raymerge.storage.base import Source
from raymerge.storage.ranged import BufferedReads

SCHEME = "lora"
PREFIX = f"{SCHEME}://"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's names: the PeftModel's base_model (LoraModel).model
MAX_CONFIG_BYTES = 1 << 20
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
BLOCK_ELEMENTS = 1 << 18  # rows worked through at once: 1 MiB of fp32, cache-sized
FACTOR_CACHE_BYTES = 256 << 20  # A and B of recent tensors, per source
# init_lora_weights values with which PEFT rewrites the base weights when it loads the adapter
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
HOW_TO_MERGE = "merge it into its model with PEFT first (merge_and_unload)"


# --- the URI ---------------------------------------------------------------------------------


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("+", "%2B")


def lora_uri(base: str, adapter: str) -> str:
    """The input URI of `base` with `adapter` applied (both resolved paths or URIs)."""
    return f"{PREFIX}{_escape(base)}+{_escape(adapter)}"


def is_lora(uri: str) -> bool:
    return uri[: len(PREFIX)].lower() == PREFIX


def parse_uri(uri: str) -> tuple[str, str]:
    """(base, adapter) of a lora:// URI; ConfigError when it is not one."""
    body = uri[len(PREFIX) :] if is_lora(uri) else None
    halves = body.split("+") if body is not None else []
    if len(halves) != 2 or not all(halves):
        raise ConfigError(
            f"{shown(uri)}: not a LoRA input; write it as lora://BASE+ADAPTER (a '+' inside "
            "either part as %2B), or as MODEL+ADAPTER in a config"
        )
    base, adapter = (unquote(h) for h in halves)
    if is_lora(base) or is_lora(adapter):
        raise ConfigError(f"{shown(uri)}: one LoRA adapter per model; merge the others first")
    return base, adapter


def config_ref(uri: str) -> str:
    """How a config names this input: MODEL+ADAPTER (mergekit's form) where that reads back
    the same, else the lora:// URI; any other input as it is."""
    if not is_lora(uri):
        return uri
    base, adapter = parse_uri(uri)
    return uri if "+" in base or "+" in adapter else f"{base}+{adapter}"


# --- the adapter's files ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One base tensor the adapter changes: W + scale * B @ A, or a replacement."""

    name: str
    a: TensorEntry | None = None  # lora_A.weight [r, in]
    b: TensorEntry | None = None  # lora_B.weight [out, r]
    scale: float = 1.0
    fan_in_fan_out: bool = False  # W is stored [in, out] (GPT-2's Conv1D)
    replacement: TensorEntry | None = None  # a full tensor (modules_to_save, biases)

    def expected_shape(self) -> tuple[int, ...]:
        if self.replacement is not None:
            return self.replacement.shape
        assert self.a is not None and self.b is not None
        out, inner = self.b.shape[0], self.a.shape[1]
        return (inner, out) if self.fan_in_fan_out else (out, inner)


@dataclass(frozen=True)
class Adapter:
    where: str  # the adapter's weights file, for messages
    targets: dict[str, Target]


def read_adapter(source: Source) -> Adapter:
    """The adapter under `source`: its config and its weights' header (no tensor bytes)."""
    config = _read_config(source)
    where = source.describe(ADAPTER_WEIGHTS)
    if not source.exists(ADAPTER_WEIGHTS):
        if source.exists("adapter_model.bin"):
            raise ConfigError(
                f"{where}: missing; the adapter holds only pickle weights (adapter_model.bin), "
                "which raymerge does not load: convert them (PeftModel.from_pretrained(...)"
                ".save_pretrained(DIR, safe_serialization=True), or safetensors' save_file)"
            )
        raise ConfigError(
            f"{where}: missing; a PEFT LoRA adapter folder holds {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS}: give the folder the adapter was saved to"
        )
    entries, _ = read_header(source, ADAPTER_WEIGHTS)
    return Adapter(where, _targets(entries, config, source.describe(ADAPTER_CONFIG), where))


def _read_config(source: Source) -> dict:
    where = source.describe(ADAPTER_CONFIG)
    if not source.exists(ADAPTER_CONFIG):
        raise ConfigError(
            f"{where}: missing; the part after '+' must be a PEFT LoRA adapter folder (with "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    size = source.size(ADAPTER_CONFIG)
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{where}: {size} bytes is too large for an adapter config; restore the adapter's "
            f"original {ADAPTER_CONFIG}"
        )
    try:
        config = json.loads(source.read_range(ADAPTER_CONFIG, 0, size))
    except (ValueError, RecursionError) as exc:
        problem = str(exc).split(";")[0][:200] or type(exc).__name__
        raise CheckpointError(
            f"{where}: not valid JSON ({problem}); restore the adapter's original {ADAPTER_CONFIG}"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: must be a JSON object; restore the adapter's original")
    return config


@dataclass(frozen=True)
class _Settings:
    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict
    alpha_pattern: dict


def _settings(config: dict, where: str) -> _Settings:
    """The config's LoRA settings (PEFT's defaults where absent); refuses what cannot be
    applied as W + s * B @ A."""
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise ConfigError(
            f"{where}: peft_type {shown(peft_type)}: raymerge applies LoRA adapters only; "
            f"{HOW_TO_MERGE}"
        )
    refused = {
        "use_dora": "DoRA (use_dora: true) adapters are not supported",
        "lora_bias": "lora_bias: true (a bias on lora_B) is not supported",
        "use_qalora": "QALoRA (use_qalora: true) adapters are not supported",
        "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) adapters act only after "
        "their invocation tokens and cannot be merged into weights",
        "layer_replication": "layer_replication changes the model's layers; not supported",
        "target_parameters": "target_parameters (LoRA on nn.Parameter) is not supported",
        "trainable_token_indices": "trainable_token_indices (trainable tokens) is not supported",
    }
    for key, problem in refused.items():
        if config.get(key):
            raise ConfigError(f"{where}: {problem}; {HOW_TO_MERGE}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise ConfigError(
            f"{where}: init_lora_weights {shown(init)}: PEFT rewrites the base weights when it "
            "loads this adapter, so it does not apply to the base as it is; save it converted "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) or "
            f"{HOW_TO_MERGE}"
        )

    def value(key: str, default, check, wanted: str):
        got = config.get(key, default)
        if got is None:
            got = default
        if not check(got):
            raise CheckpointError(
                f"{where}: {key} {shown(got)} must be {wanted}; restore the adapter's original "
                f"{ADAPTER_CONFIG}"
            )
        return got

    def is_rank(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def is_number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    def is_pattern(check):
        return lambda v: (
            isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())
        )

    return _Settings(
        r=value("r", 8, is_rank, "a positive integer"),
        alpha=value("lora_alpha", 8, is_number, "a number"),
        rslora=value("use_rslora", False, lambda v: isinstance(v, bool), "true or false"),
        fan_in_fan_out=value(
            "fan_in_fan_out", False, lambda v: isinstance(v, bool), "true or false"
        ),
        rank_pattern=value("rank_pattern", {}, is_pattern(is_rank), "a mapping to ranks"),
        alpha_pattern=value("alpha_pattern", {}, is_pattern(is_number), "a mapping to numbers"),
    )


def _pattern_value(patterns: dict, module: str, default, key: str, where: str):
    """PEFT's get_pattern_key: the first pattern (a regex) that matches the module's name or
    a dotted suffix of it."""
    for pattern, found in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return found
        except re.error:
            raise CheckpointError(
                f"{where}: {key} key {shown(pattern)} is not a valid regular expression"
            ) from None
    return default


def _targets(entries: dict[str, TensorEntry], config: dict, config_where: str,
             where: str) -> dict[str, Target]:  # fmt: skip
    settings = _settings(config, config_where)
    pairs: dict[str, dict[str, TensorEntry]] = {}
    replacements: dict[str, TensorEntry] = {}
    for key, entry in entries.items():
        at = f"{where}: tensor {shown(key)}"
        if not key.startswith(KEY_PREFIX):
            raise CheckpointError(
                f"{at}: not a PEFT adapter tensor name (they start with {KEY_PREFIX!r}); "
                "is this a PEFT LoRA adapter?"
            )
        rest = key[len(KEY_PREFIX) :]
        parts = rest.split(".")
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            raise ConfigError(
                f"{at}: LoRA on an embedding (lora_embedding_A/B) is not supported; {HOW_TO_MERGE}"
            )
        if any(p.startswith("lora_magnitude_vector") for p in parts):
            raise ConfigError(f"{at}: DoRA adapters are not supported; {HOW_TO_MERGE}")
        if "trainable_tokens_delta" in parts:
            raise ConfigError(f"{at}: trainable tokens are not supported; {HOW_TO_MERGE}")
        match = _LORA_KEY.fullmatch(rest)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = entry
            continue
        if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
            problem = (
                "a bias on lora_B (lora_bias) is not supported"
                if rest.endswith(".lora_B.bias")
                else "not a tensor raymerge knows how to apply"
            )
            raise ConfigError(f"{at}: {problem}; {HOW_TO_MERGE}")
        if "modules_to_save" in parts:  # X.modules_to_save.<adapter>.weight -> X.weight
            i = parts.index("modules_to_save")
            if len(parts) < i + 3:
                raise CheckpointError(f"{at}: a modules_to_save tensor without its parameter")
            parts = parts[:i] + parts[i + 2 :]
        name = ".".join(parts)
        if name in replacements:
            raise CheckpointError(f"{at}: {shown(name)} is replaced twice in this adapter")
        replacements[name] = entry
    targets: dict[str, Target] = {}
    for module, pair in sorted(pairs.items()):
        at = f"{where}: {shown(module)}"
        if set(pair) != {"A", "B"}:
            have, lack = ("lora_A", "lora_B") if "A" in pair else ("lora_B", "lora_A")
            raise CheckpointError(f"{at}: has {have} but no {lack}; the adapter is incomplete")
        a, b = pair["A"], pair["B"]
        for entry in (a, b):
            if entry.dtype not in FLOAT_DTYPES or len(entry.shape) != 2:
                raise CheckpointError(
                    f"{where}: tensor {shown(entry.name)} is {entry.dtype} {list(entry.shape)}; "
                    "LoRA factors are 2-D floating-point matrices (a conv LoRA is not supported)"
                )
        rank = _pattern_value(settings.rank_pattern, module, settings.r, "rank_pattern", where)
        alpha = _pattern_value(
            settings.alpha_pattern, module, settings.alpha, "alpha_pattern", where
        )
        if a.shape[0] != b.shape[1] or a.shape[0] != rank:
            raise CheckpointError(
                f"{at}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have rank "
                f"{rank} (r / rank_pattern in {ADAPTER_CONFIG}); the adapter is inconsistent"
            )
        name = f"{module}.weight"
        if name in replacements:
            raise CheckpointError(f"{at}: both a LoRA and a full replacement of {shown(name)}")
        scale = alpha / math.sqrt(rank) if settings.rslora else alpha / rank
        targets[name] = Target(name, a, b, scale, settings.fan_in_fan_out)
    for name, entry in sorted(replacements.items()):
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{where}: tensor {shown(entry.name)} is {entry.dtype}; replacement tensors "
                "must be floating point"
            )
        targets[name] = Target(name, replacement=entry)
    if not targets:
        raise CheckpointError(f"{where}: holds no LoRA tensors; is it the right adapter?")
    return targets


def check_target(target: Target, base: TensorEntry | None, adapter_where: str,
                 base_where: str) -> None:  # fmt: skip
    """ConfigError unless `target` applies to the base tensor `base` (None: absent)."""
    if base is None:
        raise ConfigError(
            f"{adapter_where}: changes tensor {shown(target.name)}, which the base model "
            f"{base_where} does not have; the adapter was trained for another model: pair it "
            "with its own base"
        )
    if base.dtype not in FLOAT_DTYPES:
        raise ConfigError(
            f"{adapter_where}: changes {shown(target.name)}, a {base.dtype} tensor of "
            f"{base_where}; only F16, BF16, F32 and F64 tensors can be adapted"
        )
    expected = target.expected_shape()
    if base.shape != expected:
        if target.replacement is not None:
            what = f"replaces it with a {list(expected)} tensor"
        else:
            assert target.a is not None and target.b is not None
            what = (
                f"has lora_A {list(target.a.shape)} and lora_B {list(target.b.shape)}, which "
                f"make {list(expected)}" + (" (fan_in_fan_out)" if target.fan_in_fan_out else "")
            )
        raise ConfigError(
            f"{adapter_where}: {shown(target.name)} is {list(base.shape)} in the base model "
            f"{base_where}, but the adapter {what}; the adapter was trained for another model "
            "(or a resized vocabulary): pair it with its own base"
        )


# --- the source ------------------------------------------------------------------------------


class LoraSource(BufferedReads):
    """The base model's files, with the adapter applied to the tensors it changes (see the
    module doc). `root` is the lora:// URI; workers rebuild it with open_source(root)."""

    def __init__(self, root: str) -> None:
        from raymerge.storage import open_source

        self.root = str(root)
        base, adapter = parse_uri(self.root)
        self.base = open_source(base)
        self.adapter = open_source(adapter)
        self._lock = threading.Lock()
        self._adapter: Adapter | None = None
        self._spans: dict[str, list[tuple[TensorEntry, Target]]] = {}
        self._factors: OrderedDict[tuple, tuple] = OrderedDict()  # (name, dtype) -> factors
        self._factor_bytes = 0

    # what the planner sees: the base's files as they are

    def describe(self, name: str) -> str:
        return self.base.describe(name)

    def exists(self, name: str) -> bool:
        return self.base.exists(name)

    def size(self, name: str) -> int:
        return self.base.size(name)

    def list(self) -> list[str]:
        return self.base.list()

    def fingerprint(self, name: str) -> str:
        """The base file's and the adapter's files': a changed adapter changes the digest."""
        parts = [self.base.fingerprint(name)]
        parts += [self.adapter.fingerprint(f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
        return "lora:" + "|".join(parts)

    def check(self, tensors: Mapping[str, TensorEntry], files: Iterable[str]) -> Adapter:
        """Read the adapter (config and header) and check that it fits the base's tensors;
        on the driver, before any weight is read (no torch)."""
        adapter = self._adapter_info()
        for file in files:
            if not file.endswith(".safetensors"):
                raise ConfigError(
                    f"{self.base.describe(file)}: a LoRA adapter needs the base's shards named "
                    "*.safetensors; rename it (and its index entry)"
                )
        base_where = self.base.root
        for name, target in adapter.targets.items():
            check_target(target, tensors.get(name), adapter.where, base_where)
        return adapter

    # reading

    def readinto(self, name: str, start: int, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        self.base.readinto(name, start, view)
        if not len(view) or not name.endswith(".safetensors"):
            return  # side files (config.json, the index) are the base's
        end = start + len(view)
        for entry, target in self._targets_in(name):
            if entry.end <= start or entry.start >= end or not entry.nbytes:
                continue
            lo, hi = max(start, entry.start), min(end, entry.end)
            self._adapt(name, entry, target, lo, hi, view[lo - start : hi - start])

    def _adapter_info(self) -> Adapter:
        with self._lock:
            if self._adapter is None:
                self._adapter = read_adapter(self.adapter)
            return self._adapter

    def _targets_in(self, file: str) -> list[tuple[TensorEntry, Target]]:
        """The file's tensors the adapter changes, in file order (its header read once)."""
        with self._lock:
            spans = self._spans.get(file)
        if spans is not None:
            return spans
        adapter = self._adapter_info()
        entries, _ = read_header(self.base, file)
        spans = []
        for name, entry in entries.items():
            target = adapter.targets.get(name)
            if target is not None:
                check_target(target, entry, adapter.where, self.base.root)
                spans.append((entry, target))
        spans.sort(key=lambda s: s[0].start)
        with self._lock:
            self._spans[file] = spans
        return spans

    def _adapt(self, file: str, entry: TensorEntry, target: Target, lo: int, hi: int,
               out: memoryview) -> None:  # fmt: skip
        """Put the adapted bytes [lo, hi) of `entry` into `out`, which holds the base's."""
        rows = entry.shape[0] if entry.shape else 1
        row_bytes = entry.nbytes // rows
        first = (lo - entry.start) // row_bytes
        last = -(-(hi - entry.start) // row_bytes)
        at = entry.start + first * row_bytes
        if at == lo and entry.start + last * row_bytes == hi:
            block = out  # whole rows: adapt them in place
        else:  # rows cut at either end: the covering rows, adapted, then the bytes asked for
            block = memoryview(bytearray((last - first) * row_bytes))
            self.base.readinto(file, at, block)
        if target.replacement is not None:
            self._replace(entry, target.replacement, rows, first, last, block)
        else:
            self._add_delta(entry, target, first, last, block)
        if block is not out:
            out[:] = block[lo - at : hi - at]

    def _replace(self, entry: TensorEntry, replacement: TensorEntry, rows: int, first: int,
                 last: int, block: memoryview) -> None:  # fmt: skip
        row_bytes = replacement.nbytes // rows
        raw = bytearray((last - first) * row_bytes)
        self.adapter.readinto(ADAPTER_WEIGHTS, replacement.start + first * row_bytes,
                              memoryview(raw))  # fmt: skip
        if replacement.dtype == entry.dtype:
            block[:] = raw
            return
        source = torch.frombuffer(raw, dtype=torch.uint8).view(torch_dtype(replacement.dtype))
        _typed(block, entry.dtype).copy_(source)  # rounded once to the base's dtype

    def _add_delta(self, entry: TensorEntry, target: Target, first: int, last: int,
                   block: memoryview) -> None:  # fmt: skip
        compute = torch.float64 if entry.dtype == "F64" else torch.float32
        left, right = self._factors_of(target, compute)
        rank = right.shape[0]
        weights = _typed(block, entry.dtype).view(last - first, -1)
        cols = weights.shape[1]
        step = max(1, BLOCK_ELEMENTS // max(cols, 1))
        acc = torch.empty((min(step, last - first), cols), dtype=compute)
        tmp = torch.empty_like(acc)
        for lo in range(0, last - first, step):
            hi = min(lo + step, last - first)
            a, t, factor = acc[: hi - lo], tmp[: hi - lo], left[first + lo : first + hi]
            torch.mul(factor[:, 0:1], right[0:1], out=a)
            for k in range(1, rank):  # in rank order, one product and one sum at a time
                torch.mul(factor[:, k : k + 1], right[k : k + 1], out=t)
                a.add_(t)
            a.mul_(target.scale)
            t.copy_(weights[lo:hi])
            a.add_(t)
            weights[lo:hi].copy_(a)  # rounded once to the stored dtype

    def _factors_of(self, target: Target, compute) -> tuple:
        """(left [rows of W, r], right [r, columns of W]) in `compute`: (B, A), or (A^T, B^T)
        with fan_in_fan_out; loaded once, kept while they fit FACTOR_CACHE_BYTES."""
        key = (target.name, compute)
        with self._lock:
            found = self._factors.get(key)
            if found is not None:
                self._factors.move_to_end(key)
                return found
        assert target.a is not None and target.b is not None
        a, b = self._load(target.a, compute), self._load(target.b, compute)
        found = (a.t().contiguous(), b.t().contiguous()) if target.fan_in_fan_out else (b, a)
        nbytes = sum(f.numel() * f.element_size() for f in found)
        with self._lock:
            if key not in self._factors:
                self._factors[key] = found
                self._factor_bytes += nbytes
            while self._factor_bytes > FACTOR_CACHE_BYTES and len(self._factors) > 1:
                _, old = self._factors.popitem(last=False)
                self._factor_bytes -= sum(f.numel() * f.element_size() for f in old)
        return found

    def _load(self, entry: TensorEntry, compute):
        raw = bytearray(entry.nbytes)
        self.adapter.readinto(ADAPTER_WEIGHTS, entry.start, memoryview(raw))
        stored = torch.frombuffer(raw, dtype=torch.uint8).view(torch_dtype(entry.dtype))
        return stored.reshape(entry.shape).to(compute).contiguous()

    def __reduce__(self):
        return (LoraSource, (self.root,))


def _typed(block: memoryview, dtype: str):
    """`block`'s bytes as a flat tensor of `dtype`, sharing its memory."""
    return torch.frombuffer(block, dtype=torch.uint8).view(torch_dtype(dtype))
