"""How many work units per second the driver sustains, with units so small that scheduling is
all there is to them.

    .venv/bin/python benchmarks/bench_schedule.py --runs 3 \
        --json benchmarks/results-schedule.json --md benchmarks/results-schedule.md

Merges (linear) MODELS virtual checkpoints (storage/virtual.py: no files, bytes made on
read) of a Llama layout scaled down to tiny widths, with enough layers for 10,000+ tensors
(default: llama-3-8b widths / 128 with 1200 layers: 10,803 tensors of 32 to 112 x 32
elements, about 31 MB per model), into a local folder with `--part-size 1` and 4 MB shards,
so every tensor is a write part and a work unit of its own. Each run is a fresh driver process (a
child of this script: `run_merge` in process, a local Ray started by it) and reports:

* units / merging seconds (the summary's `seconds_merge`: pool start to last result) and
  units / total seconds (end to end: planning, Ray start-up, merge, indexes);
* the driver's CPU time during the merge phase (`WorkerPool.map`, every thread of the
  driver process, Ray's own included) per unit, and its wall time per unit;
* the driver's peak resident memory (VmHWM from /proc/self/status) and its growth over the
  merge phase (VmRSS before and after `map`).

Medians over N runs. With `--profile` one more run is made under cProfile (the driver's main
thread during `WorkerPool.map`) and the top functions are reported. With `--journal-what-if`,
N more runs replace `Ledger.record` (a file per unit, written under a temporary name and
renamed) by an append to one file: not raymerge's behaviour (a resume would not read it),
only a measure of what that change would buy. The first run's output is checked with
`raymerge.index.verify`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
TARGET_UNITS_PER_S = 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layout", default="llama-3-8b")
    parser.add_argument("--scale", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1200)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-memory", default="256MiB")
    parser.add_argument(
        "--shard-size", default="4MB", help="output shards (S3's limit: 10,000 parts a shard)"
    )
    parser.add_argument("--profile", action="store_true", help="one more run under cProfile")
    parser.add_argument(
        "--journal-what-if", action="store_true",
        help="N more runs with the unit records appended to one file (not what raymerge does: "
        "sizes what a ledger journal would save)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=25, help="functions in the profile report")
    parser.add_argument("--tmp", help="folder for the outputs (default: a fresh temp folder)")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--md", dest="md_path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    command = shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv])
    tmp = args.tmp or tempfile.mkdtemp(prefix="bench-schedule-")
    os.makedirs(tmp, exist_ok=True)
    job = {
        "layout": args.layout, "scale": args.scale, "layers": args.layers,
        "models": args.models, "workers": args.workers, "worker_memory": args.worker_memory,
        "shard_size": args.shard_size, "tmp": tmp,
    }  # fmt: skip
    runs = []
    try:
        for index in range(args.runs):
            result = spawn({**job, "run": index, "verify": index == 0})
            runs.append(result)
            print(one_line(index, result), flush=True)
        journal = []
        if args.journal_what_if:
            for index in range(args.runs):
                result = spawn({**job, "run": args.runs + 1 + index, "journal": True})
                journal.append(result)
                print(one_line(f"journal what-if {index}", result), flush=True)
        profile = worker_profile = None
        if args.profile:
            profile = spawn({**job, "run": args.runs, "profile": True, "top": args.top})
            print(one_line("profile", profile), flush=True)
            worker_profile = spawn({**job, "run": "worker", "worker_profile": True,
                                    "top": args.top})  # fmt: skip
            print(
                f"worker profile: {worker_profile['units']} units in one process without Ray, "
                f"{worker_profile['cpu_us_per_unit']:.0f} us CPU per unit", flush=True,
            )  # fmt: skip
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report = summarize(command, job, runs, profile, journal)
    report["worker_profile"] = worker_profile
    text = markdown(report)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if args.md_path:
        with open(args.md_path, "w") as f:
            f.write(text + "\n")


def spawn(job: dict) -> dict:
    """One driver in a fresh process; its last stdout line is its result. Its Ray gets a
    temp folder of its own (RAY_TMPDIR): `ray.init()` connects to whatever cluster
    /tmp/ray/ray_current_cluster names (another `ray start` on a shared machine) instead of
    starting one, and the sessions of runs that end with os._exit are cleaned up here."""
    ray_tmp = tempfile.mkdtemp(prefix="rbs-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, **ENV, "PYTHONPATH": ROOT, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
            env=env, cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        time.sleep(1.0)  # the run's Ray processes leave with their driver
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"run {job['run']} failed (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def one_line(index, r: dict) -> str:
    return (
        f"run {index}: {r['units']} units, {r['units_per_s_merge']:.0f} units/s merging, "
        f"{r['units_per_s_total']:.0f} units/s end to end, driver "
        f"{r['driver_cpu_us_per_unit']:.0f} us CPU / {r['driver_wall_us_per_unit']:.0f} us "
        f"wall per unit, peak RSS {r['driver_peak_rss'] / 2**20:.0f} MiB"
    )


# --- the driver process ------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cpu_seconds() -> float:
    times = os.times()  # the whole process: every thread, Ray's core worker's included
    return times.user + times.system


TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of `root` and every process below it (the local
    Ray it started: GCS, raylets, worker actors), summed by kind."""
    stats: dict[int, tuple[int, str, float]] = {}  # pid -> (ppid, name, cpu seconds)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        stats[int(name)] = (int(fields[1]), command, (int(fields[11]) + int(fields[12])) / TICK)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    totals: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid not in stats:
            continue
        _, command, cpu = stats[pid]
        kind = "driver" if pid == root else _kind(command)
        totals[kind] = totals.get(kind, 0.0) + cpu
    return totals


