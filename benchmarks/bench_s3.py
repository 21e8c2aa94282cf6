"""Time raymerge against local disk and a local S3 server, and against the server itself.

    .venv/bin/python benchmarks/bench_s3.py --runs 3 \
        --json benchmarks/results-s3.json --md benchmarks/results-s3.md

Starts a moto server on 127.0.0.1 (a free port), generates 3 Llama-layout models plus their
base (bf16, about 230 MB each by default; cached in .bench/s3-data) and uploads them. Then, in
each of N repetitions, side by side:

* the server's own throughput with plain boto3: one put_object, one multipart upload from one
  thread (64 MiB parts), one get_object, 8 MiB ranged GETs in sequence (what raymerge issues),
  and, for context, 8 ranged GETs in flight and 2 part uploads in flight (one raymerge
  worker's read pool; two workers uploading);
* the same merge (`raymerge run CONFIG OUT --workers 2 --no-progress --s3-endpoint URL`)
  local -> local, local -> S3, S3 -> local and S3 -> S3, end to end and split with the times
  raymerge prints (start-up with planning, merging, indexes);
* reads of each output: `raymerge.open(uri)[name]` of one large tensor, `raymerge verify`;
* a byte-for-byte comparison of every output with the local -> local one.

Reports medians, MiB/s, and merge throughput over the server's single-stream throughput.
Everything listens on and talks to 127.0.0.1 only; the credentials are moto's fake ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # tests.s3_support (MotoServer)
sys.path.insert(0, HERE)  # bench_merge: PeakMemory and the same linear/ties configs

from bench_merge import CONFIGS, PeakMemory  # noqa: E402

RAYMERGE = os.path.join(os.path.dirname(sys.executable), "raymerge")
if not os.path.exists(RAYMERGE):  # run from a source tree without the console script
    RAYMERGE = f"{sys.executable} -m raymerge.cli"
MiB = 1 << 20
BUCKET = "bench"
RANGE = 8 * MiB  # raymerge's READ_CHUNK
PART = 64 * MiB  # raymerge's default part size
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
ROUTES = [  # (name, inputs from, output to)
    ("local -> local", "local", "local"),
    ("local -> S3", "local", "s3"),
    ("S3 -> local", "s3", "local"),
    ("S3 -> S3", "s3", "s3"),
]
ROLES = ("model_1", "model_2", "model_3", "base")


def median(values: list[float]) -> float:
    return statistics.median(values)


def roles_of(method: str) -> list[str]:
    body = CONFIGS[method]
    return [m["model"] for m in body["models"]] + (
        [body["base_model"]] if "base_model" in body else []
    )


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def synth(data: str, args) -> None:
    dims = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab")}
    stamp = os.path.join(data, "dims.json")
    if os.path.exists(stamp) and os.path.exists(os.path.join(data, "base", "config.json")):
        with open(stamp) as f:
            if json.load(f) == dims:
                return
    shutil.rmtree(data, ignore_errors=True)
    print(f"generating models in {data} ({dims}) ...", flush=True)
    flags = [x for k, v in dims.items() for x in (f"--{k}", str(v))]
    command = ["synth", data, "--models", "3", "--with-base", *flags]
    subprocess.run(RAYMERGE.split() + command, check=True, stdout=subprocess.DEVNULL)
    with open(stamp, "w") as f:
        json.dump(dims, f)


def files_of(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))


def upload_models(client, data: str, roles: list[str]) -> tuple[int, float]:
    """Upload every file of the roles to s3://bench/models/ROLE/ (boto3's managed transfer)."""
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=4)
    total, started = 0, time.perf_counter()
    for role in roles:
        for name in files_of(os.path.join(data, role)):
            path = os.path.join(data, role, name)
            client.upload_file(path, BUCKET, f"models/{role}/{name}", Config=transfer)
            total += os.path.getsize(path)
    return total, time.perf_counter() - started


