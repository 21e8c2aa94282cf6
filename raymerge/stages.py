"""Prepare stages: a method's fact rounds mapped over work units, reduced on the driver.

A tensor cut across work units (or, for a method whose facts span a model, every tensor)
gets its whole-tensor facts here before the merge: each round maps over the units holding
such tensors, each worker returns small statistics per tensor, the driver adds them up per
scope (a tensor, or the whole model) and reduces them with the method's own `reduce`. The
result is stored in the ledger as an artifact, so a resumed run does not gather it again,
and reaches the merge through `MergeInputs.facts`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

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
