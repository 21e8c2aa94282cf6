"""Peak memory of every worker process against --worker-memory, on a vocab-heavy model.

    .venv/bin/python benchmarks/bench_memory.py [--vocab 128000 --hidden 2048 --budget 1GiB]

Generates 3 models + base whose embedding and lm_head are vocab x hidden bf16 (0.5 GB each
per input at the defaults: a TIES unit over the four inputs would need several GB whole),
merges them with TIES under `--worker-memory BUDGET`, and samples the resident set of every
Ray worker actor from /proc every 50 ms. Prints the plan's bound, each worker's peak, and the
peak minus a bare worker's resident set (the fixed overhead: Python, torch, Ray). Also runs
the same merge at a second model size (--small-hidden) to show the peak stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RAYMERGE = os.path.join(os.path.dirname(sys.executable), "raymerge")
ACTOR = "ray::_WorkerActor"


class WorkerPeaks:
    """Peak VmRSS of each process whose command line names the worker actor."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self.done = False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done:
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        if ACTOR.encode() not in f.read():
                            continue
                    with open(f"/proc/{name}/status") as f:
                        rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))
                except (OSError, StopIteration, ValueError):
                    continue
                self.peaks[int(name)] = max(self.peaks.get(int(name), 0), rss * 1024)
            time.sleep(0.05)

    def stop(self) -> dict[int, int]:
        self.done = True
        self.thread.join()
        return self.peaks


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def run(data: str, hidden: int, vocab: int, budget: str, workers: int) -> dict:
    models = os.path.join(data, f"h{hidden}")
    if not os.path.exists(models):
        subprocess.run([RAYMERGE, "synth", models, "--models", "3", "--with-base", "--layers",
                        "2", "--hidden", str(hidden), "--intermediate", str(hidden * 2),
                        "--vocab", str(vocab), "--shard-size", "2GB"], check=True,
                       capture_output=True)  # fmt: skip
    config = os.path.join(data, f"ties-{hidden}.yaml")
    with open(config, "w") as f:
        json.dump({"merge_method": "ties", "base_model": f"{models}/base", "dtype": "bfloat16",
                   "models": [{"model": f"{models}/model_{i}",
                               "parameters": {"weight": 1.0, "density": 0.5}}
                              for i in (1, 2, 3)]}, f)  # fmt: skip
    plan = json.loads(subprocess.run(
        [RAYMERGE, "plan", config, "--worker-memory", budget, "--json"],
        check=True, capture_output=True, text=True).stdout)  # fmt: skip
    sampler = WorkerPeaks()
    done = subprocess.run([RAYMERGE, "run", config, os.path.join(data, f"out-{hidden}"),
                           "--worker-memory", budget, "--workers", str(workers), "--force",
                           "--no-progress"], capture_output=True, text=True)  # fmt: skip
    peaks = sampler.stop()
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    merge = float(re.search(r"\+ ([0-9.]+) s merging", done.stdout).group(1))
    return {"hidden": hidden, "input_bytes": plan["bytes_to_read"], "bound": plan[
        "peak_worker_bytes"], "budget": plan["worker_memory"], "split": plan["split_tensors"],
        "peaks": sorted(peaks.values()), "merge_s": merge}  # fmt: skip


def bare_worker_rss() -> int:
    """A worker actor that imported torch and nothing else: the fixed overhead."""
    code = (
        "import os, ray, time\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "@ray.remote\nclass A:\n"
        "    def rss(self):\n"
        "        import torch, raymerge.worker  # noqa\n"
        "        return next(int(x.split()[1]) for x in open('/proc/self/status')"
        " if x.startswith('VmRSS')) * 1024\n"
        "print(ray.get(A.remote().rss.remote()))\n"
    )
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128000)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--small-hidden", type=int, default=512)
    parser.add_argument("--budget", default="1GiB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = args.data or tempfile.mkdtemp(prefix="raymerge-bench-memory-")
    overhead = bare_worker_rss()
    print(f"bare worker (python + torch + ray + raymerge.worker): {gib(overhead)}")
    print("| hidden | inputs | split tensors | plan bound | --worker-memory | worker peaks "
          "| peak - bare worker | merge s |\n|---|---|---|---|---|---|---|---|")
    for hidden in (args.small_hidden, args.hidden):
        r = run(data, hidden, args.vocab, args.budget, args.workers)
        peaks = ", ".join(gib(p) for p in r["peaks"])
        print(f"| {hidden} | {gib(r['input_bytes'])} | {len(r['split'])} | {gib(r['bound'])} "
              f"| {gib(r['budget'])} | {peaks} | {gib(max(r['peaks']) - overhead)} "
              f"| {r['merge_s']:.1f} |")


if __name__ == "__main__":
    main()
