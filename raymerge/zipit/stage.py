"""ZipIt's data stage: calibration statistics gathered across actors, then matching per layer.

Step 1 maps over fixed blocks of calibration sequences: a worker runs every model layer by
layer on the block (one layer's weights in memory at a time) and returns, per layer and per
feature group, the token count, Σx and Σxxᵀ in fp64 over the models' features side by side.
The driver adds the blocks up in block order, so any worker count gives the same sums.
Step 2 maps over layers: a worker turns a layer's sums into correlations and matches them
(ZipIt's greedy zip or permute's assignment for MLP neurons, whole heads for attention, one
permutation of the residual stream for the whole model). The artifact holds the matches and,
for RegMean, each model's input Gram matrices; `facts` hands each tensor what it needs.

The driver side (plan, items, fold, artifact, facts) imports neither torch nor the forward.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.datastage import DataStage, DataStep, StageItem, StagePlan
from raymerge.errors import ConfigError
from raymerge.zipit import calibration
from raymerge.zipit.shape import EMBED, LlamaShape, layer_tensor_names, role_of

NAME = "zipit"
REGMEAN_GROUPS = ("attn_in", "heads", "mlp_in", "mlp")  # the inputs of every linear layer
# the feature group each `match:` choice matches on
MATCHED_GROUP = {"mlp": "mlp", "attention": "heads"}
# what one statistics item may return: a pass covers as many layers as keep its sums (fp64
# Σxxᵀ of every gathered group, for all models side by side) within this
RESULT_BYTES = 1 << 30
# the Gram matrix each linear role's RegMean solve uses (its input features)
INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
               "o_proj": "heads", "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp"}


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


def plan(spec, checkpoints: list, tensors: list) -> StagePlan:
    """Check everything the stage will need before Ray starts: one setting for the whole
    model, Llama-layout tensors, the same shape in every model, readable calibration data."""
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
                 "shape": shape.to_dict(), "models": len(positions),
                 "window": layer_window(shape, _groups(settings), len(positions))}  # fmt: skip
    what = ", ".join(settings["match"]) or "nothing"
    summary = (
        f"prepare: {spec.method.name} statistics over {len(data.sequences)} sequences of "
        f"{settings['sequence_length']} tokens ({len(data.blocks())} blocks) through "
        f"{shape.layers} layers of {len(positions)} models"
        + (f" in passes of {settings['window']} layer{'s' * (settings['window'] > 1)}"
           if settings["window"] < shape.layers else "")
        + (f"; matching {what} per layer, residual {settings['residual']}"
           if settings["matcher"] else "")
        + ("; RegMean Gram matrices" if settings["regmean"] else "")
    )  # fmt: skip
    return StagePlan(data.fingerprint, summary, settings, data)


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


def _groups(settings: dict) -> list[str]:
    groups = {MATCHED_GROUP[m] for m in settings["match"]}
    if settings["residual"] == "permute":
        groups.add("residual")
    if settings["regmean"]:
        groups.update(REGMEAN_GROUPS)
    return sorted(groups)


# step 1: statistics, one item per block of calibration sequences and window of layers


def _width(shape: LlamaShape, group: str) -> int:
    """Features of one model in a group: MLP neurons, head outputs, or the hidden size."""
    return {"mlp": shape.intermediate, "heads": shape.heads * shape.head_dim}.get(
        group, shape.hidden
    )


def layer_window(shape: LlamaShape, groups: list[str], models: int) -> int:
    """Layers per pass: as many as keep one item's sums within RESULT_BYTES (at least one)."""
    per_layer = sum((models * _width(shape, g)) ** 2 * 8 for g in groups)
    return max(1, min(shape.layers, RESULT_BYTES // max(1, per_layer)))


def _passes(settings: dict) -> int:
    return -(-settings["shape"]["layers"] // settings["window"])


def _window(state: dict) -> tuple[int, int]:
    settings = state["settings"]
    lo = state["pass"] * settings["window"]
    return lo, min(settings["shape"]["layers"], lo + settings["window"])


def _block_items(state: dict) -> list[StageItem]:
    if "blocks" not in state:  # the blocks of what the plan read (and fingerprinted)
        work = _work_per_token(state["settings"])
        state["blocks"] = [StageItem(f"calibration-{i:05d}", block.nbytes, block,
                                     work * block.size)
                           for i, block in enumerate(state["data"].blocks())]  # fmt: skip
    return state["blocks"]


def _work_per_token(settings: dict) -> float:
    """Floating-point operations one token costs a pass: every model's layer forward and
    the Σxxᵀ of the groups gathered (the pool's deadline for an item grows with them)."""
    shape = LlamaShape.from_dict(settings["shape"])
    models, hd = settings["models"], shape.head_dim
    params = (2 * shape.hidden * (shape.heads + shape.kv_heads) * hd
              + 3 * shape.hidden * shape.intermediate)  # fmt: skip
    sums = sum((models * _width(shape, g)) ** 2 for g in _groups(settings))
    return 2.0 * settings["window"] * (models * params + sums)


def _block_payload(item: StageItem, state: dict) -> dict:
    settings = state["settings"]
    return {"shape": settings["shape"], "groups": _groups(settings), "models": settings["models"],
            "layers": _window(state), "hidden": state.get("hidden", {}).get(item.key)}  # fmt: skip


def gather_block(runner, item: StageItem, data: dict) -> dict:
    """Worker: run every model over one block through the pass's layers (from the hidden
    states the previous pass left, or the embeddings); per layer and group, the sums
    (count, Σx, Σxxᵀ) over the models' features side by side (model 0's first), and the
    hidden states for the next pass."""
    from raymerge.lazy import torch
    from raymerge.zipit import forward

    shape = LlamaShape.from_dict(data["shape"])
    tokens = torch.from_numpy(np.asarray(item.data, dtype=np.int64)).to(runner.device)
    rope = forward.rope_tables(shape, tokens.shape[1], runner.device)
    models = range(data["models"])
    if data["hidden"] is None:
        hidden = [forward.embed(runner.read_input(EMBED, m), tokens) for m in models]
    else:
        hidden = [torch.from_numpy(np.array(h)).to(runner.device) for h in data["hidden"]]
    lo, hi = data["layers"]
    sums = {}
    for layer in range(lo, hi):
        names = layer_tensor_names(layer)
        features = []
        for m in models:
            weights = {role: runner.read_input(name, m) for role, name in names.items()}
            hidden[m], found = forward.layer_forward(shape, weights, hidden[m], rope)
            features.append({g: found[g] for g in data["groups"]})
            del weights, found
        sums[layer] = {g: _sums(torch.cat([f[g] for f in features], dim=1))
                       for g in data["groups"]}  # fmt: skip
    last = hi == shape.layers
    return {"sums": sums, "hidden": None if last else [h.cpu().numpy() for h in hidden]}


def _sums(features) -> tuple[int, np.ndarray, np.ndarray]:
    wide = features.double()
    return int(wide.shape[0]), wide.sum(0).cpu().numpy(), (wide.T @ wide).cpu().numpy()


def _fold_sums(state: dict, position: int, item: StageItem, result: dict) -> None:
    total = state.setdefault("sums", {})
    for layer, groups in result["sums"].items():
        mine = total.setdefault(int(layer), {})
        for group, (count, first, second) in groups.items():
            if group not in mine:
                mine[group] = [count, first.copy(), second.copy()]  # Ray gives read-only views
            else:
                held = mine[group]
                held[0] += count
                held[1] += first
                held[2] += second
    state.setdefault("hidden", {})[item.key] = result["hidden"]


# step 2: matching, one item per layer and feature group of the pass


def _match_items(state: dict) -> list[StageItem]:
    settings = state["settings"]
    if settings["matcher"] is None:
        return []
    groups = [MATCHED_GROUP[choice] for choice in settings["match"]]
    if settings["residual"] == "permute":
        groups.append("residual")
    items = []
    for layer in sorted(state["sums"]):
        for group in groups:
            width = state["sums"][layer][group][1].size
            items.append(StageItem(f"match-{group}-{layer:05d}", width * width * 8, (group, layer)))
    return items


def _match_payload(item: StageItem, state: dict) -> dict:
    group, layer = item.data
    keys = ("matcher", "alpha", "beta", "shape", "models")
    return {"sums": state["sums"][layer][group]} | {k: state["settings"][k] for k in keys}


def match_item(runner, item: StageItem, data: dict) -> np.ndarray:
    """Worker: a layer's correlations, matched (cluster ids, or head orders one row per
    model), or for the residual stream this layer's share of the assignment's scores."""
    from raymerge.zipit import match

    group, _ = item.data
    models, shape = data["models"], LlamaShape.from_dict(data["shape"])
    corr = match.correlation(*data["sums"])
    if group == "residual":
        return match.residual_cross(corr, models)
    if group == "heads":
        return np.stack(match.match_heads(corr, models, shape.heads, shape.kv_heads,
                                          shape.head_dim))  # fmt: skip
    if data["matcher"] == "zip":
        return match.zip_clusters(corr, models, data["alpha"], data["beta"])
    return match.permute_clusters(corr, models)


def _fold_match(state: dict, position: int, item: StageItem, result: np.ndarray) -> None:
    group, layer = item.data
    if group == "residual":  # summed over layers, in layer order
        held = state.get("residual_scores")
        state["residual_scores"] = result.copy() if held is None else held + result
    else:
        state.setdefault("matches", {})[f"{group}/{layer}"] = result


def _end_pass(state: dict) -> None:
    """Keep what the artifact needs of this pass's sums (RegMean's Gram matrices), drop
    the rest: the next pass's sums take their place."""
    settings = state["settings"]
    if settings["regmean"]:
        grams = state.setdefault("grams", {})
        for layer, groups in state["sums"].items():
            for group in REGMEAN_GROUPS:
                grams[f"{group}/{layer}"] = _grams(groups[group], settings["models"])
    state["sums"] = {}


# final step: the residual permutation, from every layer's scores


def _residual_items(state: dict) -> list[StageItem]:
    if state.get("residual_scores") is None:
        return []
    return [StageItem("match-residual", state["residual_scores"].nbytes, ("residual", None))]


def _residual_payload(item: StageItem, state: dict) -> np.ndarray:
    return state["residual_scores"]


def assign_residual(runner, item: StageItem, scores: np.ndarray) -> np.ndarray:
    from raymerge.zipit import match

    return np.stack(match.residual_assignment(np.asarray(scores)))


def _fold_residual(state: dict, position: int, item: StageItem, result: np.ndarray) -> None:
    state.setdefault("matches", {})["residual"] = result


# the artifact, and each tensor's facts


def artifact(state: dict) -> dict:
    stored: dict[str, Any] = {"settings": state["settings"], "matches": state.get("matches", {})}
    if state["settings"]["regmean"]:
        stored["grams"] = state["grams"]
    return stored


def _grams(sums: list, models: int) -> np.ndarray:
    """Each model's uncentered input Gram matrix (Σxxᵀ / tokens), [models, n, n]."""
    count, _, outer = sums
    n = outer.shape[0] // models
    return np.stack([outer[m * n : (m + 1) * n, m * n : (m + 1) * n] / count
                     for m in range(models)])  # fmt: skip


def facts(stored: dict, tensor) -> dict | None:
    """What one tensor's merge needs: its role, the model's shape and combine settings,
    the residual permutation, and its layer's matches and Gram matrices."""
    layer, role = role_of(tensor.name)
    settings, matches = stored["settings"], stored["matches"]
    found = {
        "role": role,
        "shape": settings["shape"],
        "regmean_alpha": settings["regmean_alpha"] if settings["regmean"] else None,
        "residual": matches.get("residual"),
        "clusters": None,
        "heads": None,
        "grams": None,
    }
    if layer is not None:
        found["clusters"] = matches.get(f"mlp/{layer}")
        found["heads"] = matches.get(f"heads/{layer}")
        if settings["regmean"] and role in INPUT_GROUP:
            found["grams"] = stored["grams"][f"{INPUT_GROUP[role]}/{layer}"]
    return found


STAGE = DataStage(
    name=NAME,
    plan=plan,
    steps=(
        DataStep("statistics over the calibration blocks", _block_items, gather_block,
                 _fold_sums, _block_payload),
        DataStep("matching per layer", _match_items, match_item, _fold_match, _match_payload),
    ),  # fmt: skip
    artifact=artifact,
    facts=facts,
    passes=_passes,
    end_pass=_end_pass,
    final=(DataStep("the residual permutation", _residual_items, assign_residual,
                    _fold_residual, _residual_payload),),  # fmt: skip
)
