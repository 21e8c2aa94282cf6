"""ZipIt's data stage: calibration statistics gathered across actors, then matching per layer.

The plan side lives here: the settings, the checks, the memory each step needs (refused
at plan time when it cannot fit --worker-memory) and the stage's declaration. The steps
are in steps.py (the driver: items, folds, artifact, facts) and work.py (the workers).

Nothing large passes through Ray or the JSON artifact: features, hidden states, Σxxᵀ
tiles and RegMean's Gram matrices are .npy files under `_raymerge/zipit/` (store.py), the
sums are cut into fixed tiles (tiles.py) so any band size and any worker count give the
same bytes, and matching runs in torch on the worker's device (match_torch.py).
"""

from __future__ import annotations

from typing import Any

from raymerge.datastage import DataStage, DataStep, StagePlan
from raymerge.dtypes import itemsize
from raymerge.errors import ConfigError
from raymerge.sizes import human
from raymerge.zipit import budget, calibration, steps, work
from raymerge.zipit.shape import LlamaShape, role_of
from raymerge.zipit.steps import REGMEAN_GROUPS
from raymerge.zipit.tiles import TILE

NAME = "zipit"
# the feature group each `match:` choice matches on
MATCHED_GROUP = {"mlp": "mlp", "attention": "heads"}
# features one pass writes under the output: a pass covers as many layers as keep them
# (every gathered group, all models side by side, fp32, over all calibration tokens) within
PASS_BYTES = 4 << 30
BAND_TILES = 4  # row tiles of Σxxᵀ per item at most (more items: more workers busy)


def settings_of(method: str, shared: dict[str, Any]) -> dict[str, Any]:
    """The stage's settings from a tensor's resolved parameters (one method's names)."""
    matcher = {"zipit": "zip", "permute": "permute"}.get(method)
    regmean = method == "regmean" or shared.get("combine") == "regmean"
    return {
        "matcher": matcher,
        "alpha": shared.get("alpha") if matcher == "zip" else None,
        "beta": shared.get("beta") if matcher == "zip" else None,
        "match": list(shared.get("match", ())) if matcher else [],
        "residual": shared.get("residual", "average") if matcher else "average",
        "regmean": regmean,
        "regmean_alpha": (shared["alpha"] if method == "regmean" else shared.get("regmean_alpha"))
        if regmean else None,
        "calibration": shared["calibration"],
        "tokens": shared["calibration_tokens"],
        "sequence_length": shared["sequence_length"],
    }  # fmt: skip


def plan(spec, checkpoints: list, tensors: list, worker_memory: int | None = None) -> StagePlan:
    """Check everything the stage will need before Ray starts: one setting for the whole
    model, Llama-layout tensors, the same shape in every model, readable calibration data,
    and a worker memory (`worker_memory`, None: unbounded) that holds each step's item."""
    merged = [t for t in tensors if t.op == "merge"]
    if not merged:
        raise ConfigError(f"{spec.source}: {spec.method.name} found no tensor to merge")
    if spec.uses_slices:
        raise ConfigError(
            f"{spec.source}: {spec.method.name} merges whole models; use `models:`, not `slices:`"
        )
    settings = _one_setting(spec, merged)
    positions = [s.input for s in merged[0].sources]
    shape = _common_shape(spec, [checkpoints[i] for i in positions])
    for tensor in merged:
        if role_of(tensor.name) is None:
            raise ConfigError(
                f"{spec.source}: {spec.method.name} knows the tensors of Llama-layout decoders; "
                f"{tensor.name!r} is not one of them"
            )
    path = calibration.resolve(settings["calibration"], spec.source)
    data = calibration.load(path, settings["tokens"], settings["sequence_length"], shape.vocab,
                            checkpoints[positions[0]])  # fmt: skip
    settings |= {"calibration": path, "fingerprint": data.fingerprint,
                 "shape": shape.to_dict(), "models": len(positions)}  # fmt: skip
    settings |= _layout(settings, shape, len(data.sequences))
    block_tokens = int(data.blocks()[0].size)
    settings["band_tiles"] = {
        g: budget.widest_band(shape, settings, g, block_tokens, worker_memory, BAND_TILES)
        for g in settings["groups"]
    }
    weight_bytes = max(itemsize(s.dtype) for t in merged for s in t.sources)
    needs = budget.stage_bytes(shape, settings, block_tokens, weight_bytes)
    label, most = max(needs.items(), key=lambda kv: kv[1])
    if worker_memory is not None and most > worker_memory:
        raise ConfigError(
            f"{spec.method.name}: {label} needs {human(most)} per worker, more than "
            f"--worker-memory {human(worker_memory)}; raise --worker-memory to at least "
            f"{human(most)} (and run fewer workers per node if memory is short)"
        )
    return StagePlan(data.fingerprint, _summary(spec, settings, shape, data, (label, most)),
                     settings, data, most)  # fmt: skip


