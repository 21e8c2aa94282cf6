"""Which input tensors make each output tensor: layers, slices, vocabularies.

A tensor inside a layer (`...layers.N....`) belongs to that layer; the output's layers are
the slices' layers, renumbered consecutively (a `models:` config is one slice over all
layers, so nothing moves). Tensors outside the layers come from the first slice's sources
when their name says `embed`, from the last slice's otherwise (mergekit's pre- and
post-weights). With `tokenizer_source: base`, embedding and lm_head rows are cut or padded
to the base model's vocabulary; with a vocabulary matched by token string (`tokenizer_source:
union`, `tokenizer.tokens`, `tokenizer.pad_to_multiple_of`), each input's rows are mapped to
the output vocabulary's rows by token (`vocab_row_maps`), missing rows filled as mergekit's
PermutedEmbeddings fills them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raymerge.checkpoint import Checkpoint
from raymerge.dtypes import FLOAT_DTYPES, FP8_DTYPES
from raymerge.errors import CheckpointError, ConfigError, shown
from raymerge.safetensors_format import TensorEntry
from raymerge.spec import MergeSpec, OutputSlice, TokenSource

if TYPE_CHECKING:
    from raymerge.tokenizer import Vocabulary

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")
# matched by token string: these and the other token embeddings of mergekit's architectures
TOKEN_ROW_TENSORS = (*VOCAB_TENSORS, "word_embeddings.weight", "tok_embeddings.weight",
                     "embed_in.weight")  # fmt: skip
MAX_LAYERS = 100_000  # far above any real model; keeps a corrupt name from planning forever


@dataclass(frozen=True)
class TensorJob:
    """One output tensor and, per source of its slice, the input tensor it reads."""

    name: str
    slice_index: int
    layer: int | None  # output layer
    t: float  # position in its slice, for gradients: 0 outside the layers
    sources: tuple[tuple[int, str], ...]  # (input index, tensor name) per slice source


def natural_key(name: str) -> tuple:
    """Sort 'layers.10' after 'layers.9'."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def layer_of(name: str) -> int | None:
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def with_layer(name: str, layer: int) -> str:
    match = LAYER_PATTERN.search(name)
    assert match is not None
    return name[: match.start(1)] + str(layer) + name[match.end(1) :]


def layer_count(checkpoint: Checkpoint) -> int:
    """One more than the highest layer index among the tensors (the tensors are what a merge
    reads; config.json's num_hidden_layers is not trusted for this)."""
    return max(layer_tensors(checkpoint), default=-1) + 1


def layer_tensors(checkpoint: Checkpoint) -> dict[int, list[str]]:
    """The checkpoint's tensor names by layer index; refuses implausible layer indices."""
    by_layer: dict[int, list[str]] = {}
    for name in checkpoint.tensors:
        layer = layer_of(name)
        if layer is None:
            continue
        if layer >= MAX_LAYERS:
            raise CheckpointError(
                f"{checkpoint.uri}: tensor {shown(name)} is in layer {layer}; more than "
                f"{MAX_LAYERS} layers is not plausible: the checkpoint's header is corrupt"
            )
        by_layer.setdefault(layer, []).append(name)
    return by_layer


def map_tensors(spec: MergeSpec, checkpoints: list[Checkpoint]) -> tuple[list[TensorJob], int]:
    """Every output tensor's job, in natural name order, and the output's layer count."""
    if not spec.uses_slices:
        check_agreement(spec, checkpoints)
    jobs: list[TensorJob] = []
    offset = 0
    by_layer: dict[int, dict[int, list[str]]] = {}  # per input
    for index, out_slice in enumerate(spec.slices):
        length = _slice_length(spec, checkpoints, out_slice)
        if offset + length > MAX_LAYERS:
            raise ConfigError(
                f"{spec.source}: the slices give the output more than {MAX_LAYERS} layers; "
                "check the layer ranges"
            )
        ref_source = out_slice.sources[_reference_source(out_slice)]
        if ref_source.input not in by_layer:
            by_layer[ref_source.input] = layer_tensors(checkpoints[ref_source.input])
        ref_layers = by_layer[ref_source.input]
        first = _first_layer(ref_source)
        for ref_layer in sorted(k for k in ref_layers if first <= k < first + length):
            j = ref_layer - first
            t = j / (length - 1) if length > 1 else 1.0
            for name in ref_layers[ref_layer]:
                sources = tuple(
                    (s.input, with_layer(name, _first_layer(s) + j)) for s in out_slice.sources
                )
                jobs.append(TensorJob(with_layer(name, offset + j), index, offset + j, t, sources))
        offset += length
    jobs += _outside_layers(spec, checkpoints)
    _check_present(spec, checkpoints, jobs)
    return sorted(jobs, key=lambda job: natural_key(job.name)), offset


