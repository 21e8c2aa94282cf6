"""The driver: plan, claim the output folder, gather facts, merge the work units, commit,
write the indexes, then COMPLETE.

The driver never touches tensor data (nor imports torch): workers read their inputs and
write their units themselves and return checksums and timings. The ledger keeps what the
output folder knows, so a rerun of the same merge resumes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from raymerge import stages
from raymerge.card import CARD_FILE, CARD_FILES, CONFIG_FILE, config_yaml, model_card
from raymerge.checkpoint import CONFIG_FILES, TOKENIZER_FILES, Checkpoint, open_checkpoint
from raymerge.errors import CheckpointError, ConfigError
from raymerge.index import COMPLETE, HF_INDEX, TENSOR_INDEX, hf_index, table_bytes, tensor_table
from raymerge.ledger import Ledger, check_not_an_input
from raymerge.methods import REGISTRY
from raymerge.plan import MIN_PART_BYTES, Plan, make_plan, unit_batches
from raymerge.pool import PoolOptions, WorkerPool
from raymerge.ray_cluster import check_single_node, ray_session
from raymerge.shards import ShardBook
from raymerge.sizes import human
from raymerge.spec import MergeSpec
from raymerge.storage import check_writable_destination, is_remote, open_destination, s3
from raymerge.storage.s3 import S3Settings
from raymerge.worker import WorkContext

SIDE_FILES = (*CONFIG_FILES, *TOKENIZER_FILES)


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
    worker_memory: int | None = None  # None: default_worker_memory(workers)
    item_deadline_s: float | None = None  # None: from each unit's size (pool.py)
    s3_endpoint: str | None = None  # None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
    s3_retry_mode: str | None = None  # None: AWS_RETRY_MODE, else "standard"
    allow_local_destination: bool = False  # a local OUT on a multi-node cluster is shared
    copy_tokenizer: bool = True  # copy tokenizer_source's tokenizer files (mergekit's default)

    def worker_memory_bytes(self) -> int:
        return self.worker_memory or default_worker_memory(self.workers)

    def pool(self, plan: Plan, whole_parts: bool) -> PoolOptions:
        return PoolOptions(
            self.workers, self.cpus_per_worker, self.gpus_per_worker, self.max_attempts,
            self.runtime_env, memory_per_worker=plan.peak_worker_bytes(whole_parts) or None,
            deadline_s=self.item_deadline_s,
        )  # fmt: skip


def default_worker_memory(workers: int | None) -> int:
    """Half of this node's memory shared by its workers, between 512 MiB and 64 GiB each."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = total // 2 // max(1, workers or os.cpu_count() or 1)
    return max(512 << 20, min(64 << 30, share))


@dataclass
class RunSummary:
    out: str
    plan: Plan
    units_done: int = 0
    units_resumed: int = 0
    retries: int = 0
    worker_restarts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds_total: float = 0.0
    seconds_merge: float = 0.0
    seconds_prepare: float = 0.0
    seconds_startup: float = 0.0
    worker_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, results: list) -> None:
        """Count a work item's unit results."""
        for result in results:
            self.units_done += 1
            self.bytes_read += result.bytes_read
            self.bytes_written += result.bytes_written
            busy = result.seconds_read + result.seconds_merge + result.seconds_write
            worker = result.worker
            self.worker_seconds[worker] = self.worker_seconds.get(worker, 0) + busy

    def lines(self) -> list[str]:
        merge = max(self.seconds_merge, 1e-9)
        lines = [
            f"merged {len(self.plan.tensors)} tensors into {len(self.plan.shards)} shard(s) "
            f"at {self.out}",
            f"work units: {self.units_done} merged, {self.units_resumed} resumed, "
            f"{self.retries} retried, {self.worker_restarts} worker(s) replaced",
            f"read {human(self.bytes_read)} ({human(self.bytes_read / merge)}/s), "
            f"wrote {human(self.bytes_written)} ({human(self.bytes_written / merge)}/s)",
            f"time: {self.seconds_total:.2f} s total = {self.seconds_startup:.2f} s start-up "
            f"(Ray and workers, planning meanwhile) + {self.seconds_merge:.2f} s merging + "
            f"{self.seconds_total - self.seconds_startup - self.seconds_merge:.2f} s indexes",
        ]
        if self.seconds_prepare:
            lines.append(f"  of the merging, {self.seconds_prepare:.2f} s gathering facts")
        for worker, seconds in sorted(self.worker_seconds.items()):
            lines.append(f"  worker {worker}: {seconds:.2f} s busy")
        return lines


