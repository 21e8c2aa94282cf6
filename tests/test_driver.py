"""The driver stays light and the pool copes: no torch in the driver, a hung unit past its
deadline is taken from its actor and done elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raymerge.config import parse_spec
from raymerge.runner import RunOptions, run_merge
from tests.conftest import ties_config


@pytest.mark.slow
def test_the_driver_never_imports_torch(models, tmp_path):
    spec_body = json.dumps(ties_config(models))
    code = f"""
import json, sys
from raymerge.config import parse_spec
from raymerge.runner import RunOptions, run_merge
spec = parse_spec(json.loads({spec_body!r}), "c", {str(tmp_path)!r})
run_merge(spec, {str(tmp_path / "out")!r}, RunOptions(progress=False, workers=1), log=print)
print("TORCH", "torch" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "TORCH False" in done.stdout
    assert (tmp_path / "out" / "COMPLETE").exists()


@pytest.mark.ray
def test_a_unit_past_its_deadline_is_redone_on_a_fresh_actor(ray_local, models, tmp_path):
    spec = parse_spec(ties_config(models), "c", str(tmp_path),
                      {"shard_size": 50_000, "part_size": 8_000})  # fmt: skip
    env = {"RAYMERGE_FAULT": f"hang:000001:{tmp_path}"}
    summary = run_merge(spec, str(tmp_path / "out"), RunOptions(
        progress=False, workers=2, runtime_env={"env_vars": env}, item_deadline_s=4.0,
    ), log=lambda _: None)  # fmt: skip
    assert (tmp_path / "fault-000001").exists()
    assert summary.retries >= 1 and summary.worker_restarts >= 1
    assert (tmp_path / "out" / "COMPLETE").exists()
    assert any("replaced" in line for line in summary.lines())


def merged_by(summary) -> set[str]:
    """The worker processes (host:pid) that merged a run's units."""
    return set(summary.worker_seconds)


@pytest.mark.ray
def test_kept_actors_serve_the_next_pool_and_a_dead_one_is_replaced(ray_local, models,
                                                                     tmp_path):  # fmt: skip
    """Inside pool.keeping() (a batch, the test session) a pool's actors serve the next pool
    of their kind after a reset; one that died meanwhile is replaced by a new one, not
    counted as a failure; the bytes are the same."""
    import filecmp

    import ray

    from raymerge import pool

    spec = parse_spec(ties_config(models), "c", str(tmp_path), {"part_size": 8_000})

    def merge(name: str):
        return run_merge(spec, str(tmp_path / name), RunOptions(progress=False, workers=2),
                         log=lambda _: None)  # fmt: skip

    first = merge("a")
    assert len(pool.KEPT.actors) == 2 and len(merged_by(first)) == 2  # many small units
    second = merge("b")
    assert merged_by(second) <= merged_by(first)  # the same processes
    ray.kill(pool.KEPT.actors[0][0])
    third = merge("c")
    assert third.worker_restarts == 0 and third.retries == 0
    assert len(merged_by(third) - merged_by(first)) <= 1
    for name in ("b", "c"):
        shard = next(f for f in os.listdir(tmp_path / "a") if f.endswith(".safetensors"))
        assert filecmp.cmp(tmp_path / "a" / shard, tmp_path / name / shard, shallow=False)


@pytest.mark.ray
def test_outside_keeping_a_merge_gives_its_actors_back(ray_local, models, tmp_path,
                                                       monkeypatch):  # fmt: skip
    """A caller's own Ray (no keeping()) gets its CPUs back when a merge ends."""
    import time

    import ray

    from raymerge import pool

    pool.KEPT.clear()
    monkeypatch.setattr(pool.KEPT, "enabled", False)
    spec = parse_spec(ties_config(models), "c", str(tmp_path), {"part_size": 8_000})
    run_merge(spec, str(tmp_path / "out"), RunOptions(progress=False, workers=2),
              log=lambda _: None)  # fmt: skip
    assert not pool.KEPT.actors
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
