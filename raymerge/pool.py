"""A pool of Ray worker actors that runs work items: largest first, a pipeline's worth in
flight per actor, a failed item retried on another actor, a lost actor replaced (and used
only once it is ready), a deadline per item, and a clear failure when no live worker can run
what is left.

The pool only schedules: the actors read, merge and write themselves and return small
results (checksums, statistics). Planning never depends on the pool's size. Importing this
module does not import torch: the actor class imports the worker inside its process.
"""

from __future__ import annotations

import gc
import heapq
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from raymerge.errors import ConfigError, MergeFailed, RaymergeError
from raymerge.ray_cluster import cluster_resources

IN_FLIGHT_PER_WORKER = 3  # the worker's pipeline depth: fetching, merging, writing
READY_TIMEOUT_S = 120.0  # a worker actor that is not up by then cannot be placed
MIN_DEADLINE_S = 300.0  # an item that takes longer than this (plus its bytes at
DEADLINE_BYTES_PER_S = 20e6  # this rate) is taken to hang: its actor is replaced
DEADLINE_WORK_PER_S = 1e9  # and its floating-point work, if it declares any, at this rate


class Item(Protocol):
    key: str

    @property
    def nbytes(self) -> int: ...


@dataclass
class PoolOptions:
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_attempts: int = 3
    runtime_env: dict | None = None
    memory_per_worker: int | None = None  # bytes requested from Ray per actor
    deadline_s: float | None = None  # per item; None: from its size


class _WorkerActor:
    """A Ray actor around worker.UnitRunner (or, for a batch of recipes, SharedRunner); one
    per worker slot."""

    def __init__(self, context: Any, threads: int) -> None:
        import torch

        from raymerge import malloc

        malloc.tune()
        torch.set_num_threads(threads)
        self.reset(context)

    def reset(self, context: Any) -> bool:
        """Serve a (new) pool: a fresh runner for its context; nothing of an earlier merge
        stays but the process and its imports."""
        from raymerge.worker import BatchContext, SharedRunner, UnitRunner

        gc.unfreeze()
        self.runner = None
        gc.collect()
        batch = isinstance(context, BatchContext)
        self.runner = SharedRunner(context) if batch else UnitRunner(context)
        # what is alive now (torch, Ray, the context) lives as long as the runner: keep the
        # cyclic collector from walking it again every few thousand allocations of a merge
        gc.freeze()
        return True

    def ready(self) -> bool:
        return True

    def run(self, item: Any, payload: Any = None) -> Any:
        _maybe_inject_fault(item)
        return self.runner.run(item, payload)

    def run_batch(self, item: Any, payload: Any = None) -> Any:
        _maybe_inject_fault(item)
        return self.runner.run_batch(item, payload)

    def run_part(self, item: Any, payload: Any = None) -> Any:
        _maybe_inject_fault(item)
        return self.runner.run_part(item, payload)

    def run_shared(self, item: Any, payload: Any = None) -> Any:
        _maybe_inject_fault(item)
        return self.runner.run_shared(item, payload)

    def statistic(self, item: Any, payload: Any) -> Any:
        _maybe_inject_fault(item)
        return self.runner.statistic(item, payload)

    def stage(self, item: Any, payload: Any) -> Any:
        _maybe_inject_fault(item)
        return self.runner.stage(item, payload)


