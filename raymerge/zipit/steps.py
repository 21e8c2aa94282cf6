"""The data stage's steps as the driver sees them: items, payloads, folds, the artifact.

Per pass (a window of layers):
1. **forward**, one item per calibration block: the worker runs every model through the
   window and writes each layer's features as fixed column tiles (and the hidden states the
   next pass starts from) under `_raymerge/zipit/`; it returns the token count, Σx and
   the files' references.
2. **Σxxᵀ tiles**, one item per band of row tiles of a layer's group: the worker reads the
   band's feature tiles of every block, adds each tile's product over the blocks in block
   order, writes the tiles and returns their references (and the diagonal tiles' diagonals).
3. **matching**, one item per layer and matched group: the worker reads the tiles it needs,
   correlates and matches on its device, and returns the small result (the residual
   stream's share is a file: it is summed over every layer at the end).
The driver folds results in item order, keeps only references and small sums, and deletes
each pass's features (and tiles nobody needs later) before the next pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.datastage import StageItem
from raymerge.zipit import store
from raymerge.zipit.budget import match_bytes, width
from raymerge.zipit.shape import LlamaShape, role_of
from raymerge.zipit.tiles import Grid, bands, needed

REGMEAN_GROUPS = ("attn_in", "heads", "mlp_in", "mlp")  # the inputs of every linear layer
# the Gram matrix each linear role's RegMean solve uses (its input features)
INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
               "o_proj": "heads", "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp"}
VERIFY_BYTES = 1 << 30  # stored files one verify item rereads


def shape_of(settings: dict) -> LlamaShape:
    return LlamaShape.from_dict(settings["shape"])


def grid(settings: dict, group: str) -> Grid:
    return Grid(settings["models"], width(shape_of(settings), group), settings["tile"])


def window(state: dict) -> range:
    settings = state["settings"]
    lo = state["pass"] * settings["window"]
    return range(lo, min(settings["shape"]["layers"], lo + settings["window"]))


def _per_layer(state: dict, key: str, layer: int) -> dict:
    return state.setdefault(key, {}).setdefault(layer, {})


def start(state: dict) -> None:
    """A fresh gathering: whatever an unfinished one left under the stage's folder goes."""
    state["destination"].remove(store.FOLDER)


# step 1: the forward, one item per block of calibration sequences


def block_items(state: dict) -> list[StageItem]:
    if "blocks" not in state:  # the blocks of what the plan read (and fingerprinted)
        work = _forward_work(state["settings"])
        state["blocks"] = [StageItem(f"calibration-{i:05d}", block.nbytes, block,
                                     work * block.size)
                           for i, block in enumerate(state["data"].blocks())]  # fmt: skip
    return state["blocks"]


def _forward_work(settings: dict) -> float:
    """Floating-point operations one token costs a pass: every model's layer forward."""
    shape = shape_of(settings)
    params = (2 * shape.hidden * (shape.heads + shape.kv_heads) * shape.head_dim
              + 3 * shape.hidden * shape.intermediate)  # fmt: skip
    return 2.0 * settings["window"] * settings["models"] * params


def block_payload(item: StageItem, state: dict) -> dict:
    settings, layers = state["settings"], window(state)
    return {"shape": settings["shape"], "groups": settings["groups"],
            "models": settings["models"], "tile": settings["tile"],
            "layers": (layers.start, layers.stop), "block": int(item.key.rsplit("-", 1)[1]),
            "hidden": state.get("hidden", {}).get(item.key)}  # fmt: skip


def fold_block(state: dict, position: int, item: StageItem, result: dict) -> None:
    """Σx and counts added in block order; the files' references kept."""
    for layer, groups in result["totals"].items():
        sums = _per_layer(state, "totals", int(layer))
        for group, total in groups.items():
            if group not in sums:
                sums[group] = [result["count"], np.array(total)]  # Ray gives read-only views
            else:
                sums[group][0] += result["count"]
                sums[group][1] += total
    for layer, groups in result["features"].items():
        for group, refs in groups.items():
            _per_layer(state, "features", int(layer)).setdefault(group, []).append(refs)
    state.setdefault("next_hidden", {})[item.key] = result["hidden"]


