"""Prepare stages: a method's fact rounds mapped over work units, reduced on the driver.

A tensor cut across work units (or, for a method whose facts span a model, every tensor)
gets its whole-tensor facts here before the merge: each round maps over the units holding
such tensors, each worker returns small statistics per tensor, the driver adds them up per
scope (a tensor, or the whole model) and reduces them with the method's own `reduce`. The
result is stored in the ledger as an artifact, so a resumed run does not gather it again,
and reaches the merge through `MergeInputs.facts`.

A method may instead declare a data stage (`DataStage`: ZipIt's calibration statistics and
matching): its steps map over items of their own, the results are folded in item order, and
the final state is stored as one artifact the same way; so is, after each pass of a stage
that runs in passes, what the next pass needs, so a stopped run resumes at the next pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from raymerge.datastage import DataStage, StageItem
from raymerge.ledger import Ledger
from raymerge.methods.base import FactRound, MergeInputs, MergeMethod, add_stats
from raymerge.plan import Plan

ARTIFACT = "facts"
MODEL_SCOPE = "model"


def scopes(plan: Plan, method: MergeMethod) -> dict[int, str]:
    """Tensor index -> the scope its facts are reduced in, for tensors that need a stage."""
    split = set(plan.split_tensors())
    chosen = {}
    for index, tensor in enumerate(plan.tensors):
        if tensor.op != "merge" or not method.fact_rounds(tensor.shared, len(tensor.shape)):
            continue
        if method.spans_model(tensor.shared):
            chosen[index] = MODEL_SCOPE
        elif index in split:
            chosen[index] = str(index)
    return chosen


def prepare(
    pool: Any, plan: Plan, method: MergeMethod, ledger: Ledger, log: Callable[[str], None]
) -> dict[int, dict]:
    """Facts per tensor index for every tensor that needs a stage (stored, or gathered)."""
    if method.stage is not None:
        return _data_stage(pool, plan, method.stage, ledger, log)
    scope_of = scopes(plan, method)
    if not scope_of:
        return {}
    stored = ledger.artifact(ARTIFACT)
    if stored is None:
        stored = json.loads(json.dumps(_gather(pool, plan, method, scope_of, log)))
        ledger.store_artifact(ARTIFACT, stored)
    else:
        log(f"prepare: reusing the stored facts of {len(stored['scopes'])} scope(s)")
    return {index: stored["scopes"][scope] for index, scope in scope_of.items()}


def _gather(pool, plan: Plan, method: MergeMethod, scope_of: dict[int, str], log) -> dict:
    rounds: dict[str, tuple[FactRound, ...]] = {}
    meta: dict[str, MergeInputs] = {}
    for index, scope in scope_of.items():
        tensor = plan.tensors[index]
        rounds.setdefault(scope, method.fact_rounds(tensor.shared, len(tensor.shape)))
        meta.setdefault(scope, MergeInputs(
            tensor.name, [], tensor.base, tensor.shared, list(tensor.per_input), plan.seed,
            tensor.shape, 0, None, tuple(s.input for s in tensor.sources),
        ))  # fmt: skip
    facts: dict[str, dict] = {scope: {} for scope in rounds}
    units = [u for u in plan.units if any(p.tensor in scope_of for p in u.pieces)]
    for number in range(max(len(r) for r in rounds.values())):
        active = {
            scope for scope, r in rounds.items()
            if number < len(r) and (r[number].needed is None or r[number].needed(facts[scope]))
        }  # fmt: skip
        if not active:
            continue
        wanted = {i for i, scope in scope_of.items() if scope in active}
        selected = [u for u in units if any(p.tensor in wanted for p in u.pieces)]
        log(f"prepare: round {number + 1} over {len(selected)} work units")
        totals: dict[str, dict] = {scope: {} for scope in active}

        def payload(unit, number=number, wanted=wanted) -> dict:
            mine = {p.tensor for p in unit.pieces if p.tensor in wanted}
            return {"round": number, "facts": {i: facts[scope_of[i]] for i in mine}}

        def add(unit, stats: dict, totals=totals) -> None:
            for index, tensor_stats in stats.items():
                add_stats(totals[scope_of[index]], tensor_stats)

        pool.map(selected, "statistic", add, payload)
        for scope in active:
            facts[scope] = rounds[scope][number].reduce(totals[scope], facts[scope], meta[scope])
    return {"scopes": facts}


def _data_stage(pool, plan: Plan, stage: DataStage, ledger: Ledger, log) -> dict[int, dict]:
    """Run a stage over data of its own (or take its stored artifact, once the files it
    names check out), then give every merged tensor its facts."""
    artifact = _decoded(ledger.artifact(stage.name))
    if artifact is not None and not _verified(pool, stage, artifact, log):
        artifact = None
    if artifact is None:
        artifact = _gather_data(pool, plan, stage, ledger, log)
        ledger.store_artifact(stage.name, encode_arrays(artifact))
    else:
        log(f"prepare: reusing the stored {stage.name} artifact")
    facts, root = {}, ledger.destination.root
    for index, tensor in enumerate(plan.tensors):
        mine = stage.facts(artifact, tensor, root) if tensor.op == "merge" else None
        if mine is not None:
            facts[index] = mine
    return facts


def _gather_data(pool, plan: Plan, stage: DataStage, ledger: Ledger, log) -> Any:
    """The stage's passes and final steps; after each pass but the last, what the next
    needs is stored, and a run stopped later starts again from there."""
    state = {"settings": plan.stage.settings, "data": plan.stage.data,
             "destination": ledger.destination}  # fmt: skip
    passes = 1 if stage.passes is None else stage.passes(state["settings"])
    name, first = f"{stage.name}-pass", 0
    stored = None if stage.carry is None else _decoded(ledger.artifact(name))
    if _resumable(stored, passes) and _verified(pool, stage, stored, log) and _resumed(
        stage, state, stored
    ):
        first = stored["passes"]
        log(f"prepare: resuming {stage.name} after pass {first} of {passes}")
    elif stage.start is not None:
        stage.start(state)
    for state["pass"] in range(first, passes):
        shown = f", pass {state['pass'] + 1} of {passes}" if passes > 1 else ""
        for number, step in enumerate(stage.steps):
            _run_step(pool, number, step, state, log, shown)
        if stage.end_pass is not None:
            stage.end_pass(state)
        if stage.carry is not None and state["pass"] + 1 < passes:
            done = {"passes": state["pass"] + 1, "carry": stage.carry(state)}
            ledger.store_artifact(name, encode_arrays(done))
    for number, step in enumerate(stage.final, start=len(stage.steps)):
        _run_step(pool, number, step, state, log)
    return stage.artifact(state)


def _resumable(stored: Any, passes: int) -> bool:
    """Whether a stored record names a pass that a run of `passes` passes can go on from."""
    if not (isinstance(stored, dict) and isinstance(stored.get("passes"), int)):
        return False
    return 0 < stored["passes"] < passes


def _resumed(stage: DataStage, state: dict, stored: dict) -> bool:
    """Whether a stored pass was put back into `state` (one of another shape is not ours)."""
    try:
        stage.resume(state, stored["carry"])
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _verified(pool, stage: DataStage, artifact: Any, log) -> bool:
    """Whether every file a stored artifact names is there with its recorded bytes
    (reread on the workers: the driver never reads them)."""
    if stage.verify is None:
        return True
    state: dict[str, Any] = {"artifact": artifact, "damaged": []}
    number = len(stage.steps) + len(stage.final)
    try:
        _run_step(pool, number, stage.verify, state, log)
    except (KeyError, TypeError, ValueError):  # an artifact of another shape: not ours
        return False
    if state["damaged"]:
        log(f"prepare: {len(state['damaged'])} stored {stage.name} file(s) are missing or "
            f"damaged ({state['damaged'][0]}, ...): gathering the statistics again")  # fmt: skip
        return False
    return True


def _decoded(stored: Any) -> Any:
    """A stored artifact read back, or None when absent or damaged (then: gather again)."""
    if stored is None:
        return None
    try:
        return decode_arrays(stored)
    except (ValueError, TypeError, KeyError):  # torn base64, a bad .npy header
        return None


def _run_step(pool, number: int, step, state: dict, log, shown: str = "") -> None:
    """Map `step` over its items on the pool; fold the results in item order as soon as
    each one's predecessors are in (so at most the out-of-order ones wait)."""
    items: list[StageItem] = step.items(state)
    if not items:
        return
    log(f"prepare: {step.label} ({len(items)} item{'s' * (len(items) != 1)}{shown})")
    position = {item.key: i for i, item in enumerate(items)}
    waiting: dict[int, Any] = {}
    folded = 0

    def arrived(item: StageItem, result: Any) -> None:
        nonlocal folded
        waiting[position[item.key]] = result
        while folded in waiting:
            step.fold(state, folded, items[folded], waiting.pop(folded))
            folded += 1

    def payload(item: StageItem) -> dict:
        data = None if step.payload is None else step.payload(item, state)
        return {"step": number, "data": data}

    pool.map(items, "stage", arrived, payload)


def encode_arrays(value: Any) -> Any:
    """`value` with every numpy array as {"__array__": base64 of its .npy bytes}: JSON."""
    import base64
    import io

    import numpy as np

    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return {"__array__": base64.b64encode(buffer.getvalue()).decode()}
    if isinstance(value, dict):
        return {str(k): encode_arrays(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_arrays(v) for v in value]
    return value


def decode_arrays(value: Any) -> Any:
    """The inverse of encode_arrays (a stored artifact is read back without pickle)."""
    import base64
    import io

    import numpy as np

    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            raw = base64.b64decode(value["__array__"])
            return np.load(io.BytesIO(raw), allow_pickle=False)
        return {k: decode_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_arrays(v) for v in value]
    return value
