"""Running a batch: many recipes, one read of their inputs, stage by stage.

Each stage's recipes are planned with the same unit cuts (the largest scratch of their
methods), so units of recipes over the same inputs read the same bytes; those are grouped
into shared items, and a worker reads each once and merges and writes it for every recipe
in the item. Everything else is per recipe, as in `raymerge run`: its own output folder
under OUT_PREFIX, ledger, prepare stages, indexes and COMPLETE. A recipe that fails (a bad
config, a merge error) is reported and the others finish; one that reads a failed recipe is
skipped. A rerun skips complete recipes and resumes the others' recorded units.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raymerge import stages
from raymerge.batch import Recipe, load_batch, with_outputs
from raymerge.checkpoint import Checkpoint
from raymerge.config import parse_spec
from raymerge.dtypes import itemsize
from raymerge.errors import RaymergeError
from raymerge.ledger import Ledger, holds_complete
from raymerge.methods import REGISTRY
from raymerge.plan import (
    UNITS_IN_MEMORY,
    Plan,
    RecipeUnit,
    cut_for_shared_reads,
    make_plan,
    share_items,
    shared_input_rows,
    unit_batches,
)
from raymerge.pool import WorkerPool, keeping
from raymerge.ray_cluster import ray_session
from raymerge.runner import (
    RunOptions,
    RunSummary,
    check_destination_shared,
    finish_output,
    local_cpus,
    open_output,
    owned_files,
    plan_table,
    progress_bar,
    work_context,
)
from raymerge.shards import ShardBook
from raymerge.sizes import human
from raymerge.spec import MergeSpec
from raymerge.storage import check_writable_destination, is_remote, s3
from raymerge.storage.s3 import S3Settings
from raymerge.worker import BatchContext


@dataclass
class RecipeRun:
    """One recipe through its stage."""

    recipe: Recipe
    out: str
    status: str = "pending"  # merged, complete (already), failed, skipped
    problem: str = ""
    spec: MergeSpec | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    destination: Any = None
    plan: Plan | None = None
    ledger: Ledger | None = None
    shards: ShardBook | None = None
    summary: RunSummary | None = None
    units_left: int = 0

    def fail(self, problem: str, log: Callable[[str], None]) -> None:
        self.status = "failed"
        self.problem = " ".join(line.strip() for line in problem.splitlines())
        log(f"{self.recipe.name}: failed: {self.problem}")

    def line(self) -> str:
        if self.status in ("failed", "skipped"):
            return f"  {self.recipe.name}: {self.status.upper()}: {self.problem}"
        shards = f"{len(self.plan.shards)} shard(s)" if self.plan else ""
        if self.status == "complete":
            return f"  {self.recipe.name}: already complete, skipped, {shards} at {self.out}"
        units, done = "", self.summary
        if done is not None:
            units = f" ({done.units_done} units merged, {done.units_resumed} resumed)"
        return f"  {self.recipe.name}: merged{units}, {shards} at {self.out}"


@dataclass
class BatchSummary:
    prefix: str
    runs: list[RecipeRun]
    bytes_read: int = 0
    bytes_separate: int = 0  # what separate runs of the merged recipes would have read
    bytes_written: int = 0
    seconds_total: float = 0.0

    @property
    def failed(self) -> list[str]:
        return [r.recipe.name for r in self.runs if r.status in ("failed", "skipped")]

    def lines(self) -> list[str]:
        done = sum(r.status in ("merged", "complete") for r in self.runs)
        lines = [f"batch: {done} of {len(self.runs)} recipe(s) complete under {self.prefix}"]
        lines += [r.line() for r in self.runs]
        ratio = f", {self.bytes_separate / self.bytes_read:.1f}x as much" if self.bytes_read else ""
        lines.append(
            f"read {human(self.bytes_read)} for all recipes; separate runs would read "
            f"{human(self.bytes_separate)}{ratio}; wrote {human(self.bytes_written)}"
        )
        lines.append(f"time: {self.seconds_total:.2f} s")
        return lines


def recipe_outputs(prefix: str, recipes: list[Recipe]) -> dict[str, str]:
    join = (lambda name: f"{prefix.rstrip('/')}/{name}") if is_remote(prefix) else (
        lambda name: os.path.join(os.path.abspath(prefix), name))  # fmt: skip
    return {r.name: join(r.name) for r in recipes}


def recipe_spec(batch_path: str, recipe: Recipe, outputs: dict[str, str],
                overrides: dict[str, Any]) -> MergeSpec:  # fmt: skip
    """The recipe's MergeSpec: models that name recipes read their outputs."""
    config = with_outputs(recipe.config, {n: outputs[n] for n in recipe.needs})
    where = f"{batch_path} [{recipe.name}]"
    return parse_spec(config, where, os.path.dirname(os.path.abspath(batch_path)), overrides)


