"""GPU figures: the device's copy bandwidth, a CPU-vs-GPU output check, then bench_merge.py
with --gpus-per-worker 1 on models of several GB.

    python benchmarks/bench_gpu.py --data /tmp/data --layers 4 --hidden 4096 --intermediate 11008
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "raymerge.cli"]


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> dict[str, float]:
    """GB/s of host-to-device, device-to-host (pinned and pageable) and device-to-device copies."""
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    cases = {
        "h2d_pinned": lambda: dev.copy_(pinned, non_blocking=True),
        "d2h_pinned": lambda: pinned.copy_(dev, non_blocking=True),
        "h2d_pageable": lambda: dev.copy_(pageable),
        "d2h_pageable": lambda: pageable.copy_(dev),
        "d2d": lambda: dev2.copy_(dev),
    }
    result = {}
    for name, copy in cases.items():
        copy()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        result[name] = nbytes / sorted(times)[len(times) // 2] / 1e9
    return result


def cpu_vs_gpu(method: str) -> dict:
    """Merge small models on CPU workers and on a GPU worker; count differing output bytes."""
    from safetensors.torch import load_file

    work = tempfile.mkdtemp()
    subprocess.run(
        CLI
        + [
            "synth",
            f"{work}/m",
            "--models",
            "3",
            "--with-base",
            "--hidden",
            "256",
            "--intermediate",
            "512",
            "--vocab",
            "1000",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    params = {"weight": 0.5} if method == "linear" else {"weight": 0.5, "density": 0.4}
    models = [{"model": f"{work}/m/model_{i}", "parameters": params} for i in (1, 2, 3)]
    body = {"merge_method": method, "models": models}
    if method != "linear":
        body["base_model"] = f"{work}/m/base"
    config = f"{work}/c.yaml"
    with open(config, "w") as f:
        json.dump(body, f)  # JSON is YAML
    outputs = {}
    for label, extra in (("cpu", []), ("gpu", ["--gpus-per-worker", "1"])):
        subprocess.run(
            CLI + ["run", config, f"{work}/{label}", "--workers", "1", "--no-progress", *extra],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        outputs[label] = {}
        for name in sorted(os.listdir(f"{work}/{label}")):
            if name.endswith(".safetensors"):
                outputs[label].update(load_file(f"{work}/{label}/{name}"))
    differing = sum(int((outputs["cpu"][n] != outputs["gpu"][n]).sum()) for n in outputs["cpu"])
    total = sum(t.numel() for t in outputs["cpu"].values())
    worst = max(
        float((outputs["cpu"][n].float() - outputs["gpu"][n].float()).abs().max())
        for n in outputs["cpu"]
    )
    return {"method": method, "elements": total, "differing": differing, "max_abs_diff": worst}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args, rest = parser.parse_known_args()
    report = {"device": torch.cuda.get_device_name(0), "copy_GBps": copy_bandwidth()}
    print(json.dumps(report), flush=True)
    report["cpu_vs_gpu"] = [cpu_vs_gpu(m) for m in ("linear", "ties")]
    print(json.dumps(report["cpu_vs_gpu"]), flush=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=2)
    bench = [
        sys.executable,
        os.path.join(HERE, "bench_merge.py"),
        "--gpus-per-worker",
        "1",
        "--workers",
        "1",
        "--json",
        os.path.join(args.out, "bench.json"),
        *rest,
    ]
    subprocess.run(bench, check=True)


if __name__ == "__main__":
    main()
