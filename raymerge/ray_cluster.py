"""Connecting to Ray: an existing cluster by address, or a private local one on loopback.

A local Ray started here listens on 127.0.0.1 only, reports no usage statistics, runs no
dashboard and writes no auth token: a merge on a laptop opens no port to the network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from raymerge.errors import ConfigError

LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # keeps a local Ray on 127.0.0.1 instead of every interface
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray, connect to `address`, or start a local Ray (shut down after)."""
    # Ray reads some of these when it is imported, so they are set first.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if not address:
        os.environ.update(LOCAL_ENV)
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs = dict(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    except ConnectionError as exc:
        raise ConfigError(
            f"--address {address}: cannot connect to a Ray cluster there ({exc}); check the "
            "address (ray://HOST:10001 or HOST:6379) or leave --address out to run locally"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
