"""The driver: plan, hand parts to worker actors, commit shards, write indexes, then COMPLETE.

The driver never touches tensor data: workers read their inputs and write their parts
themselves, and return checksums and timings. A rerun of the same merge resumes: each
finished part is recorded under `_raymerge/parts/`, and recorded parts are skipped.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from raymerge.checkpoint import CONFIG_FILES, TOKENIZER_FILES, Checkpoint, open_checkpoint
from raymerge.errors import ConfigError, MergeFailed, RaymergeError
from raymerge.index import COMPLETE, HF_INDEX, TENSOR_INDEX, hf_index, table_bytes, tensor_table
from raymerge.plan import Part, Plan, make_plan
from raymerge.ray_cluster import cluster_resources, ray_session
from raymerge.sizes import human
from raymerge.spec import MergeSpec
from raymerge.storage import open_destination
from raymerge.storage.base import Destination
from raymerge.worker import PartResult, PartRunner, WorkContext, checksum

STATE_DIR = "_raymerge"
RUN_RECORD = f"{STATE_DIR}/run.json"
PLAN_TABLE = f"{STATE_DIR}/plan.parquet"
PART_RECORDS = f"{STATE_DIR}/parts"
SHARD_TOKENS = f"{STATE_DIR}/shards.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors(\.partial)?")
IN_FLIGHT_PER_WORKER = 2  # one merging, one queued, so a worker never waits on the driver


@dataclass
class RunOptions:
    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    force: bool = False
    progress: bool = True
    max_attempts: int = 3
    runtime_env: dict | None = None
    fsync: bool = False


@dataclass
class RunSummary:
    out: str
    plan: Plan
    parts_done: int = 0
    parts_resumed: int = 0
    retries: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds_total: float = 0.0
    seconds_merge: float = 0.0
    seconds_startup: float = 0.0
    worker_seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        merge = max(self.seconds_merge, 1e-9)
        lines = [
            f"merged {len(self.plan.tensors)} tensors into {len(self.plan.shards)} shard(s) "
            f"at {self.out}",
            f"parts: {self.parts_done} merged, {self.parts_resumed} resumed, "
            f"{self.retries} retried",
            f"read {human(self.bytes_read)} ({human(self.bytes_read / merge)}/s), "
            f"wrote {human(self.bytes_written)} ({human(self.bytes_written / merge)}/s)",
            f"time: {self.seconds_total:.2f} s total = {self.seconds_startup:.2f} s Ray and "
            f"worker start-up + {self.seconds_merge:.2f} s merging + "
            f"{self.seconds_total - self.seconds_startup - self.seconds_merge:.2f} s planning "
            "and indexes",
        ]
        for worker, seconds in sorted(self.worker_seconds.items()):
            lines.append(f"  worker {worker}: {seconds:.2f} s busy")
        return lines


def run_merge(
    spec: MergeSpec, out: str, options: RunOptions, log: Callable[[str], None] = print
) -> RunSummary:
    started = time.perf_counter()
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    plan = make_plan(spec, checkpoints)
    destination = open_destination(out, options.fsync)
    done = _claim_destination(destination, plan, options.force, log)
    _write_run_record(destination, plan, spec)
    committed, tokens = _open_shards(destination, plan, done)
    summary = RunSummary(out, plan, parts_resumed=len(done))
    pending = [p for p in plan.parts if p.key not in done]
    context = WorkContext(
        method=plan.method,
        seed=plan.seed,
        inputs=plan.inputs,
        destination=out,
        shard_names=tuple(s.name for s in plan.shards),
        shard_tokens=tokens,
        device="cuda" if options.gpus_per_worker > 0 else "cpu",
    )

    def on_result(result: PartResult) -> None:
        done[result.key] = result
        _record_part(destination, plan, result)
        summary.parts_done += 1
        summary.bytes_read += result.bytes_read
        summary.bytes_written += result.bytes_written
        busy = result.seconds_read + result.seconds_merge + result.seconds_write
        summary.worker_seconds[result.worker] = summary.worker_seconds.get(result.worker, 0) + busy
        _commit_ready_shards(destination, plan, tokens, done, committed, result.shard)

    for shard in range(len(plan.shards)):
        _commit_ready_shards(destination, plan, tokens, done, committed, shard)
    if pending:
        startup = time.perf_counter()
        with ray_session(options.address, _local_cpus(options)):
            resumed_bytes = sum(p.nbytes for p in plan.parts if p.key in done)
            summary.retries, summary.seconds_merge = _execute(
                pending, context, options, on_result, plan.bytes_to_write, resumed_bytes
            )
        summary.seconds_startup = time.perf_counter() - startup - summary.seconds_merge
    _finish(destination, plan, spec, checkpoints, done)
    summary.seconds_total = time.perf_counter() - started
    return summary


def _local_cpus(options: RunOptions) -> int:
    wanted = (options.workers or 1) * max(options.cpus_per_worker, 0)
    return max(os.cpu_count() or 1, int(wanted + 0.999))


def _claim_destination(
    destination: Destination, plan: Plan, force: bool, log: Callable[[str], None]
) -> dict[str, PartResult]:
    """Check the output folder is ours to write; returns parts recorded by an earlier run."""
    entries = destination.list()
    if not entries:
        return {}
    record = destination.read_text(RUN_RECORD)
    previous = json.loads(record).get("digest") if record else None
    complete = COMPLETE in entries
    if force:
        _remove_outputs(destination, entries)
        return {}
    where = destination.root
    if previous == plan.digest and not complete:
        done = _read_part_records(destination, plan)
        log(
            f"resuming an unfinished run of this merge in {where}: {len(done)} of "
            f"{len(plan.parts)} parts already written"
        )
        return done
    if previous == plan.digest:
        raise ConfigError(f"{where} already holds this merge, complete; use --force to redo it")
    what = "a different merge" if previous else f"{len(entries)} entries"
    raise ConfigError(
        f"output folder {where} is not empty (it holds {what}); choose an empty folder or pass "
        "--force to overwrite raymerge's files there"
    )


def _remove_outputs(destination: Destination, entries: list[str]) -> None:
    ours = {STATE_DIR + "/", HF_INDEX, TENSOR_INDEX, COMPLETE, *CONFIG_FILES, *TOKENIZER_FILES}
    for entry in entries:
        if entry in ours or SHARD_PATTERN.fullmatch(entry):
            destination.remove(entry.rstrip("/"))


def _write_run_record(destination: Destination, plan: Plan, spec: MergeSpec) -> None:
    record = {"digest": plan.digest, "spec": spec.to_json(), "created": time.time()}
    destination.write_file(RUN_RECORD, json.dumps(record, indent=2).encode())
    destination.write_file(
        PLAN_TABLE, table_bytes(tensor_table(plan, defaultdict(str), list(plan.inputs)))
    )


def _record_part(destination: Destination, plan: Plan, result: PartResult) -> None:
    body = {
        "digest": plan.digest,
        "key": result.key,
        "receipt": result.receipt,
        "checksums": result.checksums,
        "bytes_read": result.bytes_read,
    }
    destination.write_file(f"{PART_RECORDS}/{result.key}.json", json.dumps(body).encode())


def _read_part_records(destination: Destination, plan: Plan) -> dict[str, PartResult]:
    done = {}
    for part in plan.parts:
        text = destination.read_text(f"{PART_RECORDS}/{part.key}.json")
        if text is None:
            continue
        try:
            body = json.loads(text)
        except ValueError:
            continue  # a torn record: redo the part
        if body.get("digest") == plan.digest:
            done[part.key] = PartResult(
                part.key, part.shard, part.number, body["receipt"], body["checksums"], 0, 0
            )
    return done


def _open_shards(
    destination: Destination, plan: Plan, done: dict[str, PartResult]
) -> tuple[set[int], tuple[str, ...]]:
    """Start (or pick up) every shard not yet committed; forget recorded parts of a shard
    whose partial data is gone."""
    record = destination.read_text(SHARD_TOKENS)
    previous = json.loads(record) if record else {}
    if previous.get("digest") != plan.digest:
        previous = {}
    entries = set(destination.list())
    committed, tokens = set(), []
    for index, shard in enumerate(plan.shards):
        keys = [p.key for p in plan.parts_of(index)]
        if shard.name in entries and all(k in done for k in keys):
            committed.add(index)
            tokens.append("")
            continue
        token, resumed = destination.begin_shard(
            shard.name, shard.size, previous.get("tokens", {}).get(shard.name)
        )
        for part in plan.parts_of(index):
            if part.key in done and not (resumed and _part_intact(destination, token, part, done)):
                del done[part.key]
        tokens.append(token)
    names = [s.name for s in plan.shards]
    body = {"digest": plan.digest, "tokens": dict(zip(names, tokens))}
    destination.write_file(SHARD_TOKENS, json.dumps(body).encode())
    return committed, tuple(tokens)


def _part_intact(destination: Destination, token: str, part: Part, done: dict) -> bool:
    """Whether a part recorded by an earlier run still holds the bytes its record describes
    (without fsync, a crash of the machine can lose written data but keep the record)."""
    data = destination.read_part(token, part.start, part.nbytes)
    if data is None:
        return True  # not readable back: the store itself checked the part
    checksums = done[part.key].checksums
    for tensor in part.tensors:
        piece = data[tensor.start - part.start : tensor.end - part.start]
        if checksums.get(tensor.name) != checksum(piece):
            return False
    return len(data) == part.nbytes


def _commit_ready_shards(destination, plan, tokens, done, committed, shard: int) -> None:
    if shard in committed:
        return
    parts = plan.parts_of(shard)
    if all(p.key in done for p in parts):
        receipts = [done[p.key].receipt for p in parts]
        destination.commit_shard(plan.shards[shard].name, tokens[shard], receipts)
        committed.add(shard)


def _finish(
    destination: Destination,
    plan: Plan,
    spec: MergeSpec,
    checkpoints: list[Checkpoint],
    done: dict[str, PartResult],
) -> None:
    checksums = {name: c for result in done.values() for name, c in result.checksums.items()}
    _copy_side_files(destination, plan, spec, checkpoints)
    destination.write_file(HF_INDEX, hf_index(plan))
    names = [m.given for m in spec.inputs]
    destination.write_file(TENSOR_INDEX, table_bytes(tensor_table(plan, checksums, names)))
    destination.write_file(COMPLETE, json.dumps({"digest": plan.digest}).encode() + b"\n")


def _copy_side_files(
    destination: Destination, plan: Plan, spec: MergeSpec, checkpoints: list[Checkpoint]
) -> None:
    """config.json from the base (or first) model, tokenizer files from tokenizer_source."""
    reference = checkpoints[spec.reference_input]
    config = reference.read_json("config.json")
    if config is not None:
        if spec.uses_slices and "num_hidden_layers" in config:
            config["num_hidden_layers"] = plan.num_layers
        if spec.out_dtype is not None:
            config["torch_dtype"] = {
                "BF16": "bfloat16",
                "F16": "float16",
                "F32": "float32",
                "F64": "float64",
            }.get(spec.out_dtype, config.get("torch_dtype"))
        destination.write_file("config.json", (json.dumps(config, indent=2) + "\n").encode())
    _copy_files(destination, reference, ("generation_config.json",))
    if spec.tokenizer_source is not None:
        _copy_files(destination, checkpoints[spec.tokenizer_source], TOKENIZER_FILES)


def _copy_files(destination: Destination, checkpoint: Checkpoint, names) -> None:
    source = checkpoint.source
    for name in names:
        if source.exists(name):
            destination.write_file(name, source.read_range(name, 0, source.size(name)))


class _WorkerActor:
    """A Ray actor around PartRunner; one per worker slot."""

    def __init__(self, context: WorkContext, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.runner = PartRunner(context)

    def ready(self) -> bool:
        return True

    def run(self, part: Part) -> PartResult:
        _maybe_inject_fault(part)
        return self.runner.run(part)


def _maybe_inject_fault(part: Part) -> None:
    """Test hook: RAYMERGE_FAULT=(raise|exit):PART_KEY:MARKER_DIR fails that part once."""
    spec = os.environ.get("RAYMERGE_FAULT")
    if not spec:
        return
    mode, key, marker_dir = spec.split(":", 2)
    marker = os.path.join(marker_dir, f"fault-{key}")
    if part.key != key or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    if mode == "exit":
        os._exit(1)
    raise OSError(f"injected fault on part {key}")


def _execute(
    pending: list[Part],
    context: WorkContext,
    options: RunOptions,
    on_result: Callable[[PartResult], None],
    total_bytes: int,
    resumed_bytes: int,
) -> tuple[int, float]:
    """Run every pending part on a pool of actors; returns (retried attempts, seconds)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    count = _worker_count(options, len(pending))
    actor_options = {"num_cpus": options.cpus_per_worker, "num_gpus": options.gpus_per_worker}
    if options.runtime_env:
        actor_options["runtime_env"] = options.runtime_env
    actor_class = ray.remote(_WorkerActor).options(**actor_options)
    threads = max(1, int(options.cpus_per_worker))
    actors = {i: actor_class.remote(context, threads) for i in range(count)}
    try:
        ray.get([actor.ready.remote() for actor in actors.values()])
    except RayActorError as exc:
        raise MergeFailed(
            f"worker actors failed to start ({exc}); is raymerge installed on every Ray node? "
            "(see docs/cluster.md)"
        ) from None
    started = time.perf_counter()
    spare_actors = count  # replacements allowed for workers that die
    queue = deque(sorted(pending, key=lambda p: (-p.nbytes, p.key)))
    attempts: dict[str, int] = defaultdict(int)
    avoid: dict[str, int] = {}
    in_flight: dict = {}
    load: dict[int, int] = defaultdict(int)
    retries = 0
    bar = _progress_bar(options.progress, total_bytes, resumed_bytes)
    next_actor_id = count
    try:
        while queue or in_flight:
            for actor_id in list(actors):
                while load[actor_id] < IN_FLIGHT_PER_WORKER and queue:
                    part = _next_for(queue, actor_id, avoid, len(actors))
                    ref = actors[actor_id].run.remote(part)
                    in_flight[ref] = (actor_id, part)
                    load[actor_id] += 1
            if not in_flight:
                raise MergeFailed("no live workers are left to run the remaining parts")
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor_id, part = in_flight.pop(ref)
            load[actor_id] -= 1
            try:
                result = ray.get(ref)
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                if isinstance(cause, RaymergeError):
                    raise cause from None
                failure = f"{type(cause).__name__}: {cause}"
            except RayActorError as exc:
                failure = f"worker died ({exc.__class__.__name__})"
                if actor_id in actors:
                    del actors[actor_id]
                    if spare_actors > 0:
                        spare_actors -= 1
                        actors[next_actor_id] = actor_class.remote(context, threads)
                        next_actor_id += 1
            else:
                on_result(result)
                if bar is not None:
                    bar.update(result.bytes_written)
                continue
            attempts[part.key] += 1
            if attempts[part.key] >= options.max_attempts:
                raise MergeFailed(
                    f"part {part.key} ({plan_part_label(part)}) failed {attempts[part.key]} "
                    f"times; last error: {failure}. Finished parts are kept: rerun the same "
                    "command to resume"
                )
            retries += 1
            avoid[part.key] = actor_id
            queue.appendleft(part)
    finally:
        if bar is not None:
            bar.close()
        for actor in actors.values():
            ray.kill(actor)
    return retries, time.perf_counter() - started