def _reference_source(out_slice: OutputSlice) -> int:
    return out_slice.base if out_slice.base is not None else 0


def _first_layer(source) -> int:
    return source.layer_range[0] if source.layer_range else 0


def _slice_length(spec: MergeSpec, checkpoints: list[Checkpoint], out_slice: OutputSlice) -> int:
    lengths = []
    for source in out_slice.sources:
        count = layer_count(checkpoints[source.input])
        if source.layer_range is None:
            lengths.append(count)
            continue
        start, end = source.layer_range
        if end > count:
            raise ConfigError(
                f"{spec.source}: {source.yaml_path}.layer_range [{start}, {end}] goes past "
                f"the {count} layers of {spec.inputs[source.input].given!r}"
            )
        lengths.append(end - start)
    if len(set(lengths)) > 1:
        raise ConfigError(
            f"{spec.source}: {out_slice.yaml_path}: its sources span different numbers of "
            f"layers ({lengths}); every source of a slice must give the same count"
        )
    return lengths[0] if lengths else 0


def _outside_layers(spec: MergeSpec, checkpoints: list[Checkpoint]) -> list[TensorJob]:
    jobs = []
    first, last = 0, len(spec.slices) - 1
    for index in sorted({first, last}):
        out_slice = spec.slices[index]
        reference = checkpoints[out_slice.sources[_reference_source(out_slice)].input]
        for name in reference.tensors:
            if layer_of(name) is not None:
                continue
            wanted = first if "embed" in name else last
            if wanted == index:
                sources = tuple((s.input, name) for s in out_slice.sources)
                jobs.append(TensorJob(name, index, None, 0.0, sources))
    return jobs


def _check_present(spec: MergeSpec, checkpoints: list[Checkpoint], jobs: list[TensorJob]) -> None:
    """Every input tensor a job reads exists, and is not FP8 (its scales would be lost)."""
    for job in jobs:
        for position, (input_index, name) in enumerate(job.sources):
            entry = checkpoints[input_index].tensors.get(name)
            if entry is not None and entry.dtype not in FP8_DTYPES:
                continue
            given = shown(spec.inputs[input_index].given)
            if entry is None:
                source = spec.slices[job.slice_index].sources[position]
                raise ConfigError(
                    f"{spec.source}: {source.yaml_path}: {given} has no tensor {shown(name)}, "
                    f"needed for the output's {shown(job.name)}; merge models of the same "
                    "architecture"
                )
            file = checkpoints[input_index].source.describe(entry.file)
            raise ConfigError(
                f"{given}: tensor {shown(name)} in {file} is FP8 ({entry.dtype}); FP8 "
                "checkpoints need their scale tensors applied, which raymerge does not "
                "support yet: merge the model's BF16/FP16 release, or dequantize it first"
            )


def check_agreement(spec: MergeSpec, checkpoints: list[Checkpoint]) -> None:
    """Whole models must hold the same tensor names; name the first that differs."""
    out_slice = spec.slices[0]
    ref_input = out_slice.sources[_reference_source(out_slice)].input
    ref, ref_label = checkpoints[ref_input], spec.inputs[ref_input].given
    for source in out_slice.sources:
        if source.input == ref_input:
            continue
        ckpt, label = checkpoints[source.input], spec.inputs[source.input].given
        only_ref = sorted(set(ref.tensors) - set(ckpt.tensors), key=natural_key)
        only_this = sorted(set(ckpt.tensors) - set(ref.tensors), key=natural_key)
        if only_ref or only_this:
            first = min(only_ref[:1] + only_this[:1], key=natural_key)
            has, lacks = (ref_label, label) if first in ref.tensors else (label, ref_label)
            count = len(only_ref) + len(only_this)
            raise ConfigError(
                f"models disagree: tensor {first!r} is in {has!r} but not in {lacks!r} "
                f"({count} tensor name(s) differ); merge models of the same architecture"
            )


