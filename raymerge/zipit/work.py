"""The data stage's steps as a worker runs them (steps.py lists and folds them).

Each function gets the worker's UnitRunner (its device, its open inputs, the output's
Destination) and returns plain values and small numpy arrays; large arrays go to files
under the output (store.py) and only their references come back.
"""

from __future__ import annotations

import numpy as np

from raymerge.errors import MergeFailed
from raymerge.zipit import store
from raymerge.zipit.shape import EMBED, LlamaShape, layer_tensor_names


def _read(runner, ref: dict) -> np.ndarray:
    try:
        return store.read(store.reader(runner.context.destination), ref)
    except store.Damaged as exc:
        raise MergeFailed(
            f"{exc}; the stage's own files changed under it: rerun the same command"
        ) from None


def gather_block(runner, item, data: dict) -> dict:
    """Run every model over one block through the pass's layers (from the hidden states
    the previous pass left, or the embeddings); write each layer's features per group as
    column tiles, and the hidden states for the next pass. Returns the token count, Σx per
    layer and group (fp64) and the files' references."""
    from raymerge.lazy import torch
    from raymerge.zipit import forward

    shape = LlamaShape.from_dict(data["shape"])
    tokens = torch.from_numpy(np.asarray(item.data, dtype=np.int64)).to(runner.device)
    rope = forward.rope_tables(shape, tokens.shape[1], runner.device)
    models = range(data["models"])
    if data["hidden"] is None:
        hidden = [forward.embed(runner.read_input(EMBED, m), tokens) for m in models]
    else:
        stored = torch.from_numpy(_read(runner, data["hidden"]))
        hidden = [stored[m].to(runner.device) for m in models]
        del stored
    lo, hi = data["layers"]
    totals, features = {}, {}
    for layer in range(lo, hi):
        found = []
        for m in models:
            names = layer_tensor_names(layer)
            weights = {role: runner.read_input(name, m) for role, name in names.items()}
            hidden[m], mine = forward.layer_forward(shape, weights, hidden[m], rope)
            found.append({g: mine[g] for g in data["groups"]})
            del weights, mine
        totals[layer], features[layer] = {}, {}
        for group in data["groups"]:
            parts = [f.pop(group) for f in found]
            totals[layer][group], features[layer][group] = _write_tiles(
                runner, parts, data, f"L{layer:05d}", group
            )
            del parts
    next_hidden = None
    if hi < shape.layers:
        name = store.path("hidden", f"L{hi:05d}", f"b{data['block']:05d}.npy")
        next_hidden = store.write(runner.destination, name,
                                  torch.stack(hidden).cpu().numpy())  # fmt: skip
    return {"count": int(tokens.numel()), "totals": totals, "features": features,
            "hidden": next_hidden}  # fmt: skip


def _write_tiles(runner, parts: list, data: dict, layer: str, group: str):
    """One group's features of every model ([tokens, n] each), cut into the group's column
    tiles and written; Σx in fp64 (a tile's sum is the full sum's slice, bit for bit)."""
    from raymerge.zipit.tiles import Grid

    n = parts[0].shape[1]
    spans = Grid(len(parts), n, data["tile"]).spans
    totals, refs = [], []
    for k, (a, b) in enumerate(spans):
        model, lo = a // n, a % n
        tile = parts[model][:, lo : lo + (b - a)].contiguous()
        totals.append(tile.double().sum(0).cpu().numpy())
        name = store.path("features", layer, f"{group}-t{k:04d}-b{data['block']:05d}.npy")
        refs.append(store.write(runner.destination, name, tile.cpu().numpy()))
    return np.concatenate(totals), refs


def gram_band(runner, item, data: dict) -> dict:
    """Σ over the calibration blocks (in block order) of X_iᵀ X_j for the band's tiles
    (i, j), each product one fp64 gemm of two contiguous column tiles; written as files.
    Returns their references and the diagonal tiles' diagonals (each feature's Σx²)."""
    pairs = [tuple(p) for p in data["pairs"]]
    wanted = set(pairs)
    rows = sorted({i for i, _ in pairs})
    cols = sorted({j for _, j in pairs})
    sums: dict = {}
    for block in data["features"]:
        held = {i: _tile(runner, block[i]) for i in rows}
        for j in cols:
            column = held[j] if j in held else _tile(runner, block[j])
            for i in rows:
                if (i, j) in sums:
                    sums[(i, j)] += held[i].T @ column
                elif (i, j) in wanted:
                    sums[(i, j)] = held[i].T @ column
            del column
        del held
    tiles, diagonals = {}, {}
    for (i, j), name in zip(pairs, data["names"]):
        host = sums.pop((i, j)).cpu().numpy()
        tiles[f"{i}-{j}"] = store.write(runner.destination, name, host)
        if i == j:
            diagonals[str(i)] = np.diagonal(host).copy()
        del host
    return {"tiles": tiles, "diagonals": diagonals}


def _tile(runner, ref: dict):
    """A stored feature tile, as fp64 on the worker's device."""
    from raymerge.lazy import torch

    return torch.from_numpy(_read(runner, ref)).to(runner.device).double()


def match_group(runner, item, data: dict):
    """A layer's group matched on the worker's device: cluster ids (MLP), head orders one
    row per model (attention), or for the residual stream this layer's share of the
    assignment's scores, written as a file (its reference comes back)."""
    from raymerge.zipit import correlate

    group, models = data["group"], data["models"]
    if group == "mlp" and data["matcher"] == "zip":
        return _zip(runner, correlate.whole(runner, data), models, data)
    crosses = [correlate.cross(runner, data, m) for m in range(1, models)]
    if group == "mlp":
        return correlate.permute_ids(crosses)
    if group == "heads":
        shape = LlamaShape.from_dict(data["shape"])
        return correlate.head_orders(crosses, shape)
    share = correlate.residual_share(crosses)
    return store.write(runner.destination, data["residual"], share)


def _zip(runner, corr, models: int, data: dict) -> np.ndarray:
    """The greedy zip in place on the correlation matrix: torch on a GPU; on a CPU numpy's
    loop over the same memory (the same matches, bit for bit, tested; torch's CPU argmax
    and row gathers made the torch loop ~3x slower at 8B width)."""
    from raymerge.zipit import match, match_torch

    if corr.device.type == "cpu":
        return match.zip_clusters(corr.numpy(), models, data["alpha"], data["beta"], True)
    return match_torch.zip_clusters(corr, models, data["alpha"], data["beta"])


def assign_residual(runner, item, refs: list[dict]) -> np.ndarray:
    """The residual permutation from every layer's share, summed in layer order."""
    from raymerge.zipit import match

    total = None
    for ref in refs:
        share = _read(runner, ref)
        total = share.copy() if total is None else total + share
    return np.stack(match.residual_assignment(total))


def verify_files(runner, item, data) -> list[str]:
    """The names of the stored files (the item's references) that are missing or damaged."""
    reader = store.reader(runner.context.destination)
    bad = []
    for ref in item.data:
        try:
            store.read(reader, ref)
        except store.Damaged:
            bad.append(ref["name"])
    return bad