def _kind(command: str) -> str:
    if "_WorkerActor" in command:
        return "workers"
    for kind in ("raylet", "gcs_server"):
        if command.endswith(kind):
            return kind
    return "other Ray processes"


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / TICK, sum(values) / TICK


def child(job: dict) -> None:
    os.environ.update(ENV)
    if job.get("worker_profile"):
        profile_worker(job)
    import raymerge.runner as runner
    from raymerge.index import verify
    from raymerge.layouts import tensors
    from raymerge.sizes import parse_size

    tmp = job["tmp"]
    out = os.path.join(tmp, f"out-{job['run']}")
    shutil.rmtree(out, ignore_errors=True)
    spec = bench_spec(job)
    measured: dict = {}
    profiler = cProfile.Profile() if job.get("profile") else None
    original_map = runner.WorkerPool.map

    def timed_map(self, items, *rest, **kwargs):
        measured["items"] = len(items)
        measured["rss_before"] = _status_kib("VmRSS") * 1024
        tree, machine = _tree_cpu(os.getpid()), _machine_busy()
        cpu, wall = _cpu_seconds(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            return original_map(self, items, *rest, **kwargs)
        finally:
            if profiler is not None:
                profiler.disable()
            measured["map_wall"] = time.perf_counter() - wall
            measured["map_cpu"] = _cpu_seconds() - cpu
            measured["rss_after"] = _status_kib("VmRSS") * 1024
            after, machine_after = _tree_cpu(os.getpid()), _machine_busy()
            measured["tree_cpu"] = {k: v - tree.get(k, 0.0) for k, v in after.items()}
            busy, total = (b - a for a, b in zip(machine, machine_after))
            measured["machine_busy"] = busy / total if total else 0.0

    runner.WorkerPool.map = timed_map
    if job.get("journal"):
        journal_records()
    options = runner.RunOptions(
        workers=job["workers"], progress=False,
        worker_memory=parse_size(job["worker_memory"], "--worker-memory"),
    )  # fmt: skip
    summary = runner.run_merge(spec, out, options, log=lambda _: None)
    units = summary.units_done
    result = {
        "units": units,
        "tensors": len(summary.plan.tensors),
        "parts": len(summary.plan.parts),
        "shards": len(summary.plan.shards),
        "input_tensors": len(tensors(job["layout"], job["scale"], job["layers"])),
        "bytes_written": summary.bytes_written,
        "bytes_read": summary.bytes_read,
        "seconds_total": summary.seconds_total,
        "seconds_merge": summary.seconds_merge,
        "seconds_startup": summary.seconds_startup,
        "seconds_map": measured["map_wall"],
        "units_per_s_merge": units / summary.seconds_merge,
        "units_per_s_map": units / measured["map_wall"],
        "units_per_s_total": units / summary.seconds_total,
        "driver_cpu_seconds_map": measured["map_cpu"],
        "driver_cpu_us_per_unit": measured["map_cpu"] / units * 1e6,
        "driver_wall_us_per_unit": measured["map_wall"] / units * 1e6,
        "cpu_us_per_unit_by_process": {
            kind: seconds / units * 1e6 for kind, seconds in sorted(measured["tree_cpu"].items())
        },
        "machine_cpu_busy_during_merge": measured["machine_busy"],
        "driver_peak_rss": _status_kib("VmHWM") * 1024,
        "driver_rss_before_merge": measured["rss_before"],
        "driver_rss_after_merge": measured["rss_after"],
        "worker_busy_seconds": summary.worker_seconds,
    }
    if job.get("verify"):
        report = verify(out)
        result["verify_problems"] = list(report.problems)
        result["verify_tensors"] = report.tensors
    if profiler is not None:
        result["profile"] = profile_report(profiler, job["top"])
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # the local Ray ends with the process (as the console script does)


def bench_spec(job: dict):
    from raymerge.config import parse_spec

    query = f"scale={job['scale']}&layers={job['layers']}"
    config = {
        "merge_method": "linear",
        "models": [
            {"model": f"virtual://{job['layout']}/model_{i}?{query}", "parameters": {"weight": 1}}
            for i in range(1, job["models"] + 1)
        ],
        "dtype": "bfloat16",
    }
    overrides = {"part_size": 1, "shard_size": job["shard_size"]}
    return parse_spec(config, "bench_schedule", job["tmp"], overrides)


def profile_worker(job: dict) -> None:
    """The worker's side of the same units, without Ray: one UnitRunner in this process runs
    every unit in turn (fetch, merge, CRC, write) under cProfile."""
    from raymerge.checkpoint import open_checkpoint
    from raymerge.plan import make_plan
    from raymerge.sizes import parse_size
    from raymerge.storage.local import LocalDestination
    from raymerge.worker import UnitRunner, WorkContext

    spec = bench_spec(job)
    memory = parse_size(job["worker_memory"], "--worker-memory")
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs], memory)
    out = os.path.join(job["tmp"], "out-worker")
    shutil.rmtree(out, ignore_errors=True)
    destination = LocalDestination(out)
    tokens = tuple(destination.begin_shard(s.name, s.size, None)[0] for s in plan.shards)
    context = WorkContext(
        plan.method, plan.seed, plan.inputs, out, tuple(s.name for s in plan.shards),
        tuple(s.header for s in plan.shards), tokens, plan.tensors,
    )  # fmt: skip
    runner = UnitRunner(context)
    for unit in plan.units[:50]:  # warm-up: first torch calls, the virtual sources' blocks
        runner.run(unit)
    profiler = cProfile.Profile()
    cpu, wall = _cpu_seconds(), time.perf_counter()
    profiler.enable()
    for unit in plan.units:
        runner.run(unit)
    profiler.disable()
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    units = len(plan.units)
    result = {
        "units": units,
        "cpu_us_per_unit": cpu / units * 1e6,
        "wall_us_per_unit": wall / units * 1e6,
        "profile": profile_report(profiler, job["top"]),
    }
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result), flush=True)
    os._exit(0)


