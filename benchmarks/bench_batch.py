"""A batch of recipes against the same recipes run one by one, in one run.

    .venv/bin/python benchmarks/bench_batch.py

Generates 3 Llama-layout models of about 500 MB each plus their base (bf16), then times, N
times each: `raymerge batch` of a linear weight grid (4 recipes), of a TIES density grid (4
recipes) and of both (8), next to `raymerge run` of each recipe one after the other (their
total). Reports medians and ratios, and the bytes the batch read (counted by its workers)
against the bytes of the distinct input ranges its recipes need ("read once") and against
what the separate runs read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_merge import RAYMERGE, synth, timed, warm  # noqa: E402

WEIGHTS = [0.2, 0.4, 0.6, 0.8]
DENSITIES = [0.2, 0.4, 0.6, 0.8]
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def linear_grid(data: str) -> dict:
    return {
        "name": "linear",
        "merge_method": "linear",
        "models": [
            {"model": os.path.join(data, "model_1"), "parameters": {"weight": 1.0}},
            {"model": os.path.join(data, "model_2"), "parameters": {"weight": 0.5}},
            {"model": os.path.join(data, "model_3"), "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
        "grid": {"models.1.parameters.weight": WEIGHTS},
    }


def ties_grid(data: str) -> dict:
    return {
        "name": "ties",
        "merge_method": "ties",
        "base_model": os.path.join(data, "base"),
        "models": [
            {"model": os.path.join(data, f"model_{i}"), "parameters": {"weight": w}}
            for i, w in ((1, 1.0), (2, 0.8), (3, 0.6))
        ],
        "parameters": {"density": 0.5},
        "dtype": "bfloat16",
        "grid": {"parameters.density": DENSITIES},
    }


def write_batch(path: str, documents: list[dict]) -> str:
    with open(path, "w") as f:
        yaml.safe_dump_all(documents, f, sort_keys=False)
    return path


def recipe_configs(batch: str, folder: str) -> list[str]:
    """One config file per recipe of the batch, for the separate runs."""
    from raymerge.batch import load_batch

    paths = []
    for recipe in load_batch(batch):
        path = os.path.join(folder, f"{recipe.name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(recipe.config, f, sort_keys=False)
        paths.append(path)
    return paths


def size(text: str) -> int:
    number, unit = text.split()
    return int(float(number) * UNITS[unit])


def run_batch(batch: str, out: str, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = RAYMERGE.split() + ["batch", batch, out, "--workers", str(workers), "--no-progress"]
    elapsed, stdout, peak = timed(command, HERE)
    found = re.search(r"read ([0-9.]+ \w+) for all recipes; separate runs would read "
                      r"([0-9.]+ \w+)", stdout)  # fmt: skip
    return {"total": elapsed, "read": size(found.group(1)), "separate_read": size(found.group(2)),
            "peak": peak}  # fmt: skip


def read_once(batch: str, out: str) -> int:
    command = RAYMERGE.split() + ["batch", batch, out, "--dry-run"]
    stdout = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return size(re.search(r"reads ([0-9.]+ \w+) once", stdout).group(1))


def run_separately(configs: list[str], out: str, workers: int) -> float:
    total = 0.0
    for config in configs:
        shutil.rmtree(out, ignore_errors=True)
        command = RAYMERGE.split() + ["run", config, out, "--workers", str(workers),
                                      "--no-progress"]  # fmt: skip
        total += timed(command, HERE)[0]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.path.join(os.path.dirname(HERE), ".bench", "batch"))
    parser.add_argument("--layers", type=int, default=16, help="16 layers: about 500 MB a model")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()

    data = os.path.abspath(args.data)
    synth(data, args)
    work = os.path.join(os.path.dirname(data), "batch-out")
    os.makedirs(work, exist_ok=True)
    batches = {
        "linear grid (4)": write_batch(os.path.join(work, "linear.yaml"), [linear_grid(data)]),
        "ties grid (4)": write_batch(os.path.join(work, "ties.yaml"), [ties_grid(data)]),
        "both (8)": write_batch(os.path.join(work, "both.yaml"),
                                [linear_grid(data), ties_grid(data)]),  # fmt: skip
    }
    inputs = [os.path.join(root, name) for root, _, names in os.walk(data) for name in names
              if name.endswith(".safetensors")]  # fmt: skip
    model_bytes = sum(os.path.getsize(p) for p in inputs) / 4
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "model_bytes": model_bytes,
                     "batches": {}}  # fmt: skip
    for label, batch in batches.items():
        configs = recipe_configs(batch, work)
        rows = []
        for run in range(args.runs):
            warm(inputs)
            row = {"batch": run_batch(batch, os.path.join(work, "out"), args.workers)}
            row["separate"] = run_separately(configs, os.path.join(work, "one"), args.workers)
            rows.append(row)
            print(f"{label} run {run + 1}: {json.dumps(row)}", flush=True)
        once = read_once(batch, os.path.join(work, "out-dry"))
        results["batches"][label] = {"recipes": len(configs), "read_once": once, "runs": rows}
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(results: dict) -> str:
    lines = [
        f"models of {results['model_bytes'] / 1e6:.0f} MB each, {results['machine']}",
        "",
        "| batch | recipes | batch s | separate runs s | batch / separate | read by the batch "
        "| distinct input bytes | separate runs read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in results["batches"].items():
        runs = rows["runs"]
        batch = statistics.median(r["batch"]["total"] for r in runs)
        separate = statistics.median(r["separate"] for r in runs)
        ratio = statistics.median(r["batch"]["total"] / r["separate"] for r in runs)
        read = runs[-1]["batch"]["read"] / 1e9
        lines.append(
            f"| {label} | {rows['recipes']} | {batch:.2f} | {separate:.2f} | {ratio:.0%} | "
            f"{read:.2f} GB | {rows['read_once'] / 1e9:.2f} GB | "
            f"{runs[-1]['batch']['separate_read'] / 1e9:.2f} GB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
