"""Which input tensors make each output tensor: layers, slices, vocabularies.

A tensor inside a layer (`...layers.N....`) belongs to that layer; the output's layers are
the slices' layers, renumbered consecutively (a `models:` config is one slice over all
layers, so nothing moves). Tensors outside the layers come from the first slice's sources
when their name says `embed`, from the last slice's otherwise (mergekit's pre- and
post-weights). With `tokenizer_source: base`, embedding and lm_head rows are cut or padded
to the base model's vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from raymerge.checkpoint import Checkpoint
from raymerge.dtypes import FP8_DTYPES
from raymerge.errors import CheckpointError, ConfigError, shown
from raymerge.safetensors_format import TensorEntry
from raymerge.spec import MergeSpec, OutputSlice

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")
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
                "cut or pad every model's rows to the base model's vocabulary"
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
