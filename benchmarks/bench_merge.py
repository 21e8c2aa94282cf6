"""Time raymerge against the I/O floor and against mergekit, side by side, in one run.

    .venv/bin/python benchmarks/bench_merge.py --vs-mergekit /path/to/mergekit-venv

Generates 3 Llama-layout models of about 1.5 GB each plus their base (bf16), then for each
method (linear, ties) and worker count (1, 2) runs `raymerge run` end to end N times, next
to the floor (reading the method's inputs from page cache, then writing the output's bytes;
no fsync, like raymerge's default and mergekit) and to `mergekit-yaml` on the same inputs. Reports
medians, ratios, and the peak resident memory of any single process (sampled from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RAYMERGE = os.path.join(os.path.dirname(sys.executable), "raymerge")
if not os.path.exists(RAYMERGE):  # run from a source tree without the console script
    RAYMERGE = f"{sys.executable} -m raymerge.cli"
CONFIGS = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": f"model_{i}", "parameters": {"weight": w}}
            for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))
        ],
        "dtype": "bfloat16",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": f"model_{i}", "parameters": {"weight": w, "density": d}}
            for i, w, d in ((1, 1.0, 0.5), (2, 0.8, 0.5), (3, 0.6, 0.3))
        ],
        "dtype": "bfloat16",
    },
}


def synth(data: str, args) -> None:
    if os.path.exists(os.path.join(data, "model_3", "config.json")):
        return
    print(f"generating models in {data} ...", flush=True)
    dims = ["--layers", str(args.layers), "--hidden", str(args.hidden)]
    dims += ["--intermediate", str(args.intermediate), "--vocab", str(args.vocab)]
    command = ["synth", data, "--models", "3", "--with-base", "--shard-size", "1GB", *dims]
    subprocess.run(RAYMERGE.split() + command, check=True, stdout=subprocess.DEVNULL)


def write_configs(data: str) -> dict[str, str]:
    """Configs with absolute paths (mergekit looks relative names up on the hub)."""
    import yaml

    paths = {}
    for method, body in CONFIGS.items():
        body = json.loads(json.dumps(body))
        for entry in body["models"]:
            entry["model"] = os.path.join(data, entry["model"])
        if "base_model" in body:
            body["base_model"] = os.path.join(data, body["base_model"])
        paths[method] = os.path.join(data, f"{method}.yaml")
        with open(paths[method], "w") as f:
            yaml.safe_dump(body, f, sort_keys=False)
    return paths


def input_files(data: str, method: str) -> list[str]:
    roles = [m["model"] for m in CONFIGS[method]["models"]]
    roles += [CONFIGS[method]["base_model"]] if "base_model" in CONFIGS[method] else []
    return [
        os.path.join(data, r, f)
        for r in roles
        for f in sorted(os.listdir(os.path.join(data, r)))
        if f.endswith(".safetensors")
    ]


def warm(files: list[str]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def floor_seconds(files: list[str], output_bytes: int, scratch: str) -> tuple[float, float]:
    """(read, write) seconds: the inputs from page cache, the output's bytes to a new file."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    os.sync()
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    read = time.perf_counter() - started
    path = os.path.join(scratch, "floor.bin")
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = output_bytes
        while left > 0:
            left -= f.write(view[: min(left, len(view))])
    write = time.perf_counter() - started
    os.remove(path)
    return read, write


