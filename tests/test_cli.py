"""Bad input through the real CLI: one clear message, the right exit code, no traceback, and
nothing left behind that looks like a finished merge."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from raymerge.cli import main
from tests.conftest import ties_config, write_config


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def copy_model(models, tmp_path, name="bad") -> str:
    folder = tmp_path / name
    shutil.copytree(models["model_2"], folder)
    return str(folder)


def first_shard(folder) -> str:
    return os.path.join(
        folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0]
    )


def edit_header(path, edit) -> None:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    edit(header)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def first_tensor(header) -> str:
    return next(k for k in header if k != "__metadata__")


def run_with_model(models, tmp_path, model_path, expect_code, match, **config_changes):
    body = ties_config(models)
    body["models"][1]["model"] = model_path
    body.update(config_changes)
    config = write_config(tmp_path / "c.yaml", body)
    out = tmp_path / "out"
    result = invoke("run", config, out, "--no-progress")
    assert result.exit_code == expect_code, result.output
    assert match in result.output, result.output
    assert not (out / "COMPLETE").exists() and not (out / "model.safetensors.index.json").exists()
    return result


def set_offsets(offsets):
    def edit(header):
        header[first_tensor(header)]["data_offsets"] = offsets

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (set_offsets([0, 10**9]), "data_offsets"),
        (lambda h: h[first_tensor(h)].update(dtype="Q4_K"), "unknown dtype 'Q4_K'"),
        (
            lambda h: [
                h[k].update(data_offsets=[0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]])
                for k in list(h)[1:3]
            ],
            "overlap",
        ),
    ],
    ids=["offsets-out-of-range", "unknown-dtype", "overlapping"],
)
def test_corrupt_headers_exit_1(models, tmp_path, edit, match):
    folder = copy_model(models, tmp_path)
    edit_header(first_shard(folder), edit)
    run_with_model(models, tmp_path, folder, 1, match)


def test_absurd_header_length_exits_1(models, tmp_path):
    folder = copy_model(models, tmp_path)
    shard = first_shard(folder)
    with open(shard, "r+b") as f:
        f.write(struct.pack("<Q", 2**62))
    run_with_model(models, tmp_path, folder, 1, "exceeds")


def test_truncated_shard_exits_1(models, tmp_path):
    folder = copy_model(models, tmp_path)
    shard = first_shard(folder)
    os.truncate(shard, os.path.getsize(shard) - 1)
    run_with_model(models, tmp_path, folder, 1, "truncated")


def test_index_escaping_checkpoint_exits_1(models, tmp_path):
    folder = copy_model(models, tmp_path)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"][next(iter(index["weight_map"]))] = "../x.safetensors"
    json.dump(index, open(index_path, "w"))
    run_with_model(models, tmp_path, folder, 1, "outside the checkpoint")


def test_mismatched_models_exit_2(models, tmp_path):
    folder = copy_model(models, tmp_path)

    def drop(h):
        del h[first_tensor(h)]

    shard = first_shard(folder)
    with open(shard, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        name = first_tensor(json.loads(f.read(length)))
    edit_header(shard, drop)
    os.remove(os.path.join(folder, "model.safetensors.index.json"))
    run_with_model(models, tmp_path, folder, 2, f"tensor {name!r} is in")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"merge_method": "frankenstein"}, "unknown merge method 'frankenstein'"),
        ({"parameters": {"density": 1.5}}, "parameters.density: 1.5 is outside [0, 1]"),
        ({"models": [{"model": "/nowhere/at/all", "parameters": {"weight": 1}}]}, "not found"),
    ],
)
def test_config_errors_exit_2(models, tmp_path, change, match):
    body = ties_config(models) | change
    result = invoke("run", write_config(tmp_path / "c.yaml", body), tmp_path / "out")
    assert result.exit_code == 2 and match in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights", [(1.0, -0.5), (0.0, 0.0)])
def test_linear_weights_exit_2(models, tmp_path, weights):
    body = {
        "merge_method": "linear",
        "models": [
            {"model": models["model_1"], "parameters": {"weight": weights[0]}},
            {"model": models["model_2"], "parameters": {"weight": weights[1]}},
        ],
    }
    result = invoke("plan", write_config(tmp_path / "c.yaml", body))
    assert result.exit_code == 2 and "normalize" in result.output


def test_yaml_syntax_error_exit_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("merge_method: ties\n  models: - [\n")
    result = invoke("plan", path)
    assert result.exit_code == 2 and "YAML syntax error at line" in result.output


def test_occupied_output_exit_2(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    result = invoke("run", write_config(tmp_path / "c.yaml", ties_config(models)), out)
    assert result.exit_code == 2 and "--force" in result.output
    assert sorted(os.listdir(out)) == ["something"]


def test_plan_inspect_verify(models, tmp_path):
    config = write_config(tmp_path / "c.yaml", ties_config(models))
    result = invoke("plan", config, "--part-size", "10KB")
    assert result.exit_code == 0 and "bytes to read" in result.output and "parts" in result.output
    report = json.loads(invoke("plan", config, "--json").output)
    assert report["method"] == "ties" and report["bytes_to_read"] > report["bytes_to_write"] / 2
    result = invoke("inspect", models["base"])
    assert result.exit_code == 0 and "model.embed_tokens.weight" in result.output
    result = invoke("verify", tmp_path)
    assert result.exit_code == 1 and "tensors.parquet" in result.output


@pytest.mark.slow
def test_console_script_runs_a_merge_in_its_own_local_ray(models, tmp_path):
    """The installed `raymerge` starts its own Ray on loopback and leaves HOME untouched."""
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(tmp_path / "c.yaml", ties_config(models))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    script = os.path.join(os.path.dirname(sys.executable), "raymerge")
    before = ray_daemons()
    done = subprocess.run(
        [script, "run", config, str(tmp_path / "out"), "--workers", "2", "--part-size", "20KB"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "merged" in done.stdout and "merging" in done.stderr  # summary and progress bar
    # its Ray, agents included, ends with it (agents left to notice a dead raylet themselves
    # outlived it by a minute)
    assert no_new_daemons(before, within_s=5.0)
    assert os.listdir(home) == []  # no auth token, no Ray state in the user's home
    done = subprocess.run([script, "verify", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("ok:")


@pytest.mark.slow
def test_ctrl_c_stops_a_merge_and_leaves_it_resumable(models, tmp_path):
    """SIGINT during the merge: exit 130 within seconds, Ray shut down, nothing complete."""
    import signal

    config = write_config(tmp_path / "c.yaml", ties_config(models))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAYMERGE_FAULT"] = f"hang:000002:{tmp_path}"  # one part never finishes
    script = os.path.join(os.path.dirname(sys.executable), "raymerge")
    process = subprocess.Popen(
        [
            script,
            "run",
            config,
            str(tmp_path / "out"),
            "--workers",
            "1",
            "--part-size",
            "20KB",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "fault-000002").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "COMPLETE").exists()


@pytest.mark.slow
def test_a_plan_error_while_ray_starts_exits_at_once_and_leaves_nothing(models, tmp_path):
    """The console script plans while its local Ray starts in the background: a plan-time
    error still exits 2 with one line, creates no output folder and leaves no Ray behind."""
    config = write_config(tmp_path / "c.yaml", ties_config(models))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    script = os.path.join(os.path.dirname(sys.executable), "raymerge")
    out = tmp_path / "out"
    before = ray_daemons()
    done = subprocess.run(
        [script, "run", config, str(out), "--worker-memory", "4KiB", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--worker-memory" in lines[0], done.stderr
    assert not out.exists()
    assert no_new_daemons(before)  # a Ray it started ends with it


RAY_DAEMONS = (b"gcs_server", b"raylet", b"DashboardAgent", b"RuntimeEnvAgent")


def ray_daemons() -> set[int]:
    """The pids of every Ray GCS server, raylet and agent on this machine."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                program = f.read().split(b"\0")[0]
        except OSError:
            continue
        if any(name in program for name in RAY_DAEMONS):
            found.add(int(pid))
    return found


def no_new_daemons(before: set[int], within_s: float = 10.0) -> bool:
    """Whether every Ray daemon started since `before` is gone within `within_s`."""
    deadline = time.monotonic() + within_s
    while ray_daemons() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    return not ray_daemons() - before