def run_merge(
    spec: MergeSpec, out: str, options: RunOptions, log: Callable[[str], None] = print
) -> RunSummary:
    started = time.perf_counter()
    s3_settings = S3Settings.resolve(options.s3_endpoint, options.s3_retry_mode)
    s3.configure(s3_settings)
    check_writable_destination(out)
    startup = time.perf_counter()
    # Ray starts in the background while the inputs' headers are read and the merge planned
    with ray_session(options.address, local_cpus(options), wait=False) as ray_start:
        out, destination, checkpoints = open_output(spec, out, options)
        plan = make_plan(spec, checkpoints, options.worker_memory_bytes())
        table = plan_table(plan)
        ray_start.wait()  # before anything is written
        check_destination_shared(out, options)
        ledger = Ledger(destination, plan, owned_files(plan))
        ledger.claim(options.force, log)
        try:
            ledger.write_run_record(spec.to_json(), table)
            shards = ShardBook(destination, plan, ledger)
            summary = RunSummary(out, plan, units_resumed=len(ledger.done))
            pending = [u for u in plan.units if u.key not in ledger.done]
            if pending:
                context = work_context(plan, out, shards, options, s3_settings)
                _merge(plan, context, destination, shards, ledger, pending, options, summary,
                       log)  # fmt: skip
            summary.seconds_startup = time.perf_counter() - startup - summary.seconds_merge
            finish_output(destination, plan, spec, checkpoints, shards, options.copy_tokenizer)
        except (ConfigError, CheckpointError):
            ledger.abort_unfinished()  # a rerun cannot resume: leave no upload open
            raise
        finally:
            ledger.release()
    summary.seconds_total = time.perf_counter() - started
    return summary


def open_output(spec: MergeSpec, out: str, options: RunOptions):
    """(out as the ledger names it, its Destination, the input checkpoints), after the
    checks that need no Ray: the inputs' headers, OUT not an input, the part size."""
    out = out if is_remote(out) else os.path.abspath(out)
    destination = open_destination(out, options.fsync)
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    check_not_an_input(out, [c.source.root for c in checkpoints])
    check_part_size(spec, destination)
    return out, destination, checkpoints


def check_destination_shared(out: str, options: RunOptions) -> None:
    """On a multi-node cluster a local OUT must be a shared filesystem, said so by flag."""
    if not is_remote(out) and not options.allow_local_destination:
        check_single_node(out)


def owned_files(plan: Plan) -> list[str]:
    """The files a merge writes besides its ledger: what --force may remove."""
    return [*(s.name for s in plan.shards), HF_INDEX, TENSOR_INDEX, COMPLETE, *SIDE_FILES,
            *CARD_FILES]  # fmt: skip


def plan_table(plan: Plan) -> bytes:
    """The plan's tensor table (no checksums yet), as the run record keeps it."""
    return table_bytes(tensor_table(plan, defaultdict(str), list(plan.inputs)))


def work_context(plan: Plan, out: str, shards: ShardBook, options: RunOptions,
                 s3_settings: S3Settings) -> WorkContext:  # fmt: skip
    return WorkContext(
        plan.method, plan.seed, plan.inputs, out, tuple(s.name for s in plan.shards),
        tuple(s.header for s in plan.shards), shards.tokens, plan.tensors,
        "cuda" if options.gpus_per_worker > 0 else "cpu", s3_settings,
    )  # fmt: skip


def check_part_size(spec: MergeSpec, destination) -> None:
    """S3 takes no upload part under 5 MiB but a shard's last."""
    if destination.whole_parts and spec.part_size < MIN_PART_BYTES:
        raise ConfigError(
            f"part_size {human(spec.part_size)} is below S3's {human(MIN_PART_BYTES)} minimum "
            f"for an upload part; use --part-size {human(MIN_PART_BYTES)} or more (default "
            "64 MiB)"
        )