def write_configs(data: str, methods: list[str]) -> dict[tuple[str, str], str]:
    """(method, "local" | "s3") -> config path: absolute local paths, or s3:// prefixes."""
    import yaml

    paths = {}
    for method in methods:
        for where in ("local", "s3"):
            body = json.loads(json.dumps(CONFIGS[method]))
            place = (
                (lambda r: os.path.join(data, r))
                if where == "local"
                else (lambda r: f"s3://{BUCKET}/models/{r}")
            )
            for entry in body["models"]:
                entry["model"] = place(entry["model"])
            if "base_model" in body:
                body["base_model"] = place(body["base_model"])
            path = paths[method, where] = os.path.join(data, f"{method}-{where}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(body, f, sort_keys=False)
    return paths


def warm(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 * MiB):
                pass


# --------------------------------------------------------------------------------------------
# the server's own throughput, plain boto3
# --------------------------------------------------------------------------------------------


def bench_client(endpoint: str):
    """A client configured like raymerge's (path-style, the same pool size), no proxies."""
    from tests.s3_support import s3_client

    return s3_client(
        endpoint, max_attempts=10, max_pool_connections=16, read_timeout=120,
        s3={"addressing_style": "path"},
    )  # fmt: skip


def server_speeds(client, payload: bytes) -> dict[str, float]:
    """Seconds for each of the server's single-stream (and two concurrent) transfers."""
    size = len(payload)
    view = memoryview(payload)
    out: dict[str, float] = {}

    started = time.perf_counter()
    client.put_object(Bucket=BUCKET, Key="probe/put", Body=payload)
    out["put_object"] = time.perf_counter() - started

    started = time.perf_counter()
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="probe/mpu")["UploadId"]
    parts = []
    for number, lo in enumerate(range(0, size, PART), 1):
        body = view[lo : lo + PART].tobytes()
        etag = client.upload_part(
            Bucket=BUCKET, Key="probe/mpu", UploadId=upload, PartNumber=number, Body=body
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(
        Bucket=BUCKET, Key="probe/mpu", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    out["multipart_1"] = time.perf_counter() - started

    started = time.perf_counter()
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="probe/mpu2")["UploadId"]

    def put_part(item):
        number, lo = item
        body = view[lo : lo + PART].tobytes()
        etag = client.upload_part(
            Bucket=BUCKET, Key="probe/mpu2", UploadId=upload, PartNumber=number, Body=body
        )["ETag"]
        return {"PartNumber": number, "ETag": etag}

    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(put_part, enumerate(range(0, size, PART), 1)))
    client.complete_multipart_upload(
        Bucket=BUCKET, Key="probe/mpu2", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    out["multipart_2"] = time.perf_counter() - started

    started = time.perf_counter()
    data = client.get_object(Bucket=BUCKET, Key="probe/put")["Body"].read()
    out["get_object"] = time.perf_counter() - started
    assert len(data) == size
    del data

    def get_range(lo: int) -> int:
        hi = min(lo + RANGE, size) - 1
        body = client.get_object(Bucket=BUCKET, Key="probe/put", Range=f"bytes={lo}-{hi}")
        return len(body["Body"].read())

    started = time.perf_counter()
    got = sum(get_range(lo) for lo in range(0, size, RANGE))
    out["ranged_1"] = time.perf_counter() - started
    assert got == size

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        got = sum(pool.map(get_range, range(0, size, RANGE)))
    out["ranged_8"] = time.perf_counter() - started
    assert got == size
    return out


SERVER_LABELS = {
    "put_object": "one put_object, one stream",
    "multipart_1": "multipart upload, 64 MiB parts, one thread",
    "get_object": "one get_object, one stream",
    "ranged_1": "8 MiB ranged GETs in sequence, one stream",
    "multipart_2": "multipart upload, 64 MiB parts, 2 in flight (context)",
    "ranged_8": "8 MiB ranged GETs, 8 in flight (context: one worker's read pool)",
}


# --------------------------------------------------------------------------------------------
# raymerge runs
# --------------------------------------------------------------------------------------------

TIME_LINE = re.compile(
    r"time: ([0-9.]+) s total = ([0-9.]+) s start-up .*?\+ ([0-9.]+) s merging "
    r"\+ (-?[0-9.]+) s indexes"
)
BUSY_LINE = re.compile(r"worker (\S+): ([0-9.]+) s busy")
READ_LINE = re.compile(r"read (.+?) \((.+?)/s\), wrote (.+?) \((.+?)/s\)")


class RssPeak:
    """Peak resident set of one process (the moto server), sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.2):
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
                self.peak = max(self.peak, rss * 1024)
            except (OSError, StopIteration, ValueError):
                pass

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def run_command(command: list[str], cwd: str) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    memory = PeakMemory(process.pid)
    out, err = process.communicate()
    wall = time.perf_counter() - started
    return {
        "command": command, "rc": process.returncode, "wall": wall, "peak": memory.stop(),
        "stdout": out, "stderr": err,
    }  # fmt: skip


def run_merge(config: str, out: str, args, endpoint: str) -> dict:
    command = RAYMERGE.split() + [
        "run", config, out, "--workers", str(args.workers), "--no-progress",
        "--part-size", args.part_size, "--s3-endpoint", endpoint,
    ]  # fmt: skip
    result = run_command(command, ROOT)
    row = {"wall": result["wall"], "peak": result["peak"], "rc": result["rc"]}
    found = TIME_LINE.search(result["stdout"])
    if result["rc"] != 0 or not found:
        row["error"] = (result["stderr"] + result["stdout"])[-3000:]
        return row
    row.update(
        total=float(found.group(1)), startup=float(found.group(2)),
        merge=float(found.group(3)), planning=float(found.group(4)),
        busy={w: float(s) for w, s in BUSY_LINE.findall(result["stdout"])},
    )  # fmt: skip
    counted = READ_LINE.search(result["stdout"])
    if counted:
        row["reported"] = {"read": counted.group(1), "wrote": counted.group(3)}
    row["stderr"] = result["stderr"][-1000:]  # warnings, if any
    return row


def clear_s3(client, prefix: str) -> None:
    """Delete every object under prefix/ and abort its unfinished uploads."""
    base = prefix.rstrip("/") + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=base):
        keys = [{"Key": e["Key"]} for e in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
    pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=BUCKET, Prefix=base)
    for page in pages:
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(
                Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
            )


def clear(client, out: str) -> None:
    if out.startswith("s3://"):
        clear_s3(client, out[len(f"s3://{BUCKET}/") :])
    else:
        shutil.rmtree(out, ignore_errors=True)


def output_files(client, out: str) -> dict[str, bytes]:
    """name -> bytes of every file directly in the output (not raymerge's _raymerge ledger)."""
    if not out.startswith("s3://"):
        names = files_of(out)
        found = {}
        for name in names:
            with open(os.path.join(out, name), "rb") as f:
                found[name] = f.read()
        return found
    base = out[len(f"s3://{BUCKET}/") :] + "/"
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=base, Delimiter="/"
    ):
        for entry in page.get("Contents", []):
            name = entry["Key"][len(base) :]
            found[name] = client.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read()
    return found


def compare(reference: dict[str, bytes], other: dict[str, bytes]) -> dict:
    """Which files differ; tensors.parquet is also compared without its `sources` column (the
    inputs' paths or URIs, which differ by route), and COMPLETE holds a digest of it."""
    names = sorted(set(reference) | set(other))
    differ = [n for n in names if reference.get(n) != other.get(n)]
    shards = [n for n in names if n.endswith(".safetensors")]
    found = {
        "files": names,
        "differ": differ,
        "identical": not differ,
        "shards_identical": all(reference.get(n) == other.get(n) for n in shards),
        "bytes": sum(len(v) for v in other.values()),
    }
    if "tensors.parquet" in differ and "tensors.parquet" in other:
        found["index_differs_only_in_sources"] = _same_but_sources(
            reference["tensors.parquet"], other["tensors.parquet"]
        )
    return found


def _same_but_sources(a: bytes, b: bytes) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    left, right = (pq.read_table(pa.BufferReader(x)) for x in (a, b))
    if left.schema != right.schema or left.schema.metadata != right.schema.metadata:
        return False
    columns = [c for c in left.column_names if c != "sources"]
    return left.select(columns).equals(right.select(columns))


# --------------------------------------------------------------------------------------------
# reads of an output
# --------------------------------------------------------------------------------------------


def read_tensor(uri: str, name: str, times: int) -> dict:
    """Seconds to open the output, then to read one tensor `times` times (one GET each)."""
    import raymerge

    started = time.perf_counter()
    model = raymerge.open(uri)
    opened = time.perf_counter() - started
    seconds, size = [], 0
    for _ in range(times):
        started = time.perf_counter()
        tensor = model[name]
        seconds.append(time.perf_counter() - started)
        size = tensor.numel() * tensor.element_size()
        del tensor
    return {"open": opened, "read": seconds, "bytes": size}


def run_verify(out: str, endpoint: str) -> dict:
    command = RAYMERGE.split() + ["verify", out]
    if out.startswith("s3://"):
        command += ["--s3-endpoint", endpoint]
    result = run_command(command, ROOT)
    row = {"wall": result["wall"], "rc": result["rc"], "stdout": result["stdout"].strip()}
    if result["rc"] != 0:
        row["error"] = (result["stderr"] + result["stdout"])[-2000:]
    return row


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.path.join(ROOT, ".bench", "s3-data"))
    parser.add_argument("--out", help="local outputs (default: .bench/s3-out)")
    parser.add_argument("--layers", type=int, default=4, help="4 layers: about 234 MB a model")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["linear"], choices=list(CONFIGS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--part-size", default="64MiB")
    parser.add_argument("--probe-mib", type=int, default=256, help="size of the server probes")
    parser.add_argument("--reads", type=int, default=3, help="tensor reads per repetition")
    parser.add_argument("--tensor", default="model.embed_tokens.weight")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--md", help="write the markdown report here")
    parser.add_argument("--report", metavar="JSON", help="only re-render the report of a run")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as f:
            text = report(json.load(f))
        print(text)
        if args.md:
            with open(args.md, "w") as f:
                f.write(text + "\n")
        return

    os.environ.update(ENV)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
        os.environ.pop(key, None)  # the endpoint is passed explicitly; Ray starts locally

    import boto3
    import moto
    import ray  # noqa: F401 - only its version
    import torch  # noqa: F401 - imported before timing reads

    from tests.s3_support import MotoServer

    started_all = time.perf_counter()
    args.data = os.path.abspath(args.data)
    scratch = os.path.abspath(args.out or os.path.join(os.path.dirname(args.data), "s3-out"))
    os.makedirs(scratch, exist_ok=True)
    synth(args.data, args)
    roles = sorted({r for m in args.methods for r in roles_of(m)})
    configs = write_configs(args.data, args.methods)

    server = MotoServer()
    endpoint = server.endpoint
    print(f"moto_server at {endpoint} (pid {server.pid})", flush=True)
    moto_memory = RssPeak(server.pid)
    try:
        client = bench_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        uploaded, upload_s = upload_models(client, args.data, roles)
        print(f"uploaded {uploaded / MiB:.0f} MiB in {upload_s:.1f} s", flush=True)
        from raymerge.storage import s3 as rs3

        rs3.configure(rs3.S3Settings.resolve(endpoint))  # for raymerge.open in this process
        payload = os.urandom(args.probe_mib * MiB)
        results: dict = {
            "machine": f"{os.cpu_count()} CPUs, {platform.python_version()}",
            "versions": {
                "moto": moto.__version__, "boto3": boto3.__version__,
                "ray": sys.modules["ray"].__version__,
            },  # fmt: skip
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT),
                                                          *sys.argv]),  # fmt: skip
            "dims": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab")},
            "workers": args.workers, "part_size": args.part_size, "tensor": args.tensor,
            "probe_bytes": len(payload), "upload": {"bytes": uploaded, "seconds": upload_s},
            "server": [], "methods": {},
        }  # fmt: skip
        for method in args.methods:
            local_inputs = [
                os.path.join(args.data, r, f)
                for r in roles_of(method)
                for f in files_of(os.path.join(args.data, r))
                if f.endswith(".safetensors")
            ]
            results["methods"][method] = {
                "input_bytes": sum(os.path.getsize(p) for p in local_inputs),
                "runs": [],
            }
        for run in range(args.runs):
            results.setdefault("loadavg", []).append(os.getloadavg()[0])
            speeds = server_speeds(client, payload)
            results["server"].append(speeds)
            print(f"run {run + 1} server: " + ", ".join(
                f"{k} {len(payload) / MiB / v:.0f} MiB/s" for k, v in speeds.items()
            ), flush=True)  # fmt: skip
            for method in args.methods:
                entry = results["methods"][method]
                local_inputs = [
                    os.path.join(args.data, r, f)
                    for r in roles_of(method)
                    for f in files_of(os.path.join(args.data, r))
                    if f.endswith(".safetensors")
                ]
                row: dict = {"routes": {}, "reads": {}, "verify": {}, "identity": {}}
                outs = {}
                for name, src, dst in ROUTES:
                    tag = f"{method}-{src}-to-{dst}"
                    out = f"s3://{BUCKET}/out/{tag}" if dst == "s3" else os.path.join(scratch, tag)
                    outs[name] = out
                    clear(client, out)
                    if src == "local":
                        warm(local_inputs)
                    row["routes"][name] = result = run_merge(
                        configs[method, src], out, args, endpoint
                    )
                    shown = {k: v for k, v in result.items() if k not in ("stderr", "busy")}
                    print(f"run {run + 1} {method} {name}: {json.dumps(shown)}", flush=True)
                reference_out = outs["local -> local"]
                reference = (
                    output_files(client, reference_out)
                    if "error" not in row["routes"]["local -> local"]
                    else None
                )
                if reference is not None:
                    entry["output_bytes"] = sum(
                        len(v) for k, v in reference.items() if k.endswith(".safetensors")
                    )
                for name, _, _ in ROUTES[1:]:
                    if reference is None or "error" in row["routes"][name]:
                        continue
                    row["identity"][name] = compare(reference, output_files(client, outs[name]))
                del reference
                for label, out in (("local", reference_out), ("S3", outs["S3 -> S3"])):
                    key = "local -> local" if label == "local" else "S3 -> S3"
                    if "error" in row["routes"][key]:
                        continue
                    try:
                        row["reads"][label] = read_tensor(out, args.tensor, args.reads)
                    except Exception as exc:  # a finding, not a crash of the benchmark
                        row["reads"][label] = {"error": f"{type(exc).__name__}: {exc}"}
                    row["verify"][label] = run_verify(out, endpoint)
                print(
                    f"run {run + 1} {method} reads: "
                    + json.dumps({k: v for k, v in row["reads"].items()})
                    + " verify: "
                    + json.dumps({k: round(v["wall"], 2) for k, v in row["verify"].items()})
                    + " identical: "
                    + json.dumps(
                        {
                            k: [v["identical"], v["shards_identical"]]
                            for k, v in row["identity"].items()
                        }
                    ),
                    flush=True,
                )
                entry["runs"].append(row)
        results["loadavg"].append(os.getloadavg()[0])
        results["seconds_total"] = time.perf_counter() - started_all
        results["moto_peak_rss"] = moto_memory.stop()
    finally:
        server.stop()
    text = report(results)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def mibs(nbytes: float, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("nan")


def spread(values: list[float], digits: int = 0) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}" if len(values) > 1 else ""


