"""Connecting to Ray: an existing cluster by address, or a private local one on loopback.

A local Ray started here listens on 127.0.0.1 only, reports no usage statistics, runs no
dashboard and writes no auth token: a merge on a laptop opens no port to the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from raymerge.errors import ConfigError, shown

LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # keeps a local Ray on 127.0.0.1 instead of every interface
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
# glibc gives each thread that allocates its own malloc arena; a worker's fetch, merge and
# write threads then keep freed buffers in three places (measured: +0.2 GiB per worker)
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}
CONNECT_TIMEOUT_S = 5.0  # for the probe of --address; Ray itself retries forever
# the client's HTTP/2 connection preface and an empty SETTINGS frame (gRPC speaks HTTP/2)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# Set by the `raymerge` console script, which leaves with os._exit once its output is
# written: a Ray it started then ends with the process, not with a ~1.3 s graceful shutdown.
exit_after = False
_ADDRESS = re.compile(r"^(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


# a local Ray's worker processes import these as they start, while the driver still plans
# and claims its output: an actor placed on such a worker is ready at once, instead of
# spending its first second importing torch
PRELOAD = ["torch", "raymerge.worker"]


class RayStart:
    """Start a local Ray (or connect to `address`) on a thread while the caller goes on.

    The thread stays parked until `release`: the processes of a local Ray are tied to the
    thread that started them (they die with it), not only to the process."""

    def __init__(self, address: str | None, num_cpus: int | None) -> None:
        self.error: BaseException | None = None
        self.started_here = False
        self._ready, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, num_cpus),
                                        name="raymerge-ray-start", daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, address: str | None, num_cpus: int | None) -> None:
        try:
            self.started_here = _init(address, num_cpus)
        except BaseException as exc:  # handed to the caller in wait()
            self.error = exc
        finally:
            self._ready.set()
        self._release.wait()

    def wait(self) -> None:
        """Block until Ray is up; raise what stopped it."""
        self._ready.wait()
        if self.error is not None:
            raise self.error

    def wait_quietly(self) -> None:
        """Block until the start has ended, however it ended."""
        self._ready.wait()

    def release(self) -> None:
        """Let the thread end (after ray.shutdown: a local Ray ends with the thread)."""
        self._release.set()


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None,
                wait: bool = True) -> Iterator[RayStart]:  # fmt: skip
    """Use the running Ray, connect to `address` (or RAY_ADDRESS, as `ray job submit` sets
    it), or start a local Ray (shut down after). It starts in the background: with `wait`
    the block runs once Ray is up, else the block calls `.wait()` when it needs Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address)
    # Ray reads some of these when it is imported, so they are set first.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if not address:
        os.environ.update(LOCAL_ENV)
        for key, value in WORKER_ENV.items():  # the local Ray's workers inherit these
            os.environ.setdefault(key, value)
    start = RayStart(address, num_cpus)
    try:
        if wait:
            start.wait()
        yield start
    finally:
        if not exit_after:  # the console script's process ends at once, and its Ray with it
            start.wait_quietly()
            if start.started_here:
                import ray

                ray.shutdown()
            start.release()


def end_local_ray(wait_s: float = 0.5) -> None:
    """Before a console script's process ends at once: ask the local Ray it started to stop
    (SIGTERM to its raylet, which stops its workers and agents itself, in milliseconds).
    Without it the raylet dies with the process and its two agents outlive it by a minute,
    trying to report to a GCS that is gone. Nothing for a Ray this process joined."""
    import sys

    ray = sys.modules.get("ray")
    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(node, "_global_node", None)
    if node is None or not getattr(node, "head", False):
        return
    try:
        raylets = [p.process for p in node.all_processes.get("raylet", [])]
    except AttributeError:  # another Ray version's internals: leave it to fate-sharing
        return
    for process in raylets:
        with contextlib.suppress(OSError):
            process.send_signal(signal.SIGTERM)
    for process in raylets:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)


def _init(address: str | None, num_cpus: int | None) -> bool:
    """ray.init as raymerge wants it; whether this call started or joined Ray."""
    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray._private.worker").addFilter(_not_main_thread_notice)
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
            # "local": a new private Ray even when another runs on this machine (without it,
            # ray.init() joins the newest local cluster it finds)
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1",
                     _system_config={"preload_python_modules": PRELOAD}, **kwargs)  # fmt: skip
    except (ConnectionError, ValueError) as exc:
        raise ConfigError(
            f"--address {address}: cannot connect to a Ray cluster there ({exc}); check the "
            "address (ray://HOST:10001 or HOST:6379) or leave --address out to run locally"
        ) from None
    return True


def _not_main_thread_notice(record: logging.LogRecord) -> bool:
    """Ray's note that a driver started off the main thread sets no SIGTERM handler: the
    default action (ending the process, and a local Ray with it) is what a merge wants."""
    return not record.getMessage().startswith("SIGTERM handler is not set")


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ConfigError unless a gRPC server (Ray's GCS or Ray Client) answers at `address`
    (HOST:PORT or ray://HOST:PORT; "auto" is left to Ray), so a wrong address fails within
    about `timeout_s` instead of Ray retrying forever."""
    if address == "auto":
        return
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(
            f"--address {shown(address)}: not a Ray address; give HOST:6379 (the head node's GCS "
            "port), ray://HOST:10001 (Ray Client) or auto, or leave --address out to run locally"
        )
    host, port = match.group(1).strip("[]"), int(match.group(2))
    fix = (
        "start one with `ray start --head` on that host, check the host and port, or leave "
        "--address out to run locally"
    )
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                reply = _http2_reply(conn)
                if len(reply) < 9 or reply[3] != 4:  # a SETTINGS frame starts every reply
                    raise ConfigError(
                        f"--address {address}: something listens there, but it is not a Ray "
                        f"cluster (no gRPC answer within {timeout_s:.0f} s); {fix}"
                    )
    except OSError as exc:
        problem = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there ({problem}); {fix}"
        ) from None


def _http2_reply(conn: socket.socket) -> bytes:
    """The first 9 bytes a server sends back after the HTTP/2 preface (b"" on timeout)."""
    conn.sendall(H2_PREFACE)
    reply = b""
    try:
        while len(reply) < 9:
            chunk = conn.recv(9 - len(reply))
            if not chunk:
                break
            reply += chunk
    except TimeoutError:
        pass
    return reply


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def check_single_node(out: str) -> None:
    """Refuse a local output folder on a cluster of several nodes: workers on other nodes
    would write shards where the driver never sees them."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise ConfigError(
            f"output {out} is a local path, but the Ray cluster has {len(nodes)} nodes and "
            "workers on the others cannot write there; give an s3://bucket/prefix output, or "
            "pass --allow-local-destination if the path is on a filesystem every node shares"
        )
