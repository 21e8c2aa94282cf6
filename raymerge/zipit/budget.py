"""What one worker holds for each step of the data stage, from the shapes alone.

The plan states the largest of these and refuses a stage that does not fit
`--worker-memory` (one stage item runs at a time in a worker, so the bound applies to one
item). Only the Σxxᵀ bands shrink with the bound; the rest is fixed by the model's widths:
a zip holds its group's whole correlation matrix, an assignment its cross block, a RegMean
solve its Gram matrices. Estimates of the arrays each step allocates (docs/zipit.md shows
the arithmetic at Llama-3-8B and 70B widths), not measurements.
"""

from __future__ import annotations

from raymerge.zipit.shape import LlamaShape
from raymerge.zipit.tiles import Grid, band_bytes, bands, needed

_CHUNK = (1 << 22) * 8  # a row chunk of the matcher's temporaries (match._CHUNK_ELEMENTS)


def width(shape: LlamaShape, group: str) -> int:
    """Features of one model in a group: MLP neurons, head outputs, or the hidden size."""
    return {"mlp": shape.intermediate, "heads": shape.heads * shape.head_dim}.get(
        group, shape.hidden
    )


def forward_bytes(shape: LlamaShape, settings: dict, tokens: int, weight_bytes: int) -> int:
    """One calibration block through one layer of every model: one model's layer weights
    (as stored, plus the float32 copy of the projection in use), every model's hidden
    states, the layer's activations (attention scores included), the features of every
    gathered group for all models, and one feature tile being written."""
    d, inter, hd = shape.hidden, shape.intermediate, shape.head_dim
    models, sequences = settings["models"], max(1, tokens // settings["sequence_length"])
    params = d * (shape.heads + 2 * shape.kv_heads) * hd + d * shape.heads * hd + 3 * d * inter
    weights = params * weight_bytes + max(inter * d, shape.heads * hd * d) * 4
    hidden = models * tokens * d * 4 * 2
    attention = sequences * shape.heads * settings["sequence_length"] ** 2 * 4 * 2
    activations = tokens * (4 * d + 3 * shape.heads * hd + 3 * inter) * 4 + attention
    features = models * tokens * sum(width(shape, g) for g in settings["groups"]) * 4
    tile = tokens * settings["tile"] * (4 * 2 + 8)
    return weights + hidden + activations + features + tile


def gram_bytes(shape: LlamaShape, settings: dict, group: str, rows: int, tokens: int) -> int:
    """The largest band of `rows` row tiles of a group's Σxxᵀ tiles."""
    grid = Grid(settings["models"], width(shape, group), settings["tile"])
    pairs = needed(grid, settings["needs"][group])
    return max((band_bytes(grid, band, tokens) for band in bands(pairs, rows)), default=0)


def match_bytes(shape: LlamaShape, settings: dict, group: str) -> int:
    """Matching one layer's group: the zip holds the whole [F, F] fp64 correlation matrix;
    an assignment (permute, heads, the residual stream) the cross block of model 0 with
    each other model, and the solver's copies of one."""
    n, models = width(shape, group), settings["models"]
    tile = min(settings["tile"], n) ** 2 * 8 * 2
    if group == "mlp" and settings["matcher"] == "zip":
        size = models * n
        return size * size * 8 + 3 * min(_CHUNK, size * size * 8) + tile
    return (models - 1 + 3) * n * n * 8 + tile  # every cross block, the solver's copies


def residual_bytes(shape: LlamaShape, settings: dict) -> int:
    """The residual permutation: the running sum of every layer's cross blocks, one layer's
    share being added, and the assignment's copies of one block."""
    d, pairs = shape.hidden, settings["models"] - 1
    return 2 * pairs * d * d * 8 + 3 * d * d * 8


REGMEAN_SHAPES = {  # group -> (its Gram width, the largest weight solved with it)
    "attn_in": lambda s: (s.hidden, s.heads * s.head_dim * s.hidden),
    "heads": lambda s: (s.heads * s.head_dim, s.hidden * s.heads * s.head_dim),
    "mlp_in": lambda s: (s.hidden, s.intermediate * s.hidden),
    "mlp": lambda s: (s.intermediate, s.hidden * s.intermediate),
}


def apply_bytes(shape: LlamaShape, settings: dict) -> int:
    """A RegMean solve in the merge: one model's Gram matrix read and aligned (three n²
    arrays at once), the sum over the models, and the solver's factorisation; the weights
    in fp64 (every model's, the target and the result)."""
    if not settings["regmean"]:
        return 0
    need = 0
    for sizes in REGMEAN_SHAPES.values():
        n, elements = sizes(shape)
        need = max(need, 5 * n * n * 8 + (settings["models"] + 3) * elements * 8)
    return need


def stage_bytes(shape: LlamaShape, settings: dict, tokens: int, weight_bytes: int) -> dict:
    """Bytes per worker of each kind of stage item, by a label that says what it holds."""
    out = {"the layer forward of one calibration block": forward_bytes(shape, settings, tokens,
                                                                        weight_bytes)}  # fmt: skip
    for group in settings["groups"]:
        rows = settings["band_tiles"][group]
        out[f"a band of {group} Σxxᵀ tiles"] = gram_bytes(shape, settings, group, rows, tokens)
    for group in settings["matched"]:
        n = width(shape, group) * (settings["models"] if group == "mlp" and
                                   settings["matcher"] == "zip" else 1)  # fmt: skip
        what = "greedy zip" if n > width(shape, group) else "assignment"
        out[f"the {what} of the {group} features ({n}² fp64 correlations)"] = match_bytes(
            shape, settings, group
        )
    if "residual" in settings["matched"]:
        out["the residual stream's permutation"] = residual_bytes(shape, settings)
    if settings["regmean"]:
        out["a RegMean solve in the merge (the MLP's Gram matrices)"] = apply_bytes(
            shape, settings
        )
    return out


def widest_band(shape: LlamaShape, settings: dict, group: str, tokens: int,
                memory: int | None, most: int) -> int:  # fmt: skip
    """The most row tiles (at most `most`) a band of `group` may hold within `memory`."""
    if memory is None:
        return most
    for rows in range(most, 0, -1):
        if gram_bytes(shape, settings, group, rows, tokens) <= memory:
            return rows
    return 1
