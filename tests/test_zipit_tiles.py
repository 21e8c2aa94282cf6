"""The data stage's bounded statistics without Ray: the tile grid and its bands, the arrays
stored beside the ledger (and damage to them found), Σxxᵀ tiles that do not depend on the
band, and matching from stored tiles (zipit/correlate.py) equal to the numpy reference on
the same sums."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raymerge.storage.local import LocalDestination
from raymerge.zipit import correlate, match, match_torch, store, work
from raymerge.zipit.shape import LlamaShape
from raymerge.zipit.tiles import Grid, bands, needed
from tests.test_zipit_match import random_features

# ----------------------------------------------------------------------------- tiles


@pytest.mark.parametrize("models,width,tile", [(2, 10, 4), (3, 7, 7), (2, 5, 16), (4, 6, 2)])
def test_tile_grid_and_needs(models, width, tile):
    grid = Grid(models, width, tile)
    spans, owner = grid.spans, grid.owner
    assert spans[0][0] == 0 and spans[-1][1] == models * width
    assert all(a < b for a, b in spans) and all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
    assert all(a // width == (b - 1) // width == owner[k] for k, (a, b) in enumerate(spans))
    every = needed(grid, ["all"])
    assert len(every) == len(spans) * (len(spans) + 1) // 2
    cross = needed(grid, ["cross"])
    assert all(i == j or (owner[i] == 0 and owner[j] > 0) for i, j in cross)
    within = needed(grid, ["within"])
    assert set(needed(grid, ["cross", "within"])) == set(cross) | set(within)
    for rows in range(1, len(spans) + 2):
        cut = bands(every, rows)
        assert [p for band in cut for p in band] == every
        assert all(len({i for i, _ in band}) <= rows for band in cut)


# ----------------------------------------------------------------------------- stored arrays


def test_stored_arrays_round_trip_and_damage_is_found(tmp_path):
    destination = LocalDestination(str(tmp_path))
    array = np.arange(12, dtype=np.float64).reshape(3, 4)
    ref = store.write(destination, store.path("grams", "a.npy"), array)
    reader = store.reader(str(tmp_path))
    np.testing.assert_array_equal(store.read(reader, ref), array)
    path = tmp_path / ref["name"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(store.Damaged, match="do not match"):
        store.read(reader, ref)
    path.write_bytes(bytes(raw[:-8]))
    with pytest.raises(store.Damaged):
        store.read(reader, ref)
    path.unlink()
    with pytest.raises(store.Damaged):
        store.read(reader, ref)
    with pytest.raises(ValueError):
        store.encode(np.array(["not", "numbers"], dtype=object))


# ----------------------------------------------------------------------------- Σxxᵀ tiles


def runner_at(tmp_path) -> SimpleNamespace:
    """What the stage's worker functions use of a UnitRunner: device, destination."""
    return SimpleNamespace(device=torch.device("cpu"), destination=LocalDestination(str(tmp_path)),
                           context=SimpleNamespace(destination=str(tmp_path)))  # fmt: skip


def stored_features(runner, blocks: list[np.ndarray], models: int, tile: int, group: str):
    """Each block's features cut into tiles and stored, as gather_block does; Σx."""
    totals, refs = [], []
    for number, x in enumerate(blocks):
        n = x.shape[1] // models
        parts = [torch.from_numpy(x[:, m * n : (m + 1) * n]).float() for m in range(models)]
        data = {"tile": tile, "block": number}
        total, mine = work._write_tiles(runner, parts, data, "L00000", group)
        totals.append(total)
        refs.append(mine)
    return totals, refs


def gram_tiles(runner, refs, grid: Grid, pairs, rows: int) -> dict:
    """Every needed tile, band by band (`rows` row tiles a band)."""
    tiles, diagonals = {}, {}
    for number, band in enumerate(bands(pairs, rows)):
        names = [store.path("sums", f"t{number}-{i}-{j}.npy") for i, j in band]
        out = work.gram_band(runner, None, {"pairs": band, "names": names, "features": refs})
        tiles.update(out["tiles"])
        diagonals.update(out["diagonals"])
    return tiles, np.concatenate([diagonals[str(i)] for i in range(len(grid.spans))])


def stored_outer(tmp_path, tiles: dict, grid: Grid) -> np.ndarray:
    """The whole Σxxᵀ from stored tiles above the diagonal (mirrored; zeros where no tile
    was needed)."""
    reader = store.reader(str(tmp_path))
    outer = np.zeros((grid.size, grid.size))
    for key, ref in tiles.items():
        i, j = (int(k) for k in key.split("-"))
        (a, b), (c, d) = grid.spans[i], grid.spans[j]
        outer[a:b, c:d] = store.read(reader, ref)
        outer[c:d, a:b] = outer[a:b, c:d].T
    return outer