def output_shape(spec: MergeSpec, checkpoints: list[Checkpoint], job: TensorJob) -> tuple[int, ...]:
    """The shape every source must give (vocab rows follow the base when resizing)."""
    entries = [checkpoints[i].tensors[name] for i, name in job.sources]
    out_slice = spec.slices[job.slice_index]
    reference = entries[_reference_source(out_slice)]
    labels = [spec.inputs[i].given for i, _ in job.sources]
    for entry, label in zip(entries, labels):
        if entry.shape == reference.shape:
            continue
        if _is_vocab_pair(job.name, reference, entry):
            if spec.resize_vocab and out_slice.base is not None:
                return entries[out_slice.base].shape
            raise ConfigError(
                f"vocabulary sizes differ: tensor {job.name!r} has shape {list(reference.shape)} "
                f"in {labels[_reference_source(out_slice)]!r} but {list(entry.shape)} in "
                f"{label!r}; set `tokenizer_source: base` (with the base among the inputs) to "
                "cut or pad every model's rows to the base model's vocabulary, or "
                "`tokenizer_source: union` to match rows by token string"
            )
        raise ConfigError(
            f"models disagree: tensor {job.name!r} has shape {list(reference.shape)} in "
            f"{labels[_reference_source(out_slice)]!r} but {list(entry.shape)} in {label!r}"
        )
    return reference.shape


def _is_vocab_pair(name: str, a: TensorEntry, b: TensorEntry) -> bool:
    return (
        name.endswith(VOCAB_TENSORS)
        and len(a.shape) == len(b.shape) == 2
        and a.shape[1] == b.shape[1]
    )


@dataclass(frozen=True)
class RowFill:
    """Output rows [out_start, out_start + count) of one input that its own rows do not give
    (rows matched by token string), filled as mergekit's PermutedEmbeddings fills them:
    `copy`: source `positions[0]`'s own rows (the token's donor, or the base); `mean`: the
    mean of `positions`' own rows; `zero`; `row`: stored rows of input `input` from byte
    `start` on (a `tokens:` override); `pad`: the mean of this input's rows [0, out_start)."""

    out_start: int
    count: int
    kind: str
    positions: tuple[int, ...] = ()
    input: int = -1
    file: str = ""
    dtype: str = ""
    start: int = 0


@dataclass(frozen=True)
class RowMap:
    """Where one input's rows of a vocabulary tensor come from: `runs` of
    (output row, stored row, count) it has, `fills` for the rest, both in output row order."""

    runs: tuple[tuple[int, int, int], ...]
    fills: tuple[RowFill, ...]


def is_token_rows(name: str, entries: list[TensorEntry]) -> bool:
    """An embedding or lm_head tensor whose rows are matched by token string."""
    return (
        layer_of(name) is None
        and name.endswith(TOKEN_ROW_TENSORS)
        and all(len(e.shape) == 2 for e in entries)
    )


