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
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from raymerge import global_topk
from raymerge.checkpoint import CONFIG_FILES, TOKENIZER_FILES, Checkpoint, open_checkpoint
from raymerge.errors import ConfigError
from raymerge.index import COMPLETE, HF_INDEX, TENSOR_INDEX, hf_index, table_bytes, tensor_table
from raymerge.plan import Part, Plan, make_plan
from raymerge.pool import PoolOptions, WorkerPool
from raymerge.ray_cluster import ray_session
from raymerge.sizes import human
from raymerge.spec import MergeSpec
from raymerge.storage import open_destination
from raymerge.storage.base import Destination
from raymerge.worker import PartResult, WorkContext, checksum

STATE_DIR = "_raymerge"
RUN_RECORD = f"{STATE_DIR}/run.json"
PLAN_TABLE = f"{STATE_DIR}/plan.parquet"
PART_RECORDS = f"{STATE_DIR}/parts"
SHARD_TOKENS = f"{STATE_DIR}/shards.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors(\.partial)?")


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

    def pool(self) -> PoolOptions:
        return PoolOptions(
            self.workers,
            self.cpus_per_worker,
            self.gpus_per_worker,
            self.max_attempts,
            self.runtime_env,
        )


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
    seconds_prepare: float = 0.0
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
        if self.seconds_prepare:
            lines.append(
                f"  of the merging, {self.seconds_prepare:.2f} s finding global top-k thresholds"
            )
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
            pool = WorkerPool(context, options.pool(), len(plan.parts))
            try:
                merge_started = time.perf_counter()
                if _needs_prepare(pending):
                    pending = _prepare(pool, plan, pending, destination, spec, log)
                    summary.seconds_prepare = time.perf_counter() - merge_started
                resumed_bytes = sum(p.nbytes for p in plan.parts if p.key in done)
                bar = _progress_bar(options.progress, plan.bytes_to_write, resumed_bytes)

                def merged(part: Part, result: PartResult) -> None:
                    on_result(result)
                    if bar is not None:
                        bar.update(result.bytes_written)

                try:
                    summary.retries = pool.map(pending, "run", merged)
                finally:
                    if bar is not None:
                        bar.close()
                summary.seconds_merge = time.perf_counter() - merge_started
            finally:
                pool.close()
        summary.seconds_startup = time.perf_counter() - startup - summary.seconds_merge
    _finish(destination, plan, spec, checkpoints, done)
    summary.seconds_total = time.perf_counter() - started
    return summary


def _needs_prepare(pending: list[Part]) -> bool:
    return any(global_topk.participates(t) for part in pending for t in part.tensors)


def _prepare(
    pool: WorkerPool, plan: Plan, pending: list[Part], destination: Destination,
    spec: MergeSpec, log: Callable[[str], None],
) -> list[Part]:  # fmt: skip
    """Whole-model statistics the merge needs first (TIES with density_scope: global)."""
    parts = [p for p in plan.parts if any(global_topk.participates(t) for t in p.tensors)]
    rounds = iter(range(1, 4))

    def map_parts(selected: list[Part], request: dict) -> dict:
        log(f"global top-k: round {next(rounds)} over {len(selected)} parts")
        total: dict = {}

        def add(part: Part, partial: dict) -> None:
            for model, value in partial.items():
                if isinstance(value, dict):
                    total.setdefault(model, {}).update(value)
                else:
                    total[model] = total[model] + value if model in total else value

        pool.map(selected, "statistic", add, request)
        return total

    models = global_topk.thresholds(plan.tensors, map_parts, parts, spec.source)
    record = {
        str(m): {"kept": t.k, "of": t.total, "threshold": t.threshold}
        for m, t in sorted(models.items())
    }
    destination.write_file(f"{STATE_DIR}/global_topk.json", json.dumps(record, indent=2).encode())
    return [global_topk.patch(part, models) for part in pending]


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