# step 2: Σxxᵀ tiles, one item per band of row tiles of a layer's group


def gram_items(state: dict) -> list[StageItem]:
    settings, items = state["settings"], []
    tokens = sum(item.data.size for item in state["blocks"])
    for layer in window(state):
        for group in settings["groups"]:
            layout = grid(settings, group)
            spans = layout.spans
            pairs = needed(layout, settings["needs"][group])
            for number, band in enumerate(bands(pairs, settings["band_tiles"][group])):
                products = sum((spans[i][1] - spans[i][0]) * (spans[j][1] - spans[j][0])
                               for i, j in band)  # fmt: skip
                items.append(StageItem(f"gram-{group}-{layer:05d}-{number:04d}", products * 8,
                                       (layer, group, band), 2.0 * tokens * products))
    return items


def gram_payload(item: StageItem, state: dict) -> dict:
    layer, group, band = item.data
    keep = state["settings"]["regmean"] and group in REGMEAN_GROUPS
    owner = grid(state["settings"], group).owner
    names = [store.path("grams" if keep and owner[i] == owner[j] else "sums",
                        f"L{layer:05d}", f"{group}-{i:04d}-{j:04d}.npy") for i, j in band]
    return {"pairs": band, "names": names, "spans": grid(state["settings"], group).spans,
            "features": state["features"][layer][group]}  # fmt: skip


def fold_gram(state: dict, position: int, item: StageItem, result: dict) -> None:
    layer, group, _ = item.data
    _per_layer(state, "tiles", layer).setdefault(group, {}).update(result["tiles"])
    diagonals = _per_layer(state, "diagonals", layer).setdefault(group, {})
    diagonals.update({int(k): np.array(v) for k, v in result["diagonals"].items()})


# step 3: matching, one item per layer and matched group


def match_items(state: dict) -> list[StageItem]:
    settings = state["settings"]
    shape = shape_of(settings)
    return [StageItem(f"match-{group}-{layer:05d}", match_bytes(shape, settings, group),
                      (group, layer), _match_work(settings, group))
            for layer in window(state) for group in settings["matched"]]  # fmt: skip


def _match_work(settings: dict, group: str) -> float:
    """A generous count of the operations matching a group costs (its item's deadline
    grows with it): the zip touches O(F) entries per merge and rescans rows it loses, an
    assignment of n features is rarely near its O(n³) bound."""
    n, models = width(shape_of(settings), group), settings["models"]
    if group == "mlp" and settings["matcher"] == "zip":
        return 500.0 * (models * n) ** 2
    return 500.0 * (models - 1) * n * n


def match_payload(item: StageItem, state: dict) -> dict:
    group, layer = item.data
    settings = state["settings"]
    count, total = state["totals"][layer][group]
    diagonals = state["diagonals"][layer][group]
    keys = ("matcher", "alpha", "beta", "shape", "models", "tile")
    return {k: settings[k] for k in keys} | {
        "group": group, "count": count, "total": total,
        "diagonal": np.concatenate([diagonals[i] for i in sorted(diagonals)]),
        "tiles": state["tiles"][layer][group],
        "residual": store.path("residual", f"L{layer:05d}.npy"),
    }  # fmt: skip


def fold_match(state: dict, position: int, item: StageItem, result: Any) -> None:
    group, layer = item.data
    if group == "residual":  # a file: summed over every layer at the end, in layer order
        state.setdefault("residual", {})[layer] = result
    else:
        state.setdefault("matches", {})[f"{group}/{layer}"] = result