def report(results: dict) -> str:
    size = results["probe_bytes"]
    server = {k: [size / MiB / r[k] for r in results["server"]] for k in SERVER_LABELS}
    single_put = median(server["multipart_1"])
    single_get = median(server["ranged_1"])
    lines = [
        "# raymerge to and from a local S3 server (moto), side by side with local disk",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Machine: {results['machine']}; moto {results['versions']['moto']}, boto3 "
        f"{results['versions']['boto3']}, Ray {results['versions']['ray']}. "
        f"Models: `raymerge synth --models 3 --with-base` with {results['dims']}; "
        f"`raymerge run ... --workers {results['workers']} --no-progress --part-size "
        f"{results['part_size']} --s3-endpoint http://127.0.0.1:PORT`. "
        f"{len(results['server'])} repetition(s); medians (min–max over repetitions). "
        f"Whole benchmark: {results.get('seconds_total', 0):.0f} s; the moto server's peak "
        f"resident set: {results.get('moto_peak_rss', 0) / 2**30:.2f} GiB. 1-minute load "
        f"average at the start of each repetition and at the end: "
        f"{', '.join(f'{x:.1f}' for x in results.get('loadavg', []))} (2 cores, shared).",
        "",
        f"## The server alone (plain boto3, {size / MiB:.0f} MiB objects)",
        "",
        "| transfer | median MiB/s | range |",
        "|---|---|---|",
    ]
    for key, label in SERVER_LABELS.items():
        lines.append(f"| {label} | {median(server[key]):.0f} | {spread(server[key])} |")
    for method, entry in results["methods"].items():
        runs = entry["runs"]
        read_bytes = entry["input_bytes"]
        write_bytes = entry.get("output_bytes", 0)
        lines += [
            "",
            f"## {method}: the same merge by route (reads {read_bytes / MiB:.0f} MiB, writes "
            f"{write_bytes / MiB:.0f} MiB)",
            "",
            "End to end = wall time of `raymerge run`; merge phase = the `s merging` figure it "
            "prints. Read MiB/s = input bytes / time, write MiB/s = output bytes / time. "
            f"Ratios: merge-phase throughput over the server's single-stream figure (reads: "
            f"8 MiB ranged GETs in sequence, {single_get:.0f} MiB/s; writes: multipart from one "
            f"thread, {single_put:.0f} MiB/s).",
            "",
            "| route | ok | wall s | start-up s | merging s | planning + indexes s | read MiB/s "
            "(end to end / merge phase) | write MiB/s (end to end / merge phase) | S3 read ÷ "
            "single-stream GET | S3 write ÷ single-stream PUT | peak RSS of one process |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, src, dst in ROUTES:
            rows = [r["routes"][name] for r in runs]
            good = [r for r in rows if "error" not in r]
            ok = f"{len(good)}/{len(rows)}"
            if not good:
                lines.append(f"| {name} | {ok} | | | | | | | | | |")
                continue
            wall = median([r["wall"] for r in good])
            merge = median([r["merge"] for r in good])
            startup = median([r["startup"] for r in good])
            planning = median([r["planning"] for r in good])
            peak = median([r["peak"] for r in good]) / 2**30
            read_ratio = f"{mibs(read_bytes, merge) / single_get:.2f}" if src == "s3" else ""
            write_ratio = f"{mibs(write_bytes, merge) / single_put:.2f}" if dst == "s3" else ""
            lines.append(
                f"| {name} | {ok} | {wall:.2f} ({spread([r['wall'] for r in good], 1) or '-'}) | "
                f"{startup:.2f} | {merge:.2f} | {planning:.2f} | "
                f"{mibs(read_bytes, wall):.0f} / {mibs(read_bytes, merge):.0f} | "
                f"{mibs(write_bytes, wall):.0f} / {mibs(write_bytes, merge):.0f} | "
                f"{read_ratio} | {write_ratio} | {peak:.2f} GiB |"
            )
        lines += [
            "",
            f"Workers that merged anything ({results['workers']} asked for) and their busy "
            "seconds (read + merge + write), per repetition: "
            + "; ".join(
                f"{name}: "
                + ", ".join(_busy(r["routes"][name]) for r in runs if "busy" in r["routes"][name])
                for name, _, _ in ROUTES
            ),
        ]
        lines += [
            "",
            f"## {method}: reading the outputs",
            "",
            "| read | median s | MiB/s | range MiB/s | ÷ server single-stream |",
            "|---|---|---|---|---|",
        ]
        single_full = median(server["get_object"])
        for label in ("local", "S3"):
            found = [r["reads"][label] for r in runs if label in r["reads"]]
            found = [f for f in found if "error" not in f]
            if found:
                nbytes = found[0]["bytes"]
                seconds = [s for f in found for s in f["read"]]
                speeds = [mibs(nbytes, s) for s in seconds]
                ratio = (
                    f"{mibs(nbytes, median(seconds)) / single_full:.2f} of one get_object"
                    if label == "S3"
                    else ""
                )
                lines.append(
                    f"| `raymerge.open(uri)[{results['tensor']!r}]` "
                    f"({nbytes / MiB:.1f} MiB), {label} output | {median(seconds):.3f} | "
                    f"{mibs(nbytes, median(seconds)):.0f} | {spread(speeds)} | {ratio} |"
                )
                opens = [f["open"] for f in found]
                lines.append(
                    f"| `raymerge.open(uri)` itself (index read), {label} output | "
                    f"{median(opens):.3f} | | | |"
                )
            verifies = [r["verify"][label] for r in runs if label in r["verify"]]
            good = [v for v in verifies if v["rc"] == 0]
            if good:
                seconds = [v["wall"] for v in good]
                speeds = [mibs(write_bytes, s) for s in seconds]
                ratio = (
                    f"{mibs(write_bytes, median(seconds)) / single_get:.2f} of ranged GETs"
                    if label == "S3"
                    else ""
                )
                lines.append(
                    f"| `raymerge verify` ({len(good)}/{len(verifies)} ok), {label} output, whole "
                    f"command | {median(seconds):.2f} | {mibs(write_bytes, median(seconds)):.0f} | "
                    f"{spread(speeds)} | {ratio} |"
                )
            elif verifies:
                lines.append(f"| `raymerge verify`, {label} output | failed | | | |")
        lines += ["", f"## {method}: outputs compared byte for byte with local -> local", ""]
        for name, _, _ in ROUTES[1:]:
            checks = [r["identity"][name] for r in runs if name in r["identity"]]
            if not checks:
                lines.append(f"- {name}: not compared (the run failed)")
                continue
            same = sum(c["identical"] for c in checks)
            shards = sum(c["shards_identical"] for c in checks)
            differ = sorted({d for c in checks for d in c["differ"]})
            only_sources = [
                c["index_differs_only_in_sources"]
                for c in checks
                if "tensors.parquet" in c["differ"]
            ]
            expected = {"COMPLETE", "tensors.parquet"}
            line = (
                f"- {name}: all {len(checks[0]['files'])} files byte-identical "
                f"({', '.join(checks[0]['files'])})"
                if same == len(checks)
                else f"- {name}: shards byte-identical in {shards}/{len(checks)} repetitions; "
                f"differing files: {', '.join(differ)}"
            )
            if differ and set(differ) <= expected and only_sources and all(only_sources):
                line += (
                    " — tensors.parquet equal but for its `sources` column (the inputs' "
                    "s3:// URIs instead of local paths), and COMPLETE's digest covers it; "
                    "every other file byte-identical"
                )
            lines.append(line)
        failures = [
            (i + 1, name, r["routes"][name]["error"])
            for i, r in enumerate(runs)
            for name, _, _ in ROUTES
            if "error" in r["routes"][name]
        ]
        if failures:
            lines += ["", f"## {method}: failures", ""]
            for run, name, error in failures:
                lines += [f"run {run}, {name}:", "```", error.strip()[-1500:], "```"]
    return "\n".join(lines)


def _busy(row: dict) -> str:
    """ "N (s, s)": how many workers reported units, and each one's busy seconds."""
    seconds = [row["busy"][w] for w in sorted(row["busy"])]
    return f"{len(seconds)} ({', '.join(f'{s:.1f} s' for s in seconds)})"


if __name__ == "__main__":
    main()