def run_batch(
    batch_path: str, prefix: str, options: RunOptions, overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> BatchSummary:  # fmt: skip
    started = time.perf_counter()
    recipes = load_batch(batch_path)
    s3_settings = S3Settings.resolve(options.s3_endpoint, options.s3_retry_mode)
    s3.configure(s3_settings)
    check_writable_destination(prefix)
    outputs = recipe_outputs(prefix, recipes)
    runs = [RecipeRun(r, outputs[r.name]) for r in recipes]
    summary = BatchSummary(prefix, runs)
    with ray_session(options.address, local_cpus(options)), keeping():  # one set of workers
        check_destination_shared(prefix, options)
        for stage in sorted({r.stage for r in recipes}):
            mine = [run for run in runs if run.recipe.stage == stage]
            _open_stage(batch_path, mine, runs, outputs, options, overrides or {}, log)
            _merge_stage(mine, options, s3_settings, summary, log)
    summary.seconds_total = time.perf_counter() - started
    return summary


def _open_stage(batch_path: str, stage: list[RecipeRun], runs: list[RecipeRun],
                outputs: dict[str, str], options: RunOptions, overrides: dict[str, Any],
                log) -> None:  # fmt: skip
    """Parse, open and plan the stage's recipes (one failing does not stop the others),
    with one scratch floor so recipes over the same inputs get the same units."""
    by_name = {run.recipe.name: run for run in runs}
    for run in stage:
        blocked = [n for n in run.recipe.needs if by_name[n].status not in ("merged", "complete")]
        if blocked:
            run.status, run.problem = "skipped", f"reads recipe {blocked[0]}, which did not finish"
            continue
        try:
            run.spec = recipe_spec(batch_path, run.recipe, outputs, overrides)
            check_writable_destination(run.out)
            run.out, run.destination, run.checkpoints = open_output(run.spec, run.out, options)
        except RaymergeError as exc:
            run.fail(str(exc), log)
    floor = max((REGISTRY[r.spec.method.name].scratch_words(len(r.spec.inputs))
                 for r in stage if r.status == "pending"), default=0.0)  # fmt: skip
    memory = options.worker_memory_bytes()
    for run in (r for r in stage if r.status == "pending"):
        try:
            run.plan = make_plan(run.spec, run.checkpoints, memory, floor)
        except RaymergeError as exc:
            run.fail(str(exc), log)
    planned = [r for r in stage if r.status == "pending"]
    shared = shared_input_rows([r.plan for r in planned])
    for run in planned:  # cut again for what its shared units hold
        try:
            run.plan = cut_for_shared_reads(run.plan, run.spec, shared)
        except RaymergeError as exc:  # a tensor that no longer fits --worker-memory
            run.fail(str(exc), log)
            continue
        if not options.force and holds_complete(run.destination, run.plan.digest):
            run.status = "complete"


def _merge_stage(stage: list[RecipeRun], options: RunOptions, s3_settings: S3Settings,
                 summary: BatchSummary, log) -> None:  # fmt: skip
    active = [r for r in stage if r.status == "pending"]
    try:
        for run in active:
            run.ledger = Ledger(run.destination, run.plan, owned_files(run.plan))
            run.ledger.claim(options.force, log)
            run.ledger.write_run_record(run.spec.to_json(), plan_table(run.plan))
            run.shards = ShardBook(run.destination, run.plan, run.ledger)
            run.summary = RunSummary(run.out, run.plan, units_resumed=len(run.ledger.done))
        merging = [r for r in active if any(u.key not in r.ledger.done for u in r.plan.units)]
        if merging:
            _merge_shared(merging, options, s3_settings, summary, log)
        for run in active:
            if run.status == "pending":
                finish_output(run.destination, run.plan, run.spec, run.checkpoints, run.shards,
                              options.copy_tokenizer)  # fmt: skip
                run.status = "merged"
                log(f"{run.recipe.name}: complete")
    finally:
        for run in active:
            if run.ledger is not None:
                run.ledger.release()


def _merge_shared(runs: list[RecipeRun], options: RunOptions, s3_settings: S3Settings,
                  summary: BatchSummary, log) -> None:  # fmt: skip
    """Every pending unit of the stage's recipes, in shared items, on one pool."""
    whole_parts = runs[0].destination.whole_parts
    pending = [[u for u in r.plan.units if u.key not in r.ledger.done] for r in runs]
    per_recipe = [
        r.plan.part_jobs(units) if whole_parts else unit_batches(units)
        for r, units in zip(runs, pending)
    ]  # fmt: skip
    outputs, memory = _outputs_per_item(runs, options, whole_parts)
    items = share_items([r.plan for r in runs], per_recipe, whole_parts, outputs)
    for run, units in zip(runs, pending):
        run.units_left = len(units)
        summary.bytes_separate += _own_input_bytes(run.plan, units)
    contexts = tuple(work_context(r.plan, r.out, r.shards, options, s3_settings) for r in runs)
    context = BatchContext(tuple(r.recipe.name for r in runs), contexts)
    pool_options = options.pool(runs[0].plan, whole_parts)
    pool_options.memory_per_worker = memory
    pool = WorkerPool(context, pool_options, len(items))
    try:
        facts = [_prepare(pool, i, run, log) for i, run in enumerate(runs)]
        total = sum(sum(u.nbytes for u in units) for units in pending)
        bar = progress_bar(options.progress, total, 0)

        def merged(item, outcomes: list) -> None:
            for (recipe, work), outcome in zip(item.members, outcomes):
                run = runs[recipe]
                if run.status != "pending":
                    continue
                if isinstance(outcome, str):  # its merge failed: the others go on
                    run.fail(outcome, log)
                    continue
                run.shards.units_done(list(work.units), outcome)
                run.summary.add(outcome)
                summary.bytes_read += sum(r.bytes_read for r in outcome)
                written = sum(r.bytes_written for r in outcome)
                summary.bytes_written += written
                run.units_left -= len(outcome)
                if run.units_left == 0:
                    log(f"{run.recipe.name}: all {len(run.plan.units)} work units written")
                if bar is not None:
                    bar.update(written)
                    bar.set_postfix_str(f"{sum(r.units_left == 0 for r in runs)}/{len(runs)} "
                                        "recipes")  # fmt: skip

        def item_facts(item) -> list | None:
            mine = [
                {p.tensor: facts[r][p.tensor] for u in work.units for p in u.pieces
                 if p.tensor in facts[r]} or None
                for r, work in item.members
            ]  # fmt: skip
            return mine if any(mine) else None

        try:
            pool.map(items, "run_shared", merged, item_facts)
        finally:
            if bar is not None:
                bar.close()
    finally:
        pool.close()


def _own_input_bytes(plan: Plan, units: list) -> int:
    """What the units would read in a run of their recipe alone."""
    total = 0
    for unit in units:
        for piece in unit.pieces:
            tensor = plan.tensors[piece.tensor]
            rows = piece.row_end - piece.row_start
            total += sum(itemsize(s.dtype) for s in tensor.sources) * tensor.row_elements * rows
    return total


def _prepare(pool: WorkerPool, recipe: int, run: RecipeRun, log) -> dict[int, dict]:
    """The recipe's prepare stage (if it has one), on the batch's pool."""
    tagged = _RecipePool(pool, recipe)
    return stages.prepare(tagged, run.plan, REGISTRY[run.plan.method], run.ledger,
                          lambda line: log(f"{run.recipe.name}: {line}"))  # fmt: skip


class _RecipePool:
    """The batch's pool as one recipe's stages see it: their units go out tagged with the
    recipe, so the worker knows whose they are."""

    def __init__(self, pool: WorkerPool, recipe: int) -> None:
        self.pool, self.recipe = pool, recipe

    def map(self, items: list, call: str, on_result: Callable, payload: Callable | None = None):
        tagged = [RecipeUnit(self.recipe, unit) for unit in items]
        return self.pool.map(
            tagged, call, lambda item, result: on_result(item.unit, result),
            None if payload is None else (lambda item: payload(item.unit)),
        )  # fmt: skip


def _outputs_per_item(runs: list[RecipeRun], options: RunOptions,
                      whole_parts: bool) -> tuple[int, int]:  # fmt: skip
    """(members a shared item may hold, the memory to request per worker). Where each
    member keeps a whole part until it is sent (S3), as many as the budget allows."""
    peak = max(r.plan.peak_worker_bytes(whole_parts) for r in runs)
    if not whole_parts:
        return len(runs), peak
    part = max(p.nbytes for r in runs for p in r.plan.parts)
    extra = UNITS_IN_MEMORY * part  # one more member's part in each pipeline slot
    members = max(1, 1 + (options.worker_memory_bytes() - peak) // max(1, extra))
    members = min(members, len(runs))
    return members, peak + (members - 1) * extra


def dry_run(batch_path: str, prefix: str, options: RunOptions,
            overrides: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """What a batch would produce, read from headers only: recipes, names, stages, outputs,
    and bytes read once against what separate runs would read."""
    recipes = load_batch(batch_path)
    s3.configure(S3Settings.resolve(options.s3_endpoint, options.s3_retry_mode))
    outputs = recipe_outputs(prefix, recipes)
    lines = [f"batch {batch_path}: {len(recipes)} recipe(s) into {prefix}"]
    ranges: set[tuple] = set()
    separate = 0
    unknown = 0
    for recipe in recipes:
        after = f", after {', '.join(recipe.needs)}" if recipe.needs else ""
        head = f"  stage {recipe.stage + 1}: {recipe.name} -> {outputs[recipe.name]}"
        if recipe.needs:  # its inputs do not exist yet
            unknown += 1
            method = recipe.config.get("merge_method")
            lines.append(f"{head} ({method}{after}; reads are known once its inputs exist)")
            continue
        try:
            spec = recipe_spec(batch_path, recipe, outputs, overrides or {})
            _, _, checkpoints = open_output(spec, outputs[recipe.name], options)
            plan = make_plan(spec, checkpoints, options.worker_memory_bytes())
        except RaymergeError as exc:
            lines.append(f"{head}: FAILS: {' '.join(str(exc).split())}")
            continue
        reads = {(plan.inputs[s.input], s.file, s.start, s.end)
                 for t in plan.tensors for s in t.sources}  # fmt: skip
        ranges |= reads
        separate += plan.bytes_to_read
        lines.append(
            f"{head} ({spec.method.name}, {len(spec.inputs)} model(s), reads "
            f"{human(plan.bytes_to_read)}, writes {human(plan.bytes_to_write)})"
        )
    once = sum(end - start for _, _, start, end in ranges)
    later = f" (+ {unknown} later-stage recipe(s))" if unknown else ""
    lines.append(f"reads {human(once)} once; separate runs would read {human(separate)}{later}")
    return lines