def vocab_row_maps(
    spec: MergeSpec, checkpoints: list[Checkpoint], job: TensorJob, vocabulary: Vocabulary
) -> tuple[tuple[int, int], list[RowMap]] | None:
    """The output shape and each source's RowMap of a vocabulary tensor (None for others).

    Row r holds token t = vocabulary.tokens[r]. A source has t when its tokenizer gives t an
    id below its vocab_size and below this tensor's rows; then its row is its own, unless a
    `tokens:` entry with `force` says otherwise. A source without it takes t's default:
    the `tokens:` entry's source if there is one; else the row of the one source that has
    t; zero if none has it; the base's row if the base has it; else the mean of the rows of
    the sources that have it. Rows past the vocabulary (pad_to_multiple_of) take the mean of
    the source's own output rows."""
    entries = [checkpoints[i].tensors[name] for i, name in job.sources]
    if not is_token_rows(job.name, entries):
        return None
    labels = [shown(spec.inputs[i].given) for i, _ in job.sources]
    for entry, label in zip(entries, labels):
        if entry.shape[1] != entries[0].shape[1]:
            raise ConfigError(
                f"models disagree: tensor {job.name!r} has rows of {entries[0].shape[1]} in "
                f"{labels[0]} but {entry.shape[1]} in {label}"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise ConfigError(
                f"{label}: tensor {job.name!r} is {entry.dtype}; rows matched by token string "
                "must be floating point"
            )
    tokens = vocabulary.tokens
    base = spec.slices[job.slice_index].base  # else the config's base_model, as mergekit's
    if base is None:  # PermutedEmbeddings takes it whatever the method does with it
        base = next((p for p, (i, _) in enumerate(job.sources) if i == spec.base_input), None)
    own = [
        [row if (row := vocabulary.ids[i].get(t, -1)) < entry.shape[0] else -1 for t in tokens]
        for (i, _), entry in zip(job.sources, entries)
    ]
    overrides = {o.token: o for o in spec.vocab.tokens} if spec.vocab else {}
    count = len(entries)
    runs: list[list[list[int]]] = [[] for _ in entries]
    fills: list[list[RowFill]] = [[] for _ in entries]
    for r, token in enumerate(tokens):
        has = [own[p][r] >= 0 for p in range(count)]
        override = overrides.get(token)
        force = override is not None and override.force
        default = None
        for p in range(count):
            if has[p] and not force:
                _extend_run(runs[p], r, own[p][r])
                continue
            if default is None:
                default = (
                    _override_fill(spec, checkpoints, job, vocabulary, override, r)
                    if override is not None else _default_fill(has, base, r)
                )  # fmt: skip
            _extend_fill(fills[p], default)
    if vocabulary.rows > len(tokens):
        for p in range(count):
            fills[p].append(RowFill(len(tokens), vocabulary.rows - len(tokens), "pad"))
    maps = [RowMap(tuple((a, b, n) for a, b, n in r), tuple(f)) for r, f in zip(runs, fills)]
    return (vocabulary.rows, entries[0].shape[1]), maps


def _extend_run(runs: list[list[int]], out_row: int, src_row: int) -> None:
    if runs and runs[-1][0] + runs[-1][2] == out_row and runs[-1][1] + runs[-1][2] == src_row:
        runs[-1][2] += 1
    else:
        runs.append([out_row, src_row, 1])


def _extend_fill(fills: list[RowFill], fill: RowFill) -> None:
    """Append one row's fill, joining it to the previous one where it continues it (a `row`
    fill, one override token's row, stays alone)."""
    last = fills[-1] if fills else None
    if (
        last is not None
        and fill.kind != "row"
        and last.out_start + last.count == fill.out_start
        and (last.kind, last.positions) == (fill.kind, fill.positions)
    ):
        fills[-1] = RowFill(last.out_start, last.count + 1, last.kind, last.positions)
    else:
        fills.append(fill)


def _default_fill(has: list[bool], base: int | None, row: int) -> RowFill:
    present = tuple(p for p, h in enumerate(has) if h)
    if len(present) == 1:
        return RowFill(row, 1, "copy", present)
    if not present:
        return RowFill(row, 1, "zero")
    if base is not None and has[base]:
        return RowFill(row, 1, "copy", (base,))
    return RowFill(row, 1, "mean", present)


def _override_fill(
    spec: MergeSpec, checkpoints: list[Checkpoint], job: TensorJob, vocabulary: Vocabulary,
    override: TokenSource, row: int,
) -> RowFill:  # fmt: skip
    """A `tokens:` entry's row: zero, or a stored row of the model it names."""
    if override.kind == "zero":
        return RowFill(row, 1, "zero")
    model = override.input
    assert model is not None
    given = shown(spec.inputs[model].given)
    where = f"{spec.source}: tokenizer.tokens[{shown(override.token)}]"
    names = dict(job.sources)
    name = names.get(model, job.sources[0][1])
    entry = checkpoints[model].tensors.get(name)
    if entry is None or len(entry.shape) != 2:
        raise ConfigError(f"{where}: {given} has no 2-D tensor {shown(name)} to take a row from")
    if override.kind == "model":
        src = vocabulary.ids[model].get(override.token)
        if src is None or src >= entry.shape[0]:
            raise ConfigError(
                f"{where}: {given} has no token {shown(override.token)} (below its vocab_size, "
                f"with a row of {shown(name)}); name a model that has it, or use {{kind: "
                "model_token, model: ..., token: ...}"
            )
    else:
        src = override.source_id
        if src is None:
            src = vocabulary.all_ids[model].get(override.source_token or "")
            if src is None:
                raise ConfigError(
                    f"{where}: {given}'s tokenizer has no token {shown(override.source_token)}"
                )
        if src >= entry.shape[0]:
            raise ConfigError(
                f"{where}: token id {src} is out of range for {shown(name)} of {given} "
                f"({entry.shape[0]} rows)"
            )
    row_bytes = entry.nbytes // entry.shape[0]
    return RowFill(row, 1, "row", (), model, entry.file, entry.dtype, entry.start + src * row_bytes)
