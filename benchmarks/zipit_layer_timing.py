"""Time ZipIt's statistics and matching for ONE decoder layer at a given width (default:
Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads), on this machine's CPU.

The statistics are what a worker does per block and layer (`zipit/stage.py`): the layer
forward of two models (`zipit/forward.py`) and Σxxᵀ in fp64 over both models' MLP features,
head outputs and residual stream. The matching is what a worker does per layer: the
correlation, then the greedy zip and the permute assignment of the MLP neurons, and the
head matching. Weights are random (timing only).

    .venv/bin/python benchmarks/zipit_layer_timing.py [--tokens 512] [--intermediate 14336]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from raymerge.zipit import forward, match
from raymerge.zipit.shape import LlamaShape
from raymerge.zipit.stage import _sums

HERE = os.path.dirname(os.path.abspath(__file__))


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


def layer_features(shape, weights, hidden, rope) -> list[dict]:
    """Both models' features of one layer over the same hidden states."""
    return [forward.layer_forward(shape, w, hidden, rope)[1] for w in weights]


def group_sums(found: list[dict], group: str):
    return _sums(torch.cat([f[group] for f in found], dim=1))


def timed(label: str, results: dict, fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    results[label] = round(time.perf_counter() - started, 2)
    print(f"{label}: {results[label]:.2f} s", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens in the block")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--skip-permute", action="store_true")
    parser.add_argument("--json", default=os.path.join(HERE, "results-zipit-layer.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shape = LlamaShape(args.hidden, args.intermediate, args.heads, args.kv_heads,
                       args.hidden // args.heads, 1, 128256, 1e-5, 5e5, None, False)  # fmt: skip
    results: dict = {"shape": shape.describe(), "tokens": args.tokens, "threads": os.cpu_count()}
    weights = [layer_weights(shape, seed) for seed in (0, 1)]
    g = torch.Generator().manual_seed(2)
    sequences = args.tokens // args.sequence_length
    hidden = torch.randn(sequences, args.sequence_length, args.hidden, generator=g)
    rope = forward.rope_tables(shape, args.sequence_length)
    with torch.no_grad():
        found = timed("statistics: layer forward, 2 models", results, layer_features, shape,
                      weights, hidden, rope)  # fmt: skip
        del weights
        sums = {
            group: timed(f"statistics: sums of {group} features (2 models, fp64)", results,
                         group_sums, found, group)  # fmt: skip
            for group in ("heads", "residual", "mlp")
        }
    del found
    corr = timed("matching: MLP correlation", results, match.correlation, *sums.pop("mlp"))
    timed("matching: ZipIt greedy zip of the MLP", results, match.zip_clusters, corr, 2, 0.3,
          0.125)  # fmt: skip
    if not args.skip_permute:
        timed("matching: permute assignment of the MLP", results, match.permute_clusters,
              corr, 2)  # fmt: skip
    del corr
    head_corr = match.correlation(*sums["heads"])
    timed("matching: heads (GQA groups)", results, match.match_heads, head_corr, 2,
          shape.heads, shape.kv_heads, shape.head_dim)  # fmt: skip
    results["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(f"peak RSS: {results['peak_rss_gib']} GiB")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