def _summary(spec, settings: dict, shape: LlamaShape, data, largest: tuple) -> str:
    what = ", ".join(settings["match"]) or "nothing"
    window = settings["window"]
    return (
        f"prepare: {spec.method.name} statistics over {len(data.sequences)} sequences of "
        f"{settings['sequence_length']} tokens ({len(data.blocks())} blocks) through "
        f"{shape.layers} layers of {settings['models']} models"
        + (f" in passes of {window} layer{'s' * (window > 1)}" if window < shape.layers else "")
        + (f"; matching {what} per layer, residual {settings['residual']}"
           if settings["matcher"] else "")
        + ("; RegMean Gram matrices" if settings["regmean"] else "")
        + f"\nprepare memory per worker: at most {human(largest[1])} of data ({largest[0]})"
    )  # fmt: skip


def _one_setting(spec, merged: list) -> dict[str, Any]:
    first = settings_of(spec.method.name, merged[0].shared)
    for tensor in merged[1:]:
        if settings_of(spec.method.name, tensor.shared) != first:
            raise ConfigError(
                f"{spec.source}: {spec.method.name}'s parameters hold for the whole model, but "
                f"{tensor.name!r} gets other values than {merged[0].name!r}; give them once, "
                "without filters or gradients"
            )
    return first


def _common_shape(spec, checkpoints: list) -> LlamaShape:
    shapes = []
    for checkpoint in checkpoints:
        where = f"{checkpoint.source.root}/config.json"
        config = checkpoint.read_json("config.json")
        if config is None:
            raise ConfigError(
                f"{spec.method.name} needs each model's config.json; {where} is missing"
            )
        try:
            shapes.append(LlamaShape.from_config(config))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    for checkpoint, shape in zip(checkpoints[1:], shapes[1:]):
        if shape != shapes[0]:
            raise ConfigError(
                f"{spec.method.name} merges models of one shape; {checkpoint.source.root} is "
                f"{shape.describe()}, {checkpoints[0].source.root} is {shapes[0].describe()}"
            )
    return shapes[0]


def _layout(settings: dict, shape: LlamaShape, sequences: int) -> dict:
    """What is gathered and how it is cut: the groups, which of them are matched, the
    Σxxᵀ tiles each group needs, the tile size and the layers per pass."""
    matched = [MATCHED_GROUP[m] for m in settings["match"]]
    if settings["residual"] == "permute":
        matched.append("residual")
    needs: dict[str, set] = {}
    for group in matched:
        zipped = group == "mlp" and settings["matcher"] == "zip"
        needs.setdefault(group, set()).add("all" if zipped else "cross")
    if settings["regmean"]:
        for group in REGMEAN_GROUPS:
            needs.setdefault(group, set()).add("within")
    groups = sorted(needs)
    tokens = sequences * settings["sequence_length"]
    per_layer = sum(settings["models"] * budget.width(shape, g) for g in groups) * tokens * 4
    return {"groups": groups, "matched": matched, "tile": TILE,
            "needs": {g: sorted(kinds) for g, kinds in needs.items()},
            "window": max(1, min(shape.layers, PASS_BYTES // max(1, per_layer)))}  # fmt: skip


def _passes(settings: dict) -> int:
    return -(-settings["shape"]["layers"] // settings["window"])


STAGE = DataStage(
    name=NAME,
    plan=plan,
    steps=(
        DataStep("statistics: the layer forward over the calibration blocks",
                 steps.block_items, work.gather_block, steps.fold_block, steps.block_payload),
        DataStep("statistics: Σxxᵀ tiles", steps.gram_items, work.gram_band, steps.fold_gram,
                 steps.gram_payload),
        DataStep("matching per layer", steps.match_items, work.match_group, steps.fold_match,
                 steps.match_payload),
    ),
    artifact=steps.artifact,
    facts=steps.facts,
    passes=_passes,
    end_pass=steps.end_pass,
    final=(DataStep("the residual permutation", steps.residual_items, work.assign_residual,
                    steps.fold_residual, steps.residual_payload),),
    start=steps.start,
    carry=steps.carry,
    resume=steps.resume,
    verify=DataStep("checking the stored Gram matrices", steps.verify_items, work.verify_files,
                    steps.fold_verify, steps.verify_payload),
)  # fmt: skip
