"""What a data stage is: a prepare stage over data of its own (ZipIt's calibration tokens),
declared by a method and run by stages.py. A leaf module, so a stage's own module can
import it without importing the method registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageItem:
    """One piece of a data stage's work (e.g. a block of calibration sequences)."""

    key: str
    nbytes: int  # what it weighs: the pool runs the largest first
    data: Any = None
    work: float = 0.0  # floating-point operations it costs: its deadline grows with them

    @property
    def input_bytes(self) -> int:
        return self.nbytes


@dataclass(frozen=True)
class DataStep:
    """One map of a data stage. `items(state)` lists the work on the driver; `run(runner,
    item, payload)` does one item on a worker (with the worker's open sources) and returns
    numpy arrays and plain values, never torch tensors (the driver does not import torch);
    `fold(state, position, item, result)` takes each result into the state on the driver,
    in item order whatever order they finish in, so any worker count gives the same state."""

    label: str
    items: Callable[[dict], list[StageItem]]
    run: Callable[[Any, StageItem, Any], Any]
    fold: Callable[[dict, int, StageItem, Any], None]
    payload: Callable[[StageItem, dict], Any] | None = None


@dataclass(frozen=True)
class StagePlan:
    """What a data stage found at plan time: a fingerprint of its own inputs (the plan's
    digest covers it), a line for `raymerge plan`, plain settings for the run, and the data
    it read (the steps use these very bytes: the fingerprint is theirs)."""

    fingerprint: str
    summary: str
    settings: dict[str, Any]
    data: Any = field(default=None, compare=False)
    worker_bytes: int = 0  # the most one worker holds for one of the stage's items


@dataclass(frozen=True)
class DataStage:
    """A prepare stage over data of its own rather than over work units (ZipIt's
    calibration forward, then its matching): checked and fingerprinted at plan time
    (`plan`, which raises ConfigError for bad input or for a stage that cannot fit
    --worker-memory), run as steps on the pool, stored as one artifact in the ledger, and
    handed to each tensor's merge as `MergeInputs.facts`.

    Large arrays never travel through the artifact or Ray: steps write them as files under
    the output (`state["destination"]`, through the Destination interface) and keep their
    references; `verify` rereads the files an artifact names before a resumed run trusts
    it (a damaged or missing one means: gather again)."""

    name: str
    # (spec, checkpoints, planned tensors, --worker-memory or None) -> StagePlan
    plan: Callable[[Any, list, list, int | None], StagePlan]
    steps: tuple[DataStep, ...]  # run in order, once per pass
    artifact: Callable[[dict], dict]  # the final state -> what is stored (JSON and arrays)
    # (artifact, OutputTensor, the output's root URI) -> its facts
    facts: Callable[[dict, Any, str], dict | None]
    # passes(settings): how often `steps` run (ZipIt: one pass per window of layers, so a
    # pass's statistics stay small); state["pass"] tells the steps which one this is
    passes: Callable[[dict], int] | None = None
    end_pass: Callable[[dict], None] | None = None  # drop what the next pass does not need
    final: tuple[DataStep, ...] = ()  # run once, after the last pass
    start: Callable[[dict], None] | None = None  # before gathering: clear an earlier try's files
    # after each pass but the last: what of the state the next passes need (JSON, arrays and
    # file references), stored in the ledger so a stopped run resumes at the next pass once
    # the files it names check out; `resume(state, carried)` puts it back
    carry: Callable[[dict], dict] | None = None
    resume: Callable[[dict, dict], None] | None = None
    # items from state["artifact"] (a stored artifact or pass); its folds put the names of
    # bad files in state["damaged"]
    verify: DataStep | None = None

    def step(self, number: int) -> DataStep:
        """Step `number` of steps + final + (verify,) (how a worker is told which one)."""
        extra = () if self.verify is None else (self.verify,)
        return (self.steps + self.final + extra)[number]