def plan_part_label(part: Part) -> str:
    first = part.tensors[0].name if part.tensors else "?"
    return f"shard {part.shard + 1}, bytes {part.start}-{part.end}, first tensor {first!r}"


def _next_for(queue: deque, actor_id: int, avoid: dict[str, int], live: int) -> Part:
    """The first queued part that did not just fail on this actor (unless it is the only one)."""
    if live > 1:
        for i, part in enumerate(queue):
            if avoid.get(part.key) != actor_id:
                del queue[i]
                return part
    return queue.popleft()


def _worker_count(options: RunOptions, pending: int) -> int:
    resources = cluster_resources()
    cpus = resources.get("CPU", 0.0)
    gpus = resources.get("GPU", 0.0)
    if options.gpus_per_worker > 0:
        fit = int(gpus // options.gpus_per_worker) if gpus else 0
        if fit == 0:
            raise ConfigError(
                f"--gpus-per-worker {options.gpus_per_worker:g}: the Ray cluster has "
                f"{gpus:g} GPUs; run without --gpus-per-worker to merge on CPUs"
            )
    else:
        fit = int(cpus // options.cpus_per_worker) if options.cpus_per_worker > 0 else pending
    count = options.workers or max(1, fit)
    if count > fit:
        what = "GPU" if options.gpus_per_worker > 0 else "CPU"
        per = options.gpus_per_worker if options.gpus_per_worker > 0 else options.cpus_per_worker
        have = gpus if options.gpus_per_worker > 0 else cpus
        raise ConfigError(
            f"--workers {count} with {per:g} {what} each needs {count * per:g} {what}s, but the "
            f"Ray cluster has {have:g}; lower --workers or --{what.lower()}s-per-worker"
        )
    return max(1, min(count, pending))


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        file=sys.stderr,
        dynamic_ncols=True,
    )
