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
