"""Merges on a multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and two worker
nodes on this machine, on 127.0.0.1): a worker node removed mid-merge, a local output
refused unless it is said to be shared, and a merge submitted with `ray job submit` (the
head then runs Ray's job server, from ray[default], which `make test` installs).

The driver is `raymerge run --address` in its own process, as on a real cluster; the test
process only owns the cluster's nodes.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ties_config, write_config

SCRIPT = os.path.join(os.path.dirname(sys.executable), "raymerge")
SIZES = ["--shard-size", "50000", "--part-size", "8000"]


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})  # fmt: skip
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    yield cluster
    cluster.shutdown()


def raymerge(*args: str, env: dict | None = None, **kwargs):
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment.update(env or {})
    return subprocess.Popen([SCRIPT, *args], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def node_of(pid: int, cluster):
    """The cluster node whose raylet started process `pid`."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in cluster.worker_nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    raise AssertionError("the worker runs on no worker node of the cluster")


def summary_line(stdout: str) -> list[int]:
    line = next(x for x in stdout.splitlines() if x.startswith("work units:"))
    return [int(w) for w in line.replace(",", "").split() if w.isdigit()]


def same_shards(a, b) -> bool:
    names = sorted(n for n in os.listdir(a) if n.endswith((".safetensors", ".parquet")))
    return names == sorted(
        n for n in os.listdir(b) if n.endswith((".safetensors", ".parquet"))
    ) and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


@pytest.mark.slow
def test_a_node_removed_mid_merge(cluster, models, tmp_path):
    """The node running a (hung) unit is removed: its units go to the other node's actor,
    the summary counts the retry and the replacement, and the bytes are unchanged."""
    config = write_config(tmp_path / "c.yaml", ties_config(models))
    out = tmp_path / "out"
    driver = raymerge(
        "run", config, str(out), "--address", cluster.address, "--workers", "2",
        "--no-progress", "--allow-local-destination", *SIZES,
        env={"RAYMERGE_FAULT": f"hang:000003:{tmp_path}"},
    )  # fmt: skip
    marker = tmp_path / "fault-000003"
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline and driver.poll() is None, driver.communicate()
        time.sleep(0.1)
    cluster.remove_node(node_of(int(marker.read_text()), cluster), allow_graceful=False)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    merged, resumed, retried, replaced = summary_line(stdout)
    assert retried >= 1 and replaced >= 1 and resumed == 0, stdout
    local = raymerge("run", config, str(tmp_path / "local"), "--workers", "2", "--no-progress",
                     *SIZES)  # fmt: skip
    assert local.wait(timeout=300) == 0, local.communicate()
    assert same_shards(out, tmp_path / "local")


@pytest.mark.slow
def test_a_local_output_on_a_multi_node_cluster_is_refused(cluster, models, tmp_path):
    config = write_config(tmp_path / "c.yaml", ties_config(models))
    driver = raymerge("run", config, str(tmp_path / "out"), "--address", cluster.address,
                      "--no-progress", *SIZES)  # fmt: skip
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "3 nodes" in lines[0] and "--allow-local-destination" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def head_with_dashboard():
    """A one-node cluster whose head runs the dashboard (the job server) on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    from tests.s3_support import free_port

    port = free_port()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": port,
        # the job agent's default port (52365) is taken by any other Ray on the machine
        "dashboard_agent_listen_port": free_port(),
    })  # fmt: skip
    yield f"http://127.0.0.1:{port}"
    cluster.shutdown()


@pytest.mark.slow
def test_ray_job_submit_runs_a_merge(head_with_dashboard, models, tmp_path):
    """`ray job submit --working-dir . -- raymerge run ...`: the entrypoint finds the
    cluster through RAY_ADDRESS, which the job sets."""
    from raymerge.index import verify

    config = write_config(tmp_path / "c.yaml", ties_config(models))
    out = tmp_path / "out"
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [ray, "job", "submit", "--address", head_with_dashboard, "--working-dir", root,
               "--", SCRIPT, "run", config, str(out), "--workers", "2", "--no-progress",
               *SIZES]  # fmt: skip
    deadline = time.monotonic() + 120
    while True:  # the head's job agent registers a while after the head is up
        submit = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root)
        if "No available agent" not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr
    assert "work units:" in submit.stdout
    assert (out / "COMPLETE").exists() and verify(str(out)).problems == []
