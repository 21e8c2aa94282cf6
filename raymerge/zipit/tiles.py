"""The tile grid of a feature group's Σxxᵀ: which tiles are needed, and bands of them.

A group's features are the models' features side by side (model 0's first). Σxxᵀ is never
held whole: it is cut into square tiles at fixed points, a function of the group's width
and TILE only (each model's features cut every TILE features, so no tile straddles two
models), and only the tiles above or on the diagonal that some use needs are computed:

- `all`: every tile (ZipIt's greedy zip reads the whole upper triangle);
- `cross`: model 0's features against every other model's (permute, heads, the residual
  stream), and the diagonal tiles (their diagonals give each feature's variance);
- `within`: each model's own block (RegMean's input Gram matrices).

A tile is Σ over the calibration blocks, in block order, of one gemm of two fixed-width
column slices, so a tile's bytes do not depend on which item computed it: any grouping of
tiles into items (a band: consecutive row tiles) gives the same bytes. Pure Python: the
driver plans with it, workers follow the same cuts.
"""

from __future__ import annotations

from dataclasses import dataclass

TILE = 2048  # features per tile side: a fp64 tile is 32 MiB
KINDS = ("all", "cross", "within")


@dataclass(frozen=True)
class Grid:
    """The tiles of one group: `spans[k]` = (start, stop) of tile k's features, `owner[k]`
    = the model they belong to."""

    models: int
    width: int  # features of one model
    tile: int

    @property
    def spans(self) -> list[tuple[int, int]]:
        step = max(1, min(self.tile, self.width))
        local = [(lo, min(lo + step, self.width)) for lo in range(0, self.width, step)]
        return [(m * self.width + a, m * self.width + b) for m in range(self.models)
                for a, b in local]  # fmt: skip

    @property
    def owner(self) -> list[int]:
        per_model = len(self.spans) // self.models
        return [k // per_model for k in range(len(self.spans))]

    @property
    def size(self) -> int:
        return self.models * self.width


def needed(grid: Grid, kinds: list[str]) -> list[tuple[int, int]]:
    """The tiles (i, j), i <= j, that `kinds` need, in row-major order."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown tile needs {sorted(unknown)}; choose from {KINDS}")
    owner = grid.owner
    count = len(owner)
    pairs = []
    for i in range(count):
        for j in range(i, count):
            if (
                "all" in kinds
                or ("cross" in kinds and (i == j or (owner[i] == 0 and owner[j] > 0)))
                or ("within" in kinds and owner[i] == owner[j])
            ):
                pairs.append((i, j))
    return pairs


def bands(pairs: list[tuple[int, int]], rows: int) -> list[list[tuple[int, int]]]:
    """The pairs in bands of `rows` consecutive row tiles (of those that have any pair)."""
    if rows < 1:
        raise ValueError(f"a band needs at least one row tile, got {rows}")
    row_tiles = sorted({i for i, _ in pairs})
    out = []
    for lo in range(0, len(row_tiles), rows):
        chosen = set(row_tiles[lo : lo + rows])
        out.append([p for p in pairs if p[0] in chosen])
    return out


def band_bytes(grid: Grid, band: list[tuple[int, int]], tokens: int) -> int:
    """What a worker holds for one band: its sums (fp64), one calibration block's row tiles
    and one column tile (fp32 as read, fp64 as multiplied), and one tile being written."""
    spans = grid.spans
    width = [b - a for a, b in spans]
    sums = sum(width[i] * width[j] for i, j in band) * 8
    rows = sum(width[i] for i in {i for i, _ in band})
    widest = max(width) if width else 0
    return sums + tokens * (rows + widest) * 12 + 2 * widest * widest * 8

