"""What a merge is, once its config has been checked: inputs, output slices, parameters.

Both config forms become output slices, as in mergekit: `models:` is one slice whose
sources are every input over all its layers (the base added when it is not listed);
`slices:` lists them, each source with its `layer_range`. Parameter values are resolved per
tensor with mergekit's precedence: source → slice → global → the method's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raymerge.errors import ConfigError
from raymerge.methods.base import MergeMethod, Param
from raymerge.params import evaluate

DEFAULT_SHARD_SIZE = 5 * 10**9
DEFAULT_PART_SIZE = 64 * 2**20


@dataclass(frozen=True)
class InputModel:
    """One input checkpoint: where it is and how the config named it."""

    path: str
    given: str


@dataclass(frozen=True)
class SliceSource:
    input: int  # index into MergeSpec.inputs
    layer_range: tuple[int, int] | None  # None: all the model's layers
    parameters: dict[str, Any]
    yaml_path: str


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base: int | None  # position of the base among `sources`
    parameters: dict[str, Any]
    yaml_path: str


@dataclass(frozen=True)
class TokenSource:
    """One `tokenizer.tokens` entry: where the rows of `token` come from (mergekit's
    TokenEmbeddingConfig). `kind` is "model" (that input's row for the token), "zero", or
    "model_token" (that input's row for `source_token`, or its row `source_id`)."""

    token: str
    kind: str
    input: int | None = None
    source_token: str | None = None
    source_id: int | None = None
    force: bool = False  # every model takes this row, even one that has the token

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "kind": self.kind, "input": self.input,
                "source_token": self.source_token, "source_id": self.source_id,
                "force": self.force}  # fmt: skip


@dataclass(frozen=True)
class VocabSpec:
    """Embedding and lm_head rows matched by token string (mergekit's PermutedEmbeddings):
    the output vocabulary is the union of every input's tokenizer (`source` "union"), or the
    tokenizer of input `input` ("base" or "model"), plus the `tokens` overrides' tokens."""

    source: str  # "union", "base" or "model"
    input: int  # the tokenizer the output vocabulary starts from (its files are the model)
    tokens: tuple[TokenSource, ...] = ()
    pad_to_multiple_of: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "input": self.input,
                "tokens": [t.to_json() for t in self.tokens],
                "pad_to_multiple_of": self.pad_to_multiple_of}  # fmt: skip


@dataclass(frozen=True)
class MergeSpec:
    method: MergeMethod
    inputs: tuple[InputModel, ...]
    slices: tuple[OutputSlice, ...]
    parameters: dict[str, Any]
    base_input: int | None = None  # the config's base_model, as an index into inputs
    uses_slices: bool = False  # written with `slices:` (layers may be renumbered)
    out_dtype: str | None = None
    tokenizer_source: int | None = None  # input whose tokenizer files are copied
    resize_vocab: bool = False  # tokenizer_source: base, so vocab rows follow the base
    vocab: VocabSpec | None = None  # rows matched by token string (union, tokens:, padding)
    seed: int = 0
    shard_size: int = DEFAULT_SHARD_SIZE
    part_size: int = DEFAULT_PART_SIZE
    source: str = "<config>"
    warnings: tuple[str, ...] = ()

    @property
    def reference_input(self) -> int:
        """The input whose config.json the output starts from: the base, else the first."""
        return self.base_input if self.base_input is not None else 0

    def to_json(self) -> dict[str, Any]:
        """A canonical description of the merge, for hashing and the run record."""
        record = {
            "merge_method": self.method.name,
            "inputs": [m.path for m in self.inputs],
            "slices": [
                {
                    "sources": [[s.input, s.layer_range, s.parameters] for s in sl.sources],
                    "base": sl.base,
                    "parameters": sl.parameters,
                }
                for sl in self.slices
            ],
            "parameters": self.parameters,
            "out_dtype": self.out_dtype,
            "resize_vocab": self.resize_vocab,
            "seed": self.seed,
        }
        if self.vocab is not None:  # only then: the records of other merges stay as they were
            record["tokenizer"] = self.vocab.to_json()
        return record

    def resolve(
        self, slice_index: int, output_name: str, source_names: list[str], t: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One tensor's parameter values: (shared, one dict per source of the slice).

        Shared values match filters against the output name, per-model values against the
        source's own tensor name (as mergekit does). A filter that matches nothing falls
        through to the next level.
        """
        out_slice = self.slices[slice_index]
        shared = {
            p.name: self._value(p, [out_slice.parameters, self.parameters], output_name, t)
            for p in self.method.params
            if p.scope == "shared"
        }
        per_source = []
        for position, (source, name) in enumerate(zip(out_slice.sources, source_names)):
            levels = [source.parameters, out_slice.parameters, self.parameters]
            per_source.append(
                {
                    p.name: self._value(p, levels, name, t, source.yaml_path)
                    for p in self.method.params
                    if p.scope == "input" or (p.scope == "non_base" and position != out_slice.base)
                }
            )
        return shared, per_source

    def _value(
        self, p: Param, levels: list[dict], tensor_name: str, t: float, where: str = ""
    ) -> Any:
        for level in levels:
            if p.name in level:
                value = evaluate(level[p.name], tensor_name, t, p.validate, p.name,
                                 whole=p.type is tuple)  # fmt: skip
                if value is not None:
                    return value
        if p.required:
            at = f" ({where})" if where else ""
            raise ConfigError(
                f"{self.source}: no value of {p.name!r} applies to tensor {tensor_name!r}{at}; "
                "add a setting without a filter as a fallback"
            )
        return p.default