def test_tiles_are_the_same_bytes_for_any_band(tmp_path):
    """A tile's bytes do not depend on how tiles are grouped into items; the tiles are
    Σ over blocks of Xᵀ X (to rounding: the gemm's shape differs), Σx likewise."""
    rng = np.random.default_rng(1)
    models, n, tile = 2, 11, 4
    blocks = [random_features(rng, models, n, tokens=t).astype(np.float32) for t in (30, 17)]
    runner = runner_at(tmp_path)
    totals, refs = stored_features(runner, blocks, models, tile, "mlp")
    grid = Grid(models, n, tile)
    outers = []
    for rows in (1, 2, 5):
        tiles, diagonal = gram_tiles(runner, refs, grid, needed(grid, ["all"]), rows)
        outers.append(stored_outer(tmp_path, tiles, grid))
        np.testing.assert_array_equal(diagonal, np.diagonal(outers[-1]))
    assert all(np.array_equal(outers[0], other) for other in outers[1:])
    wide = [x.astype(np.float64) for x in blocks]
    np.testing.assert_allclose(outers[0], sum(w.T @ w for w in wide), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(totals[0] + totals[1], sum(w.sum(0) for w in wide), rtol=1e-12)


@pytest.mark.parametrize("matcher", ["zip", "permute"])
def test_matching_from_tiles_equals_the_numpy_matching(tmp_path, matcher):
    """Zip, permute, heads and the residual share from stored tiles on the torch path give
    the numpy path's results on the same Σxxᵀ held whole."""
    rng = np.random.default_rng(5)
    models, heads, kv_heads, head_dim = 3, 4, 2, 3
    n = heads * head_dim
    x = random_features(rng, models, n, tokens=80)
    x[:, 5] = 1.5  # a constant feature
    x[:, n + 2] = x[:, 7]  # a duplicate
    x = x.astype(np.float32)
    runner = runner_at(tmp_path)
    totals, refs = stored_features(runner, [x[:50], x[50:]], models, 5, "g")
    grid = Grid(models, n, 5)
    kind = "all" if matcher == "zip" else "cross"
    tiles, diagonal = gram_tiles(runner, refs, grid, needed(grid, [kind]), 2)
    data = {"count": 80, "total": totals[0] + totals[1], "diagonal": diagonal, "models": models,
            "tile": 5, "tiles": tiles}  # fmt: skip
    corr = match.correlation(80, data["total"], stored_outer(tmp_path, tiles, grid))
    if matcher == "zip":
        for alpha, beta in [(0.3, 0.5), (1.0, 0.0), (1e-4, 1.0)]:
            got = match_torch.zip_clusters(correlate.whole(runner, data), models, alpha, beta)
            np.testing.assert_array_equal(got, match.zip_clusters(corr, models, alpha, beta))
        return
    crosses = [correlate.cross(runner, data, m) for m in range(1, models)]
    np.testing.assert_array_equal(correlate.permute_ids(crosses),
                                  match.permute_clusters(corr, models))  # fmt: skip
    shape = LlamaShape(8, 8, heads, kv_heads, head_dim, 1, 8, 1e-5, 1e4, None, False)
    np.testing.assert_array_equal(correlate.head_orders(crosses, shape),
                                  np.stack(match.match_heads(corr, models, heads, kv_heads,
                                                             head_dim)))  # fmt: skip
    np.testing.assert_array_equal(correlate.residual_share(crosses),
                                  match.residual_cross(corr, models))  # fmt: skip


def test_matching_exact_copies_through_tiles(tmp_path):
    rng = np.random.default_rng(6)
    base = rng.standard_normal((200, 9))
    perm = rng.permutation(9)
    x = np.concatenate([base, base[:, perm]], axis=1).astype(np.float32)
    runner = runner_at(tmp_path)
    totals, refs = stored_features(runner, [x], 2, 4, "mlp")
    grid = Grid(2, 9, 4)
    tiles, diagonal = gram_tiles(runner, refs, grid, needed(grid, ["all"]), 3)
    data = {"count": 200, "total": totals[0], "diagonal": diagonal, "models": 2, "tile": 4,
            "tiles": tiles}  # fmt: skip
    ids = match_torch.zip_clusters(correlate.whole(runner, data), 2, 0.3, 0.0)
    np.testing.assert_array_equal(ids, np.concatenate([np.arange(9), perm]))