def journal_records() -> None:
    """What-if, for sizing a fix: Ledger.record appends each unit's record to one open file
    (`_raymerge/units.jsonl`, one write(2) each, O_APPEND) instead of writing a file per unit
    through a temporary name. Resume does not read this file: benchmark use only."""
    from raymerge import ledger

    def record(self, unit, result) -> None:
        body = {"digest": self.plan.digest, "key": unit.key, "shard": unit.shard,
                "start": unit.start, "end": unit.end, "checksums": result.checksums,
                "receipt": result.receipt}  # fmt: skip
        fd = getattr(self, "_journal_fd", None)
        if fd is None:
            folder = os.path.join(self.destination.root, ledger.STATE_DIR)
            os.makedirs(folder, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            fd = self._journal_fd = os.open(os.path.join(folder, "units.jsonl"), flags, 0o644)
        os.write(fd, json.dumps(body).encode() + b"\n")
        self.done[unit.key] = body

    ledger.Ledger.record = record


def profile_report(profiler: cProfile.Profile, top: int) -> dict:
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        where = os.path.relpath(file, ROOT) if file.startswith(ROOT) else os.path.basename(file)
        rows.append({"function": f"{where}:{line}({name})", "calls": calls,
                     "tottime": tottime, "cumtime": cumtime})  # fmt: skip
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return {
        "total_seconds": sum(r["tottime"] for r in rows),
        "by_tottime": sorted(rows, key=lambda r: -r["tottime"])[:top],
        "by_cumtime": sorted(rows, key=lambda r: -r["cumtime"])[:top],
        "text": text.getvalue(),
    }


# --- the report --------------------------------------------------------------------------------

MEDIANS = (
    "units_per_s_merge", "units_per_s_map", "units_per_s_total", "seconds_merge",
    "seconds_total", "seconds_startup", "driver_cpu_us_per_unit", "driver_wall_us_per_unit",
    "driver_peak_rss", "driver_rss_before_merge", "driver_rss_after_merge",
)  # fmt: skip


def medians_of(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in MEDIANS}


def summarize(
    command: str, job: dict, runs: list[dict], profile: dict | None, journal: list[dict]
) -> dict:
    if not runs and profile is not None:  # --runs 0 --profile: the profiled run's numbers
        runs = [profile]
    medians = medians_of(runs)
    return {
        "command": command,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "setup": {k: v for k, v in job.items() if k != "tmp"},
        "units": runs[0]["units"],
        "tensors": runs[0]["tensors"],
        "shards": runs[0]["shards"],
        "target_units_per_s": TARGET_UNITS_PER_S,
        "target_met": medians["units_per_s_merge"] >= TARGET_UNITS_PER_S,
        "median": medians,
        "runs": [{k: v for k, v in r.items() if k != "profile"} for r in runs],
        "profile": profile.get("profile") if profile else None,
        "journal_what_if": {
            "median": medians_of(journal),
            "runs": journal,
        }
        if journal
        else None,
    }


def markdown(report: dict) -> str:
    m = report["median"]
    s = report["setup"]
    load = ", ".join(f"{x:.1f}" for x in report["machine"]["load_average"])
    mib = 2**20
    lines = [
        "# Driver scheduling throughput (bench_schedule.py)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpus']} CPUs, Python {report['machine']['python']}, "
        f"load average at the end {load} (the machine is shared).",
        "",
        f"Merge: linear of {s['models']} virtual `{s['layout']}` models, widths / {s['scale']}, "
        f"{s['layers']} layers: {report['tensors']} tensors, `--part-size 1` so "
        f"{report['units']} work units (one tensor each), {s['workers']} workers, "
        f"`--worker-memory {s['worker_memory']}`, output shards of {s['shard_size']} "
        f"({report['shards']} shards); local output.",
        "",
        "| | median | runs |",
        "|---|---:|---|",
    ]
    rows = [
        ("units/s, merging (summary)", "units_per_s_merge", "{:.0f}"),
        ("units/s, `WorkerPool.map` only", "units_per_s_map", "{:.0f}"),
        ("units/s, end to end", "units_per_s_total", "{:.0f}"),
        ("merging seconds", "seconds_merge", "{:.2f}"),
        ("total seconds", "seconds_total", "{:.2f}"),
        ("Ray + worker start-up seconds", "seconds_startup", "{:.2f}"),
        ("driver CPU per unit (us)", "driver_cpu_us_per_unit", "{:.0f}"),
        ("driver wall per unit (us)", "driver_wall_us_per_unit", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        values = ", ".join(fmt.format(r[key]) for r in report["runs"])
        lines.append(f"| {label} | {fmt.format(m[key])} | {values} |")
    kinds = sorted({k for r in report["runs"] for k in r["cpu_us_per_unit_by_process"]})
    for kind in kinds:
        per_run = [r["cpu_us_per_unit_by_process"].get(kind, 0.0) for r in report["runs"]]
        values = ", ".join(f"{v:.0f}" for v in per_run)
        lines.append(f"| CPU per unit, {kind} (us) | {statistics.median(per_run):.0f} | {values} |")
    busy = [r["machine_cpu_busy_during_merge"] * 100 for r in report["runs"]]
    values = ", ".join(f"{v:.0f}" for v in busy)
    lines.append(
        f"| machine CPU busy while merging, all processes (%) | {statistics.median(busy):.0f} "
        f"| {values} |"
    )
    for label, key in (
        ("driver peak RSS (MiB)", "driver_peak_rss"),
        ("driver RSS before merge (MiB)", "driver_rss_before_merge"),
        ("driver RSS after merge (MiB)", "driver_rss_after_merge"),
    ):
        values = ", ".join(f"{r[key] / mib:.0f}" for r in report["runs"])
        lines.append(f"| {label} | {m[key] / mib:.0f} | {values} |")
    verdict = "met" if report["target_met"] else "missed"
    lines += [
        "",
        f"Target {report['target_units_per_s']:.0f} units/s while merging: **{verdict}** "
        f"(median {m['units_per_s_merge']:.0f}).",
    ]
    verify = report["runs"][0].get("verify_problems")
    if verify is not None:
        lines.append(
            f"`raymerge.index.verify` of run 0: {len(verify)} problem(s) in "
            f"{report['runs'][0]['verify_tensors']} tensors."
        )
    journal = report.get("journal_what_if")
    if journal:
        j = journal["median"]
        values = ", ".join(f"{r['units_per_s_merge']:.0f}" for r in journal["runs"])
        lines += [
            "",
            "What-if (`--journal-what-if`, not raymerge's behaviour): the same runs with each "
            "unit's record appended to one file instead of written to a file of its own "
            f"(temporary name + rename): **{j['units_per_s_merge']:.0f} units/s** merging "
            f"({values}), driver {j['driver_cpu_us_per_unit']:.0f} us CPU / "
            f"{j['driver_wall_us_per_unit']:.0f} us wall per unit.",
        ]
    profile = report.get("profile")
    if profile:
        lines += [
            "",
            "## Profile of the driver's main thread during `WorkerPool.map` (cProfile)",
            "",
            "| function | calls | tottime s | cumtime s |",
            "|---|---:|---:|---:|",
        ]
        for row in profile["by_tottime"]:
            lines.append(
                f"| `{row['function']}` | {row['calls']} | {row['tottime']:.3f} | "
                f"{row['cumtime']:.3f} |"
            )
        lines += ["", "By cumulative time:", "", "| function | calls | cumtime s |",
                  "|---|---:|---:|"]  # fmt: skip
        for row in profile["by_cumtime"]:
            lines.append(f"| `{row['function']}` | {row['calls']} | {row['cumtime']:.3f} |")
    worker = report.get("worker_profile")
    if worker:
        lines += [
            "",
            "## Profile of the worker's side without Ray (`UnitRunner.run` on every unit in "
            "one process, cProfile)",
            "",
            f"{worker['units']} units: {worker['cpu_us_per_unit']:.0f} us CPU, "
            f"{worker['wall_us_per_unit']:.0f} us wall per unit (under the profiler).",
            "",
            "| function | calls | tottime s | cumtime s |",
            "|---|---:|---:|---:|",
        ]
        for row in worker["profile"]["by_tottime"]:
            lines.append(
                f"| `{row['function']}` | {row['calls']} | {row['tottime']:.3f} | "
                f"{row['cumtime']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
