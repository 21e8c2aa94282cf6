"""Time ZipIt's statistics and matching for ONE decoder layer at a given width (default:
Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads), on this machine's CPU,
through the stage's own worker code (`zipit/work.py`, `zipit/correlate.py`).

The statistics are what the stage's items do for one layer: the layer forward of two models
over one block of tokens (`zipit/forward.py`), the features written as column tiles, then
the Σxxᵀ tiles in fp64, band by band (the bands `--worker-memory` allows), each tile written
to disk as the stage writes it under the output. The matching is what a worker does per
layer: the MLP's correlation matrix assembled from its tiles and zipped in place (numpy's loop
on a CPU, as the stage does; then torch's loop, the GPU path, on the CPU for comparison),
permute's assignment from the cross block, and the head matching. Weights are
random (timing only). Files go to a temporary folder, removed at the end.

    .venv/bin/python benchmarks/zipit_layer_timing.py [--tokens 512] [--worker-memory 8GiB]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from raymerge.sizes import parse_size
from raymerge.storage.local import LocalDestination
from raymerge.zipit import budget, correlate, forward, match, match_torch, store, work
from raymerge.zipit.shape import LlamaShape
from raymerge.zipit.stage import BAND_TILES
from raymerge.zipit.tiles import TILE, Grid, bands, needed

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = {"heads": "cross", "residual": "cross", "mlp": "all"}  # zipit, residual: permute


def layer_weights(shape: LlamaShape, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, inter, hd = shape.hidden, shape.intermediate, shape.head_dim
    sizes = {
        "input_layernorm": (d,), "post_attention_layernorm": (d,),
        "q_proj": (shape.heads * hd, d), "k_proj": (shape.kv_heads * hd, d),
        "v_proj": (shape.kv_heads * hd, d), "o_proj": (d, shape.heads * hd),
        "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter),
    }  # fmt: skip
    return {
        role: (torch.randn(size, generator=g) * (1.0 if len(size) == 1 else size[-1] ** -0.5))
        .to(torch.bfloat16)
        for role, size in sizes.items()
    }


def timed(label: str, results: dict, fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    results[label] = round(time.perf_counter() - started, 2)
    print(f"{label}: {results[label]:.2f} s", flush=True)
    return value


def forward_and_tiles(runner, shape, weights, hidden, rope) -> dict:
    """Both models' features of one layer, written as column tiles: {group: (Σx, refs)}."""
    found = [forward.layer_forward(shape, w, hidden, rope)[1] for w in weights]
    data = {"tile": TILE, "block": 0}
    return {g: work._write_tiles(runner, [f[g] for f in found], data, "L00000", g)
            for g in GROUPS}  # fmt: skip


def group_tiles(runner, shape, group: str, refs: list, rows: int) -> dict:
    """The group's needed Σxxᵀ tiles, band by band; the match step's payload."""
    grid = Grid(2, budget.width(shape, group), TILE)
    tiles, diagonals = {}, {}
    for band in bands(needed(grid, [GROUPS[group]]), rows):
        names = [store.path("sums", f"{group}-{i:04d}-{j:04d}.npy") for i, j in band]
        out = work.gram_band(runner, None, {"pairs": band, "names": names, "features": [refs]})
        tiles.update(out["tiles"])
        diagonals.update(out["diagonals"])
    diagonal = np.concatenate([diagonals[str(i)] for i in range(len(grid.spans))])
    return {"tiles": tiles, "diagonal": diagonal}


def band_rows(shape, group: str, tokens: int, memory: int) -> int:
    settings = {"models": 2, "tile": TILE, "needs": {group: [GROUPS[group]]}}
    return budget.widest_band(shape, settings, group, tokens, memory, BAND_TILES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens in the block")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--worker-memory", default="8GiB", help="sizes the Σxxᵀ bands")
    parser.add_argument("--skip-permute", action="store_true")
    parser.add_argument("--skip-torch-zip", action="store_true",
                        help="do not also time the torch zip loop (the GPU path) on the CPU")
    parser.add_argument("--json", default=os.path.join(HERE, "results-zipit-layer.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shape = LlamaShape(args.hidden, args.intermediate, args.heads, args.kv_heads,
                       args.hidden // args.heads, 1, 128256, 1e-5, 5e5, None, False)  # fmt: skip
    memory = parse_size(args.worker_memory, "--worker-memory")
    results: dict = {"shape": shape.describe(), "tokens": args.tokens, "threads": os.cpu_count(),
                     "worker_memory": args.worker_memory, "device": "cpu"}  # fmt: skip
    folder = tempfile.mkdtemp(prefix="zipit-layer-")
    runner = SimpleNamespace(device=torch.device("cpu"), destination=LocalDestination(folder),
                             context=SimpleNamespace(destination=folder))  # fmt: skip
    try:
        run(args, shape, memory, runner, results)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(f"peak RSS: {results['peak_rss_gib']} GiB")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")


def run(args, shape: LlamaShape, memory: int, runner, results: dict) -> None:
    weights = [layer_weights(shape, seed) for seed in (0, 1)]
    g = torch.Generator().manual_seed(2)
    sequences = args.tokens // args.sequence_length
    hidden = torch.randn(sequences, args.sequence_length, args.hidden, generator=g)
    rope = forward.rope_tables(shape, args.sequence_length)
    with torch.no_grad():
        written = timed("statistics: layer forward of 2 models, features written as tiles",
                        results, forward_and_tiles, runner, shape, weights, hidden, rope)
    del weights
    payloads = {}
    for group in GROUPS:
        total, refs = written[group]
        rows = band_rows(shape, group, args.tokens, memory)
        results[f"band rows of {group} tiles"] = rows * TILE
        payloads[group] = timed(f"statistics: Σxxᵀ tiles of {group} (2 models, fp64)", results,
                                group_tiles, runner, shape, group, refs, rows)  # fmt: skip
        payloads[group] |= {"count": args.tokens, "total": total, "models": 2, "tile": TILE}
    mlp = payloads["mlp"]
    corr = timed("matching: MLP correlation from its tiles (28672² for 8B)", results,
                 correlate.whole, runner, mlp)  # fmt: skip
    ids = timed("matching: ZipIt greedy zip of the MLP (CPU path: numpy loop, in place)",
                results, match.zip_clusters, corr.numpy(), 2, 0.3, 0.125, True)  # fmt: skip
    del corr
    if not args.skip_torch_zip:
        corr = correlate.whole(runner, mlp)
        same = timed("matching: ZipIt greedy zip of the MLP (GPU path: torch loop, here on CPU)",
                     results, match_torch.zip_clusters, corr, 2, 0.3, 0.125)  # fmt: skip
        results["torch zip equals numpy zip"] = bool(np.array_equal(ids, same))
        print(f"torch zip equals numpy zip: {results['torch zip equals numpy zip']}")
        del corr
    if not args.skip_permute:
        cross = timed("matching: MLP cross block from its tiles", results, correlate.cross,
                      runner, mlp, 1)  # fmt: skip
        timed("matching: permute assignment of the MLP (scipy)", results,
              correlate.permute_ids, [cross])  # fmt: skip
        del cross
    heads = correlate.cross(runner, payloads["heads"], 1)
    timed("matching: heads (GQA groups)", results, correlate.head_orders, [heads], shape)


if __name__ == "__main__":
    main()
