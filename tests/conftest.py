"""Shared fixtures: one local Ray per test session, small generated checkpoints, helpers."""

from __future__ import annotations

import os

# Before Ray is imported anywhere: no usage stats, no token auth, loopback only.
os.environ.update(
    RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"
)
from tests.s3_support import set_test_credentials  # noqa: E402

set_test_credentials()  # fixed fake AWS credentials, before Ray or boto3 start

import pytest  # noqa: E402
import yaml  # noqa: E402

from raymerge.synth import SynthOptions, synthesize  # noqa: E402
from tests.s3_support import cutting_proxy, s3_auth_server, s3_bucket, s3_server  # noqa: E402, F401

RAY_CPUS = 4


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session, with a small fixed CPU count; a merge's worker
    actors are kept for the next merge that wants the same kind (pool.keeping), as a batch's
    stages keep them, so most tests do not wait for workers to import torch."""
    import ray

    from raymerge.pool import keeping

    ray.init(
        address="local",  # a private Ray, even when another cluster runs on this machine
        num_cpus=RAY_CPUS,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    with keeping():
        yield
    ray.shutdown()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """Three small Llama-layout models plus their base, several shards each."""
    out = tmp_path_factory.mktemp("models")
    options = SynthOptions(
        models=3,
        with_base=True,
        layers=3,
        hidden=64,
        intermediate=96,
        vocab=320,
        shard_size=60_000,
        seed=7,
    )
    return synthesize(str(out), options)


def write_config(path, body: dict) -> str:
    path = str(path)
    with open(path, "w") as f:
        yaml.safe_dump(body, f, sort_keys=False)
    return path


def ties_config(models: dict[str, str], **parameters) -> dict:
    return {
        "merge_method": "ties",
        "base_model": models["base"],
        "models": [
            {"model": models["model_1"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": models["model_2"], "parameters": {"weight": 0.7, "density": 0.3}},
            {"model": models["model_3"], "parameters": {"weight": 0.4, "density": 0.9}},
        ],
        "parameters": parameters,
        "dtype": "bfloat16",
    }