def floor_two_threads(files: list[str], output_bytes: int, scratch: str) -> float:
    """Seconds for two threads that each read half the inputs, then write half the output
    (positional writes into one preallocated file): the floor a two-worker run can reach."""
    path = os.path.join(scratch, "floor2.bin")
    with open(path, "wb") as f:
        f.truncate(output_bytes)
    halves = [files[0::2], files[1::2]]
    half = output_bytes // 2

    def work(index: int) -> None:
        view = memoryview(bytearray(64 << 20))
        for name in halves[index]:
            with open(name, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass
        fd = os.open(path, os.O_WRONLY)
        start, end = index * half, output_bytes if index else half
        while start < end:
            start += os.pwrite(fd, view[: min(end - start, len(view))], start)
        os.close(fd)

    os.sync()
    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    os.remove(path)
    return elapsed


class PeakMemory:
    """Largest resident set of any process in a subprocess tree, sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self.done = pid, 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done:
            for pid in _tree(self.root):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
                    self.peak = max(self.peak, rss * 1024)
                except (OSError, StopIteration, ValueError):
                    pass
            time.sleep(0.1)

    def stop(self) -> int:
        self.done = True
        self.thread.join()
        return self.peak


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def timed(command: list[str], cwd: str, env: dict | None = None) -> tuple[float, str, int]:
    os.sync()  # no contender pays for the one before it: earlier output is on disk first
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    memory = PeakMemory(process.pid)
    out, err = process.communicate()
    elapsed = time.perf_counter() - started
    peak = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return elapsed, out, peak


def run_raymerge(config: str, out: str, workers: int, cwd: str, gpus: float) -> dict:
    command = RAYMERGE.split() + [
        "run",
        config,
        out,
        "--workers",
        str(workers),
        "--force",
        "--no-progress",
    ]
    if gpus:
        command += ["--gpus-per-worker", str(gpus)]
    elapsed, stdout, peak = timed(command, cwd)
    merge = float(re.search(r"\+ ([0-9.]+) s merging", stdout).group(1))
    return {"total": elapsed, "merge": merge, "peak": peak}


def run_mergekit(venv: str, config: str, out: str, cwd: str) -> dict:
    command = [os.path.join(venv, "bin", "mergekit-yaml"), config, out, "--no-copy-tokenizer"]
    elapsed, _, peak = timed(command, cwd)
    return {"total": elapsed, "peak": peak}


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.path.join(ROOT, ".bench", "data"))
    parser.add_argument("--out", help="where outputs go (default: beside --data)")
    parser.add_argument(
        "--layers", type=int, default=12, help="12 layers is about 1.5 GB per model"
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--vs-mergekit", metavar="VENV", help="a venv with mergekit installed")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()

    args.data = os.path.abspath(args.data)
    synth(args.data, args)
    configs = write_configs(args.data)
    scratch = args.out or os.path.join(os.path.dirname(args.data), "out")
    os.makedirs(scratch, exist_ok=True)
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "methods": {}}
    for method in args.methods:
        files = input_files(args.data, method)
        input_bytes = sum(os.path.getsize(f) for f in files)
        output_bytes = sum(os.path.getsize(f) for f in files if "/model_1/" in f)  # same layout
        rows: dict = {"input_bytes": input_bytes, "output_bytes": output_bytes, "runs": []}
        for run in range(args.runs):
            warm(files)
            row = {"floor_read": 0.0, "floor_write": 0.0}
            row["floor_read"], row["floor_write"] = floor_seconds(files, output_bytes, scratch)
            row["floor_2"] = floor_two_threads(files, output_bytes, scratch)
            for workers in args.workers:
                out = os.path.join(scratch, f"raymerge-{method}")
                row[f"raymerge_{workers}"] = run_raymerge(
                    configs[method], out, workers, args.data, args.gpus_per_worker
                )
            if args.vs_mergekit:
                out = os.path.join(scratch, f"mergekit-{method}")
                subprocess.run(["rm", "-rf", out], check=True)
                row["mergekit"] = run_mergekit(args.vs_mergekit, configs[method], out, args.data)
            rows["runs"].append(row)
            print(f"{method} run {run + 1}: {json.dumps(row)}", flush=True)
        results["methods"][method] = rows
    print(report(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(results: dict, args) -> str:
    lines = ["| method | measure | median s | vs floor | vs mergekit |", "|---|---|---|---|---|"]
    for method, rows in results["methods"].items():
        runs = rows["runs"]
        floor = median([r["floor_read"] + r["floor_write"] for r in runs])
        read = median([r["floor_read"] for r in runs])
        mk = median([r["mergekit"]["total"] for r in runs]) if args.vs_mergekit else None
        gb = rows["input_bytes"] / 1e9
        floor2 = median([r["floor_2"] for r in runs])
        lines.append(
            f"| {method} | I/O floor: read {gb:.2f} GB ({read:.2f} s) + write "
            f"{rows['output_bytes'] / 1e9:.2f} GB, one thread | {floor:.2f} | 1.00 | |"
        )
        lines.append(
            f"| {method} | I/O floor, two threads (each reads half, writes half) | "
            f"{floor2:.2f} | {floor2 / floor:.2f} | |"
        )
        for workers in args.workers:
            key = f"raymerge_{workers}"
            total = median([r[key]["total"] for r in runs])
            merge = median([r[key]["merge"] for r in runs])
            ratio = [r["mergekit"]["total"] / r[key]["total"] for r in runs] if mk else None
            speedup = f"{median(ratio):.2f}x faster" if ratio else ""
            lines.append(
                f"| {method} | raymerge {workers} worker(s), end to end | {total:.2f} | "
                f"{total / floor:.2f} | {speedup} |"
            )
            lines.append(
                f"| {method} | raymerge {workers} worker(s), merge phase | {merge:.2f} | "
                f"{merge / floor:.2f} ({merge / floor2:.2f} of the two-thread floor) | |"
            )
            fixed = median([r[key]["total"] - r[key]["merge"] for r in runs])
            lines.append(
                f"| {method} | raymerge {workers} worker(s), fixed cost (all but merging) | "
                f"{fixed:.2f} | | |"
            )
        if mk:
            lines.append(
                f"| {method} | mergekit, end to end | {mk:.2f} | {mk / floor:.2f} | 1.00 |"
            )
    lines += ["", "| method | process | peak RSS of any one process (median) |", "|---|---|---|"]
    for method, rows in results["methods"].items():
        runs = rows["runs"]
        for workers in args.workers:
            peak = median([r[f"raymerge_{workers}"]["peak"] for r in runs]) / 2**30
            lines.append(f"| {method} | raymerge, {workers} worker(s) | {peak:.2f} GiB |")
        if args.vs_mergekit:
            peak = median([r["mergekit"]["peak"] for r in runs]) / 2**30
            lines.append(f"| {method} | mergekit | {peak:.2f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