def end_pass(state: dict) -> None:
    """Keep the references of RegMean's Gram tiles; delete the pass's features, the hidden
    states it started from and the tiles only matching needed."""
    settings, destination = state["settings"], state["destination"]
    layers = window(state)
    if settings["regmean"]:
        grams = state.setdefault("grams", {})
        for layer in layers:
            for group in REGMEAN_GROUPS:
                owner = grid(settings, group).owner
                tiles = state["tiles"][layer][group]
                grams[f"{group}/{layer}"] = {
                    "count": state["totals"][layer][group][0],
                    "width": width(shape_of(settings), group), "tile": settings["tile"],
                    "models": settings["models"],
                    "tiles": {k: ref for k, ref in tiles.items()
                              if owner[int(k.split("-")[0])] == owner[int(k.split("-")[1])]},
                }  # fmt: skip
    for folder in ("features", "sums", f"hidden/L{layers.start:05d}"):
        destination.remove(store.path(folder))
    state["hidden"] = state.pop("next_hidden", {})
    for key in ("totals", "features", "tiles", "diagonals"):
        state.pop(key, None)


def carry(state: dict) -> dict:
    """What the next passes need of a finished one (stored: a stopped run resumes there):
    the hidden states they start from, the matches so far, each layer's residual share and
    RegMean's Gram tiles, all as references to files or small arrays."""
    return {"window": state["settings"]["window"], "hidden": state.get("hidden", {}),
            "matches": state.get("matches", {}),
            "residual": sorted(state.get("residual", {}).items()),
            "grams": state.get("grams", {})}  # fmt: skip


def resume(state: dict, carried: dict) -> None:
    """A stored pass put back (read whole first: one of another shape changes nothing;
    passes of another width of layers are not ours)."""
    if carried["window"] != state["settings"]["window"]:
        raise ValueError("stored passes of another window of layers")
    hidden, matches = dict(carried["hidden"]), dict(carried["matches"])
    residual = {int(layer): ref for layer, ref in carried["residual"]}
    grams = dict(carried["grams"])
    state |= {"hidden": hidden, "matches": matches, "residual": residual}
    if grams:
        state["grams"] = grams


# final step: the residual permutation, from every layer's scores


def residual_items(state: dict) -> list[StageItem]:
    files = state.get("residual", {})
    if not files:
        return []
    return [StageItem("match-residual", sum(f["nbytes"] for f in files.values()),
                      ("residual", None))]  # fmt: skip


def residual_payload(item: StageItem, state: dict) -> list[dict]:
    return [state["residual"][layer] for layer in sorted(state["residual"])]


def fold_residual(state: dict, position: int, item: StageItem, result: np.ndarray) -> None:
    state.setdefault("matches", {})["residual"] = result
    state["destination"].remove(store.path("residual"))


# resuming: the stored files reread on the workers


def verify_items(state: dict) -> list[StageItem]:
    items, chunk, size = [], [], 0
    for ref in _references(state["artifact"]):
        chunk.append(ref)
        size += ref["nbytes"]
        if size >= VERIFY_BYTES:
            items.append(StageItem(f"verify-{len(items):05d}", size, chunk))
            chunk, size = [], 0
    if chunk:
        items.append(StageItem(f"verify-{len(items):05d}", size, chunk))
    return items


def _references(value: Any) -> list[dict]:
    """Every file reference (store.write's) in a stored artifact or pass."""
    if store.is_ref(value):
        return [value]
    if isinstance(value, dict):
        return [ref for v in value.values() for ref in _references(v)]
    if isinstance(value, list):
        return [ref for v in value for ref in _references(v)]
    return []


def verify_payload(item: StageItem, state: dict) -> None:
    return None


def fold_verify(state: dict, position: int, item: StageItem, result: list[str]) -> None:
    state["damaged"].extend(result)


# the artifact, and each tensor's facts


def artifact(state: dict) -> dict:
    stored: dict[str, Any] = {"settings": state["settings"], "matches": state.get("matches", {})}
    if state["settings"]["regmean"]:
        stored["grams"] = state["grams"]
    return stored


def facts(stored: dict, tensor, root: str) -> dict | None:
    """What one tensor's merge needs: its role, the model's shape and combine settings,
    the residual permutation, its layer's matches, and where its Gram tiles are."""
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
            found["grams"] = {"store": root} | stored["grams"][f"{INPUT_GROUP[role]}/{layer}"]
    return found
