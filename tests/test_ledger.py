"""The output folder's ledger under hostile conditions: a killed driver, a second driver,
changed inputs, torn records, --force aimed at an input, symlinks inside the output."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from raymerge.config import parse_spec
from raymerge.errors import ConfigError
from raymerge.index import verify
from raymerge.runner import RunOptions, run_merge
from tests.conftest import ties_config, write_config

SCRIPT = os.path.join(os.path.dirname(sys.executable), "raymerge")
SIZES = {"shard_size": 50_000, "part_size": 8_000}


def merge(spec, out, **options):
    return run_merge(spec, str(out), RunOptions(progress=False, **options), log=lambda _: None)


def same_outputs(a, b) -> bool:
    names = sorted(n for n in os.listdir(a) if n.endswith((".safetensors", ".parquet", ".json")))
    return names == sorted(
        n for n in os.listdir(b) if n.endswith((".safetensors", ".parquet", ".json"))
    ) and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


@pytest.fixture
def spec(models, tmp_path):
    return parse_spec(ties_config(models), "c", str(tmp_path), SIZES)


def start_driver(config: str, out, tmp_path, fault: str | None, *extra: str):
    """`raymerge run` in its own process group (its local Ray's processes go with it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if fault:
        env["RAYMERGE_FAULT"] = f"{fault}:{tmp_path}"
    return subprocess.Popen(
        [SCRIPT, "run", config, str(out), "--workers", "1", "--no-progress",
         "--shard-size", "50000", "--part-size", "8000", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_for(path, process, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.1)


def units_line(stdout: str) -> tuple[int, int]:
    line = next(x for x in stdout.splitlines() if x.startswith("work units:"))
    words = line.replace(",", "").split()
    return int(words[2]), int(words[4])  # merged, resumed


@pytest.mark.slow
def test_killed_driver_resumes_with_identical_bytes(models, tmp_path):
    """SIGKILL the driver's whole process group mid-merge, rerun: identical bytes, and no
    more units redone than a worker holds in flight."""
    from raymerge.checkpoint import open_checkpoint
    from raymerge.plan import make_plan
    from raymerge.pool import IN_FLIGHT_PER_WORKER

    config = write_config(tmp_path / "c.yaml", ties_config(models))
    spec = parse_spec(ties_config(models), "c", str(tmp_path), SIZES)
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    last = max(plan.units, key=lambda u: (-u.nbytes, u.key))  # a lone worker starts it last
    out = tmp_path / "out"
    driver = start_driver(config, out, tmp_path, f"hang:{last.key}")
    wait_for(tmp_path / f"fault-{last.key}", driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    # (a driver killed mid-write may leave a temporary file beside the records)
    recorded = len([n for n in os.listdir(out / "_raymerge" / "units") if n.endswith(".json")])
    assert recorded >= 1 and not (out / "COMPLETE").exists()
    rerun = subprocess.run([SCRIPT, "run", config, str(out), "--workers", "2", "--no-progress",
                            "--shard-size", "50000", "--part-size", "8000"],
                           capture_output=True, text=True)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    merged, resumed = units_line(rerun.stdout)
    assert resumed == recorded and merged + resumed == len(plan.units)
    assert merged <= IN_FLIGHT_PER_WORKER  # only what was in flight is redone
    clean = subprocess.run([SCRIPT, "run", config, str(tmp_path / "clean"), "--workers", "3",
                            "--no-progress", "--shard-size", "50000", "--part-size", "8000"],
                           capture_output=True, text=True)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    assert same_outputs(out, tmp_path / "clean")
    assert verify(str(out)).problems == []


@pytest.mark.slow
def test_a_second_driver_is_refused_while_the_first_runs(models, tmp_path):
    config = write_config(tmp_path / "c.yaml", ties_config(models))
    out = tmp_path / "out"
    first = start_driver(config, out, tmp_path, "hang:000002")
    try:
        wait_for(tmp_path / "fault-000002", first)
        for extra in ([], ["--force"]):
            second = subprocess.run([SCRIPT, "run", config, str(out), "--no-progress", *extra],
                                    capture_output=True, text=True)  # fmt: skip
            assert second.returncode == 2, second.stderr
            assert "another raymerge run" in second.stderr and "Traceback" not in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@pytest.mark.ray
def test_a_changed_input_is_never_mixed_in(ray_local, models, tmp_path):
    import shutil

    body = ties_config(models)
    copy = tmp_path / "m1"
    shutil.copytree(models["model_1"], copy)
    body["models"][0]["model"] = str(copy)
    spec = parse_spec(body, "c", str(tmp_path), SIZES)
    out = tmp_path / "out"
    merge(spec, out)
    (out / "COMPLETE").unlink()  # as if killed before the end
    shard = sorted(p for p in copy.iterdir() if p.suffix == ".safetensors")[0]
    os.utime(shard, ns=(time.time_ns(), time.time_ns()))  # the input changed
    changed = parse_spec(body, "c", str(tmp_path), SIZES)
    with pytest.raises(ConfigError, match="holds a different merge"):
        merge(changed, out)


@pytest.mark.ray
@pytest.mark.parametrize("victim", ["run.json", "shards.json", "units", "lock.json"])
def test_torn_records_mean_redo_never_a_crash(ray_local, spec, tmp_path, victim):
    out = tmp_path / "out"
    merge(spec, tmp_path / "clean")
    merge(spec, out)
    (out / "COMPLETE").unlink()
    state = out / "_raymerge"
    targets = sorted((state / "units").iterdir())[:3] if victim == "units" else [state / victim]
    for target in targets:
        target.write_text('{"digest": "' if victim != "lock.json" else "\x00garbage")
    summary = merge(spec, out)
    assert summary.units_done >= (3 if victim in ("units",) else 0)
    assert same_outputs(out, tmp_path / "clean") and (out / "COMPLETE").exists()
    merge(spec, out, force=True)  # --force always recovers a folder raymerge owns
    assert same_outputs(out, tmp_path / "clean")


@pytest.mark.ray
def test_a_damaged_committed_shard_is_redone_on_resume(ray_local, spec, tmp_path):
    out = tmp_path / "out"
    merge(spec, tmp_path / "clean")
    merge(spec, out)
    (out / "COMPLETE").unlink()
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    summary = merge(spec, out)
    assert summary.units_done >= 1
    assert same_outputs(out, tmp_path / "clean")


@pytest.mark.ray
@pytest.mark.parametrize("how", ["same", "symlink", "inside"])
def test_force_into_an_input_is_refused(ray_local, models, tmp_path, how):
    body = ties_config(models)
    target = models["model_1"]
    if how == "symlink":
        os.symlink(target, tmp_path / "link")
        out = tmp_path / "link"
    else:
        out = target if how == "same" else os.path.join(target, "sub")
    before = {n: os.path.getmtime(os.path.join(target, n)) for n in os.listdir(target)}
    spec = parse_spec(body, "c", str(tmp_path), SIZES)
    with pytest.raises(ConfigError, match="never writes into its inputs"):
        merge(spec, out, force=True)
    assert {n: os.path.getmtime(os.path.join(target, n)) for n in os.listdir(target)} == before


@pytest.mark.ray
def test_symlinks_in_the_output_are_never_followed(ray_local, spec, tmp_path):
    out = tmp_path / "out"
    merge(spec, out)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    os.remove(out / "config.json")
    os.symlink(outside / "keep.txt", out / "config.json")  # a link where an output goes
    os.symlink(outside, out / "_raymerge" / "units" / "linked")  # and a folder link
    merge(spec, out, force=True)
    assert (outside / "keep.txt").read_text() == "keep" and os.listdir(outside) == ["keep.txt"]
    assert not os.path.islink(out / "config.json")
    assert json.loads((out / "config.json").read_text())  # written fresh, not through


def test_unwritable_outputs_are_refused_before_anything_starts(models, tmp_path):
    from click.testing import CliRunner

    from raymerge.cli import main

    config = write_config(tmp_path / "c.yaml", ties_config(models))
    (tmp_path / "file").write_text("x")
    for out in (str(tmp_path / "file"), str(tmp_path / "file" / "sub"), "s3:///out"):
        result = CliRunner().invoke(main, ["run", config, out, "--no-progress"])
        assert result.exit_code == 2, (out, result.output)
        assert isinstance(result.exception, SystemExit)
        assert len(result.output.strip().splitlines()) == 1
    assert not os.path.exists("s3:")
