"""A pool of Ray worker actors that runs parts: largest first, two in flight per actor, a
failed part retried on another actor, a dead actor replaced.

The pool only schedules: the actors read, merge and write themselves and return small
results (checksums, histograms). Planning never depends on the pool's size.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raymerge.errors import ConfigError, MergeFailed, RaymergeError
from raymerge.plan import Part
from raymerge.ray_cluster import cluster_resources
from raymerge.worker import PartRunner, WorkContext

IN_FLIGHT_PER_WORKER = 2  # one merging, one queued, so a worker never waits on the driver


@dataclass
class PoolOptions:
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_attempts: int = 3
    runtime_env: dict | None = None


class _WorkerActor:
    """A Ray actor around PartRunner; one per worker slot."""

    def __init__(self, context: WorkContext, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.runner = PartRunner(context)

    def ready(self) -> bool:
        return True

    def run(self, part: Part, payload: Any = None) -> Any:
        _maybe_inject_fault(part)
        return self.runner.run(part)

    def statistic(self, part: Part, payload: Any) -> Any:
        _maybe_inject_fault(part)
        return self.runner.statistic(part, payload)


def _maybe_inject_fault(part: Part) -> None:
    """Test hook: RAYMERGE_FAULT=(raise|exit|hang):PART_KEY:MARKER_DIR fails that part once
    (raises, kills the worker process, or never returns)."""
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
    if mode == "hang":
        time.sleep(3600)
    raise OSError(f"injected fault on part {key}")


class WorkerPool:
    def __init__(self, context: WorkContext, options: PoolOptions, max_parts: int) -> None:
        import ray
        from ray.exceptions import RayActorError

        self.context = context
        self.options = options
        count = worker_count(options, max_parts)
        actor_options = {"num_cpus": options.cpus_per_worker, "num_gpus": options.gpus_per_worker}
        if options.runtime_env:
            actor_options["runtime_env"] = options.runtime_env
        self.actor_class = ray.remote(_WorkerActor).options(**actor_options)
        self.threads = max(1, int(options.cpus_per_worker))
        self.actors = {i: self._start() for i in range(count)}
        self.next_id = count
        self.spares = count  # replacements allowed for actors that die
        try:
            ray.get([actor.ready.remote() for actor in self.actors.values()])
        except RayActorError as exc:
            raise MergeFailed(
                f"worker actors failed to start ({exc}); is raymerge installed on every Ray "
                "node? (see docs/cluster.md)"
            ) from None

    def _start(self):
        return self.actor_class.remote(self.context, self.threads)

    def map(
        self, parts: list[Part], call: str, on_result: Callable[[Part, Any], None],
        payload: Any = None,
    ) -> int:  # fmt: skip
        """Run `call` on every part; returns how many attempts were retried."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        queue = deque(sorted(parts, key=lambda p: (-p.nbytes, p.key)))
        attempts: dict[str, int] = defaultdict(int)
        avoid: dict[str, int] = {}
        in_flight: dict = {}
        load: dict[int, int] = defaultdict(int)
        retries = 0
        while queue or in_flight:
            for actor_id in list(self.actors):
                while load[actor_id] < IN_FLIGHT_PER_WORKER and queue:
                    part = _next_for(queue, actor_id, avoid, len(self.actors))
                    ref = getattr(self.actors[actor_id], call).remote(part, payload)
                    in_flight[ref] = (actor_id, part)
                    load[actor_id] += 1
            if not in_flight:
                raise MergeFailed("no live workers are left to run the remaining parts")
            ready: list = []
            while not ready:  # short waits, so Ctrl-C is handled promptly
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            ref = ready[0]
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
                self._replace(actor_id)
            else:
                on_result(part, result)
                continue
            attempts[part.key] += 1
            if attempts[part.key] >= self.options.max_attempts:
                raise MergeFailed(
                    f"part {part.key} ({part_label(part)}) failed {attempts[part.key]} "
                    f"times; last error: {failure}. Finished parts are kept: rerun the same "
                    "command to resume"
                )
            retries += 1
            avoid[part.key] = actor_id
            queue.appendleft(part)
        return retries

    def _replace(self, actor_id: int) -> None:
        if actor_id not in self.actors:
            return
        del self.actors[actor_id]
        if self.spares > 0:
            self.spares -= 1
            self.actors[self.next_id] = self._start()
            self.next_id += 1

    def close(self) -> None:
        import ray

        for actor in self.actors.values():
            ray.kill(actor)


def part_label(part: Part) -> str:
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
    return max(1, min(count, pending))