def _merge(plan, context, destination, shards, ledger, pending, options, summary,
           log) -> None:  # fmt: skip
    """Run the prepare stage (if any tensor needs one), then every pending unit: one by one
    or in batches of tiny ones, or, where a part is sent in one call, a part's units
    together."""
    whole_parts = destination.whole_parts
    items = plan.part_jobs(pending) if whole_parts else unit_batches(pending)
    pool = WorkerPool(context, options.pool(plan, whole_parts), len(items))  # once one is up
    try:
        merge_started = time.perf_counter()
        facts = stages.prepare(pool, plan, REGISTRY[plan.method], ledger, log)
        summary.seconds_prepare = time.perf_counter() - merge_started if facts else 0.0
        bar = progress_bar(options.progress, plan.bytes_to_write,
                            plan.bytes_to_write - sum(u.nbytes for u in pending))  # fmt: skip

        def merged(item, results) -> None:
            shards.units_done(list(item.units), results)
            summary.add(results)
            if bar is not None:
                bar.update(sum(r.bytes_written for r in results))

        def item_facts(item) -> dict | None:
            mine = {p.tensor: facts[p.tensor] for u in item.units for p in u.pieces
                    if p.tensor in facts}  # fmt: skip
            return mine or None

        try:
            call = "run_part" if whole_parts else "run_batch"
            summary.retries = pool.map(items, call, merged, item_facts)
        finally:
            if bar is not None:
                bar.close()
        summary.worker_restarts = pool.restarts
        summary.seconds_merge = time.perf_counter() - merge_started
    finally:
        pool.close()


def local_cpus(options: RunOptions) -> int:
    wanted = (options.workers or 1) * max(options.cpus_per_worker, 0)
    return max(os.cpu_count() or 1, int(wanted + 0.999))


def finish_output(destination, plan: Plan, spec: MergeSpec, checkpoints: list[Checkpoint],
            shards: ShardBook, copy_tokenizer: bool = True) -> None:  # fmt: skip
    """Side files, the model card and the normalized config, then the indexes, then
    COMPLETE: nothing looks complete before it is. The card is written after the copied
    files, and no input's README.md is ever copied: the card is always raymerge's."""
    _copy_side_files(destination, plan, spec, checkpoints, copy_tokenizer)
    name = destination.root.rstrip("/").rsplit("/", 1)[-1] or None
    destination.write_file(CONFIG_FILE, config_yaml(spec).encode())
    destination.write_file(CARD_FILE, model_card(spec, plan, checkpoints, name).encode())
    destination.write_file(HF_INDEX, hf_index(plan))
    names = [m.given for m in spec.inputs]
    table = tensor_table(plan, shards.tensor_checksums(), names)
    destination.write_file(TENSOR_INDEX, table_bytes(table))
    destination.write_file(COMPLETE, json.dumps({"digest": plan.digest}).encode() + b"\n")


def _copy_side_files(
    destination, plan: Plan, spec: MergeSpec, checkpoints: list[Checkpoint],
    copy_tokenizer: bool = True,
) -> None:  # fmt: skip
    """config.json from the base (or first) model, tokenizer files from tokenizer_source
    (unless `copy_tokenizer` is off). With rows matched by token string the tokenizer files
    are the output vocabulary's (always written, as mergekit saves the tokenizer it built)
    and config.json's vocab_size is its row count."""
    reference = checkpoints[spec.reference_input]
    config = reference.read_json("config.json")
    vocabulary = plan.vocabulary
    if config is not None:
        if spec.uses_slices and "num_hidden_layers" in config:
            config["num_hidden_layers"] = plan.num_layers
        if vocabulary is not None:
            text = config.get("text_config")
            nested = "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text
            holder = text if nested else config
            holder["vocab_size"] = vocabulary.rows
        if spec.out_dtype is not None:
            config["torch_dtype"] = {
                "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
            }.get(spec.out_dtype, config.get("torch_dtype"))  # fmt: skip
        destination.write_file("config.json", (json.dumps(config, indent=2) + "\n").encode())
    _copy_files(destination, reference, ("generation_config.json",))
    if vocabulary is not None:
        for name, body in vocabulary.files:
            destination.write_file(name, body)
    elif spec.tokenizer_source is not None and copy_tokenizer:
        _copy_files(destination, checkpoints[spec.tokenizer_source], TOKENIZER_FILES)


def _copy_files(destination, checkpoint: Checkpoint, names) -> None:
    source = checkpoint.source
    for name in names:
        if source.exists(name):
            destination.write_file(name, source.read_range(name, 0, source.size(name)))


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
        desc="merging", file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