def _with_fault_hook(runtime_env: dict | None) -> dict | None:
    """The driver's RAYMERGE_FAULT reaches the actors on any cluster (a cluster's workers do
    not inherit the driver's environment)."""
    fault = os.environ.get("RAYMERGE_FAULT")
    if not fault:
        return runtime_env
    runtime_env = dict(runtime_env or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAYMERGE_FAULT": fault}
    return runtime_env


def _maybe_inject_fault(item: Any) -> None:
    inject_fault({item.key, *(u.key for u in getattr(item, "units", ()))})  # a batch: any unit


def inject_fault(keys: set[str]) -> None:
    """Test hook: RAYMERGE_FAULT=(raise|fail|exit|hang):KEY:MARKER_DIR fails the item with
    that key (or holding the unit with that key; in a batch of recipes, RECIPE/UNIT) once:
    raises an OSError (retried), raises MergeFailed (a merge error, not retried), kills the
    worker process, or never returns."""
    spec = os.environ.get("RAYMERGE_FAULT")
    if not spec:
        return
    mode, key, marker_dir = spec.split(":", 2)
    marker = os.path.join(marker_dir, f"fault-{key.replace('/', '_')}")
    if key not in keys or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    if mode == "exit":
        os._exit(1)
    if mode == "hang":
        time.sleep(3600)
    if mode == "fail":
        raise MergeFailed(f"injected merge error on {key}")
    raise OSError(f"injected fault on {key}")


class _Kept:
    """Inside `keeping()`: the actors of this process's last pools, kept for the next pool
    that wants actors like them (a batch's stages, a test session): a new actor costs a
    worker process importing torch (1-2 s), a kept one a reset (milliseconds). Kept actors
    hold their CPUs and memory in Ray, so only one kind of actor is kept at a time, and
    none outside `keeping()` (a caller's own Ray gets its resources back when a merge ends)."""

    def __init__(self) -> None:
        self.enabled = False
        self.kind: tuple | None = None
        self.actors: list[tuple[Any, int]] = []  # (actor, the memory it holds in Ray)

    def take(self, kind: tuple, memory: int, count: int) -> list[tuple[Any, int]]:
        """Up to `count` kept actors of this kind that hold at least `memory`. The other
        kept actors that hold enough stay kept (then the pool starts none: it wants no more
        than the CPUs allow, and so did the pools they came from); the rest are ended, so
        their CPUs are free for the pool's new actors."""
        if kind != self.kind:
            self.clear()
        fit = [a for a in self.actors if a[1] >= memory]
        _kill([actor for actor, held in self.actors if held < memory])
        taken, self.actors = fit[:count], fit[count:]
        return taken

    def keep(self, kind: tuple, actors: list[tuple[Any, int]]) -> None:
        if not self.enabled:
            _kill([actor for actor, _ in actors])
            return
        if kind != self.kind:
            self.clear()
        self.kind = kind
        self.actors += actors

    def clear(self) -> None:
        _kill([actor for actor, _ in self.actors])
        self.kind, self.actors = None, []


KEPT = _Kept()


@contextmanager
def keeping() -> Iterator[None]:
    """Keep the actors of one pool for the next, until the block ends."""
    was, KEPT.enabled = KEPT.enabled, True
    try:
        yield
    finally:
        KEPT.enabled = was
        if not was:
            KEPT.clear()


def _kill(actors: list[Any]) -> None:
    if actors:
        import ray

        for actor in actors:
            ray.kill(actor)


class WorkerPool:
    def __init__(self, context: Any, options: PoolOptions, pending: int) -> None:
        import json

        import ray

        self.options = options
        count = worker_count(options, pending)
        actor_options: dict[str, Any] = {
            "num_cpus": options.cpus_per_worker,
            "num_gpus": options.gpus_per_worker,
            "max_concurrency": IN_FLIGHT_PER_WORKER + 1,
            "scheduling_strategy": "SPREAD",  # one node's disk and NIC per few workers
        }
        if options.memory_per_worker:
            actor_options["memory"] = options.memory_per_worker
        runtime_env = _with_fault_hook(options.runtime_env)
        if runtime_env:
            actor_options["runtime_env"] = runtime_env
        self.actor_class = ray.remote(_WorkerActor).options(**actor_options)
        self.context_ref = ray.put(context)
        self.threads = max(1, int(options.cpus_per_worker))
        self.actors: dict[int, Any] = {}
        # ready ref -> (id, actor, since, kept: an actor of an earlier pool)
        self.starting: dict[Any, tuple[int, Any, float, bool]] = {}
        self.next_id = 0
        self.spares = count  # replacements allowed for actors that die
        self.restarts = 0
        self.idle = True  # nothing in flight: every map so far has ended normally
        self.kind = (
            ray.get_runtime_context().get_job_id(), options.cpus_per_worker,
            options.gpus_per_worker, json.dumps(runtime_env, sort_keys=True), self.threads,
        )  # fmt: skip
        self.memory = options.memory_per_worker or 0
        self.holds: dict[Any, int] = {}  # actor -> the memory it holds (more, if kept)
        for actor, memory in KEPT.take(self.kind, self.memory, count):
            self._start(actor, memory)
        for _ in range(count - len(self.starting)):
            self._start()
        while not self.actors:  # the first ready actor ends the start-up phase
            self._admit(timeout=0.5)

    def _start(self, kept: Any = None, memory: int = 0) -> None:
        """Start a new actor, or hand a kept one (holding `memory`) this pool's context."""
        if kept is None:
            actor = self.actor_class.remote(self.context_ref, self.threads)
            ref, memory = actor.ready.remote(), self.memory
        else:
            actor, ref = kept, kept.reset.remote(self.context_ref)
        self.starting[ref] = (self.next_id, actor, time.monotonic(), kept is not None)
        self.holds[actor] = memory
        self.next_id += 1

    def _admit(self, timeout: float) -> None:
        """Move actors that became ready into service; fail the ones that cannot start."""
        import ray
        from ray.exceptions import RayActorError

        if not self.starting:
            return
        ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=timeout)
        for ref in ready:
            actor_id, actor, _, kept = self.starting.pop(ref)
            try:
                ray.get(ref)
            except RayActorError as exc:
                if kept:  # it died since its last pool: a new one takes its place
                    self._start()
                else:
                    self._start_failed(f"{exc}")
                continue
            self.actors[actor_id] = actor
        now = time.monotonic()
        for ref, (_, actor, since, _) in list(self.starting.items()):
            if now - since > READY_TIMEOUT_S:
                del self.starting[ref]
                ray.kill(actor)
                self._start_failed(f"not placed within {READY_TIMEOUT_S:.0f} s")

    def _start_failed(self, why: str) -> None:
        if not self.actors and not self.starting:
            raise MergeFailed(
                f"worker actors failed to start ({why}); is raymerge installed on every Ray "
                "node, and does the cluster have the CPUs, GPUs and memory each worker asks "
                "for? (see docs/cluster.md)"
            )

    def map(
        self, items: list, call: str, on_result: Callable[[Any, Any], None],
        payload: Callable[[Any], Any] | None = None,
    ) -> int:  # fmt: skip
        """Run `call` on every item (with `payload(item)`); returns how many were retried."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        queue = [(-item.nbytes, item.key, item) for item in items]
        heapq.heapify(queue)
        attempts: dict[str, int] = {}
        avoid: dict[str, int] = {}
        in_flight: dict[Any, tuple[int, Any, float]] = {}
        load: dict[int, int] = {}
        retries = 0
        self.idle = False
        while queue or in_flight:
            self._admit(timeout=0)
            limit = self._fair_share(len(queue) + len(in_flight))
            for actor_id in list(self.actors):
                while load.get(actor_id, 0) < limit and queue:
                    item = self._next_for(queue, actor_id, avoid)
                    ref = getattr(self.actors[actor_id], call).remote(
                        item, None if payload is None else payload(item)
                    )
                    in_flight[ref] = (actor_id, item, time.monotonic() + self._deadline(item))
                    load[actor_id] = load.get(actor_id, 0) + 1
            if not in_flight:
                if not self.starting:
                    raise MergeFailed(
                        f"no live workers are left to run the remaining {len(queue)} items; "
                        "finished work is kept: rerun the same command to resume"
                    )
                self._admit(timeout=0.5)
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            if not ready:
                retries += self._expire(in_flight, load, queue, attempts, avoid)
                continue
            ref = ready[0]
            actor_id, item, _ = in_flight.pop(ref)
            load[actor_id] -= 1
            try:
                result = ray.get(ref)
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                if isinstance(cause, RaymergeError):
                    raise cause from None
                failure = f"{type(cause).__name__}: {cause}"
            except (RayActorError, GetTimeoutError) as exc:
                failure = f"worker died ({exc.__class__.__name__})"
                self._replace(actor_id)
            else:
                on_result(item, result)
                continue
            retries += self._retry(item, failure, actor_id, queue, attempts, avoid)
        self.idle = True
        return retries

    def _fair_share(self, remaining: int) -> int:
        """Items one actor may hold: a pipeline's worth, but no more than its share of what
        is left among the actors up or starting (a few items then go to several workers)."""
        actors = max(1, len(self.actors) + len(self.starting))
        return max(1, min(IN_FLIGHT_PER_WORKER, -(-remaining // actors)))

    def _deadline(self, item: Any) -> float:
        if self.options.deadline_s is not None:
            return self.options.deadline_s
        size = getattr(item, "input_bytes", item.nbytes)
        work = getattr(item, "work", 0.0)
        return MIN_DEADLINE_S + size / DEADLINE_BYTES_PER_S + work / DEADLINE_WORK_PER_S

    def _expire(self, in_flight, load, queue, attempts, avoid) -> int:
        """Items past their deadline: their actor is taken to hang and is replaced, the item
        retried; returns how many were."""
        now, expired = time.monotonic(), 0
        for actor_id, item, deadline in list(in_flight.values()):
            if now > deadline and actor_id in self.actors:
                for other, (other_actor, other_item, _) in list(in_flight.items()):
                    if other_actor == actor_id:  # everything queued on that actor goes too
                        del in_flight[other]
                        load[actor_id] -= 1
                        if other_item is not item:
                            heapq.heappush(queue, (-other_item.nbytes, other_item.key, other_item))
                self._replace(actor_id)
                expired += self._retry(item, "deadline passed", actor_id, queue, attempts, avoid)
        return expired

    def _retry(self, item, failure: str, actor_id: int, queue, attempts, avoid) -> int:
        attempts[item.key] = attempts.get(item.key, 0) + 1
        if attempts[item.key] >= self.options.max_attempts:
            raise MergeFailed(
                f"{describe(item)} failed {attempts[item.key]} times; last error: {failure}. "
                "Finished work is kept: rerun the same command to resume"
            )
        avoid[item.key] = actor_id
        heapq.heappush(queue, (-item.nbytes, item.key, item))
        return 1

    def _next_for(self, queue: list, actor_id: int, avoid: dict[str, int]) -> Any:
        """The largest queued item that did not just fail on this actor (unless it is the
        only actor)."""
        if len(self.actors) > 1 and avoid.get(queue[0][1]) == actor_id:
            skipped = [heapq.heappop(queue)]
            while queue and avoid.get(queue[0][1]) == actor_id:
                skipped.append(heapq.heappop(queue))
            chosen = heapq.heappop(queue) if queue else skipped.pop(0)
            for entry in skipped:
                heapq.heappush(queue, entry)
            return chosen[2]
        return heapq.heappop(queue)[2]

    def _replace(self, actor_id: int) -> None:
        import ray

        actor = self.actors.pop(actor_id, None)
        if actor is None:
            return
        ray.kill(actor)
        if self.spares > 0:
            self.spares -= 1
            self.restarts += 1
            self._start()

    def close(self) -> None:
        """End the pool: actors still starting are ended; the live ones are kept for the
        next pool (inside `keeping()`) when nothing of theirs is in flight, else ended."""
        _kill([actor for _, actor, _, _ in self.starting.values()])
        if self.idle:
            KEPT.keep(self.kind, [(a, self.holds[a]) for a in self.actors.values()])
        else:
            _kill(list(self.actors.values()))


def describe(item: Any) -> str:
    label = getattr(item, "label", None)
    return f"work unit {item.key}" + (f" ({label})" if label else "")


def worker_count(options: PoolOptions, pending: int) -> int:
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
    memory = resources.get("memory", 0.0)
    if options.memory_per_worker and memory and count * options.memory_per_worker > memory:
        from raymerge.sizes import human

        raise ConfigError(
            f"{count} workers with --worker-memory {human(options.memory_per_worker)} each need "
            f"{human(count * options.memory_per_worker)}, but the Ray cluster offers "
            f"{human(memory)}; lower --workers or --worker-memory"
        )
    return max(1, min(count, max(1, pending)))
