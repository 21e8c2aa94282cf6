"""Real (not mocked) S3 test infrastructure: a moto server subprocess and a flaky-network proxy.

Everything listens on 127.0.0.1 only.

* :class:`MotoServer` runs ``moto_server -H 127.0.0.1 -p PORT`` as a child process. Ray workers
  reach it like any S3 endpoint (the in-process ``mock_aws`` would not reach them).
* :class:`CuttingProxy` is a TCP proxy in front of it that resets connections mid-transfer.
* Fixtures: ``s3_server`` (session), ``s3_bucket`` (function), ``s3_auth_server`` (session, with
  IAM authentication on) and ``cutting_proxy`` (factory, function scope).
* :func:`set_test_credentials` puts the fixed test credentials into ``os.environ``.

Error codes a boto3 ``ClientError`` carries (``error_code(e)``), measured with moto 5.2.5 and
botocore 1.44; all are HTTP 403 and botocore (standard mode) does not retry any of them:

* auth on, unknown access key id (e.g. the env's testing/testing): ``InvalidAccessKeyId``
* auth on, known key id, wrong secret: ``SignatureDoesNotMatch``
* auth on, valid key whose IAM policy lacks the action (:meth:`MotoServer.create_user`):
  ``AccessDenied``
* any of those three on a HEAD (``head_object``, ``head_bucket``): ``"403"`` (no body to parse,
  message ``"Forbidden"``)
* a bucket-policy Deny (:func:`deny_bucket_actions`, auth on or off) on an object request:
  ``"403"`` / ``"Forbidden"`` (moto answers with an empty body)
* IAM calls with an unknown key (auth on): ``InvalidClientTokenId``

A connection reset before the response headers is retried by botocore; a reset in the middle
of a response body is not: ``StreamingBody.read()`` raises
``botocore.exceptions.ResponseStreamingError``.

moto quirks met here: ``POST /moto-api/reset`` wipes IAM users but not the auth switch (nor the
``INITIAL_NO_AUTH_ACTION_COUNT`` request counter); ``POST /moto-api/reset-auth`` needs a
non-form Content-Type or it fails with HTTP 500; the server answers ``Connection: close``
(one TCP connection per request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import namedtuple
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

TEST_ACCESS_KEY_ID = "testing"
TEST_SECRET_ACCESS_KEY = "testing"
TEST_REGION = "us-east-1"

Credentials = namedtuple("Credentials", "access_key_id secret_access_key")
TEST_CREDENTIALS = Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)


def set_test_credentials() -> None:
    """Set the fixed test credentials in ``os.environ`` (always overriding); drop profile/token.

    Sets exactly ``AWS_ACCESS_KEY_ID=testing``, ``AWS_SECRET_ACCESS_KEY=testing`` and
    ``AWS_DEFAULT_REGION=us-east-1``, and removes ``AWS_PROFILE`` and ``AWS_SESSION_TOKEN``.
    Call it before Ray starts so that workers inherit the same environment. Prints nothing.
    """
    os.environ["AWS_ACCESS_KEY_ID"] = TEST_ACCESS_KEY_ID
    os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_SECRET_ACCESS_KEY
    os.environ["AWS_DEFAULT_REGION"] = TEST_REGION
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def s3_client(
    endpoint: str,
    credentials: Credentials | tuple[str, str] | None = None,
    *,
    service: str = "s3",
    max_attempts: int | None = None,
    retry_mode: str = "standard",
    **config_kwargs: Any,
):
    """A boto3 client for ``endpoint`` (region us-east-1), independent of the AWS_* environment.

    ``credentials`` default to testing/testing. ``max_attempts`` sets botocore's retry budget
    (``retries={"mode": retry_mode, "max_attempts": ...}``); other keyword arguments go to
    ``botocore.config.Config`` (defaults here: ``connect_timeout=5``, ``read_timeout=30``, and
    ``proxies={}`` so that HTTP(S)_PROXY variables never divert loopback traffic).
    """
    import boto3
    from botocore.config import Config

    creds = Credentials(*(credentials or TEST_CREDENTIALS))
    config_kwargs.setdefault("connect_timeout", 5)
    config_kwargs.setdefault("read_timeout", 30)
    config_kwargs.setdefault("proxies", {})
    if max_attempts is not None:
        config_kwargs["retries"] = {"mode": retry_mode, "max_attempts": max_attempts}
    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint,
        region_name=TEST_REGION,
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key,
        config=Config(**config_kwargs),
    )


def error_code(exc: BaseException) -> str | None:
    """The S3/IAM error code of a botocore ``ClientError`` (``"403"`` for a body-less 403)."""
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code")


# --------------------------------------------------------------------------------------------
# Bucket policies: a real server-side way to reject requests (auth on or off)
# --------------------------------------------------------------------------------------------


def deny_bucket_actions(
    client,
    bucket: str,
    actions: Iterable[str] | str = ("s3:PutObject",),
    key_pattern: str = "*",
) -> None:
    """Attach a bucket policy that denies ``actions`` on ``arn:aws:s3:::{bucket}/{key_pattern}``.

    moto enforces bucket-policy Deny statements on object requests even with auth off, before
    anything else, answering HTTP 403 with an EMPTY body (boto3: code ``"403"``, message
    ``"Forbidden"``; not retried). moto names the checked action after the HTTP method:

    * ``s3:PutObject``: PutObject, **UploadPart**, UploadPartCopy, CopyObject (target).
      CreateMultipartUpload and CompleteMultipartUpload are POSTs (``s3:PostObject``) and are
      NOT blocked by it, so denying ``s3:PutObject`` gives "the upload starts, its parts are
      rejected". Attaching the policy between two ``upload_part`` calls rejects the later parts
      of an upload already in progress (the earlier parts stay and can still be completed).
    * ``s3:GetObject``: GetObject (ranged too). HEAD is checked as ``s3:HeadObject`` (not a real
      IAM action), so a GetObject deny does not block ``head_object``.
    * ``s3:DeleteObject``: DeleteObject and AbortMultipartUpload (DELETE); DeleteObjects
      reports it per key as ``AccessDenied``.
    * ``s3:PostObject``: CreateMultipartUpload / CompleteMultipartUpload.

    Bucket-level requests (ListObjectsV2, HeadBucket, Get/Put/DeleteBucketPolicy) are not
    checked against the bucket policy, so :func:`clear_bucket_policy` always works.
    ``key_pattern`` uses IAM wildcards (``*``), e.g. ``"out/*"``.
    """
    if isinstance(actions, str):
        actions = [actions]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "RaymergeTestDeny",
                "Effect": "Deny",
                "Principal": "*",
                "Action": list(actions),
                "Resource": f"arn:aws:s3:::{bucket}/{key_pattern}",
            }
        ],
    }
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def clear_bucket_policy(client, bucket: str) -> None:
    """Remove the bucket policy (undoes :func:`deny_bucket_actions`)."""
    client.delete_bucket_policy(Bucket=bucket)


@dataclasses.dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on a test server (what the ``s3_bucket`` fixture yields)."""

    endpoint: str
    bucket: str
    client: Any
    server: MotoServer | None = None

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def deny(self, actions: Iterable[str] | str = ("s3:PutObject",), key_pattern: str = "*"):
        """See :func:`deny_bucket_actions`."""
        deny_bucket_actions(self.client, self.bucket, actions, key_pattern)

    def clear_policy(self) -> None:
        clear_bucket_policy(self.client, self.bucket)


# --------------------------------------------------------------------------------------------
# moto server subprocess
# --------------------------------------------------------------------------------------------

# Runs in a fresh interpreter (no threads): ask Linux to SIGTERM the server when the process
# that started it dies, so a killed pytest leaves no moto server behind; then exec the server.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(3)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _moto_command() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if os.path.isfile(exe) and os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "moto.server"]


class MotoServerError(RuntimeError):
    pass


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` as a child process, on a free port.

    ``env`` adds variables to the server's environment (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT``).

    ``auth=True`` turns on moto's IAM authentication for every request (via the server's
    ``POST /moto-api/reset-auth`` with ``0``) after creating an admin IAM user (inline policy
    ``Allow * on *``) whose key is :attr:`admin_credentials`; :meth:`client` then signs with it.
    With auth on, any other key is rejected: see the module docstring for the codes
    (``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``AccessDenied``, ``"403"`` for HEAD).
    moto's keys are random (``AKIA...``): the env's testing/testing is never valid there.

    :meth:`reset` wipes IAM too; on an auth server it re-creates the admin user, so
    :attr:`admin_credentials` CHANGE and earlier clients/users become invalid.

    On Linux the server gets PR_SET_PDEATHSIG (SIGTERM) for the *thread* that created it: create
    it from the main thread (as the fixtures do), or pass ``die_with_parent=False``.
    """

    def __init__(
        self,
        *,
        auth: bool = False,
        env: dict[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 20.0,
        die_with_parent: bool = True,
    ) -> None:
        self.host = "127.0.0.1"
        self.auth = auth
        self.admin_credentials: Credentials | None = None
        self._auth_enabled = False
        self._proc: subprocess.Popen | None = None
        self._log_path: str | None = None
        attempts = 1 if port else 3
        for attempt in range(attempts):
            self.port = port or free_port()
            try:
                self._start(env or {}, startup_timeout, die_with_parent)
                break
            except MotoServerError as e:
                in_use = "Address already in use" in str(e)
                self._cleanup()
                if not in_use or attempt == attempts - 1:
                    raise
        if auth:
            try:
                self.enable_auth()
            except BaseException:
                self.stop()
                raise

    # -- process -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _start(self, env: dict[str, str], timeout: float, die_with_parent: bool) -> None:
        fd, self._log_path = tempfile.mkstemp(prefix="moto-server-", suffix=".log")
        server_cmd = _moto_command() + ["-H", self.host, "-p", str(self.port)]
        if die_with_parent and sys.platform.startswith("linux"):
            # The launcher execs argv[2] with argv[2:]: the server keeps the launcher's pid.
            argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid())] + server_cmd
        else:
            argv = server_cmd
        child_env = dict(os.environ)
        child_env.update({k: str(v) for k, v in env.items()})
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                env=child_env,
                close_fds=True,
            )
        finally:
            os.close(fd)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise MotoServerError(
                    f"moto_server on port {self.port} exited with {rc} before answering.\n"
                    f"--- its output (tail) ---\n{self.log_tail()}"
                )
            try:
                status, _ = self._request("GET", "/moto-api/", timeout=0.5)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                raise MotoServerError(
                    f"moto_server on port {self.port} did not answer within {timeout:.0f} s.\n"
                    f"--- its output (tail) ---\n{tail}"
                )
            time.sleep(0.05)

    def log_tail(self, nbytes: int = 4000) -> str:
        """The last ``nbytes`` of the server's combined stdout/stderr."""
        if not self._log_path:
            return ""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - nbytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 10.0
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "text/plain"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _post(self, path: str, body: bytes = b"") -> bytes:
        status, data = self._request("POST", path, body)
        if status != 200:
            raise MotoServerError(f"POST {path} -> HTTP {status}: {data[:500]!r}")
        return data

    def stop(self) -> None:
        """Terminate (then kill) this server's own process and wait for it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._proc = None
        if self._log_path:
            with contextlib.suppress(OSError):
                os.unlink(self._log_path)
            self._log_path = None

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """``POST /moto-api/reset``: drop all buckets, objects, uploads, IAM users, policies.

        On an ``auth=True`` server, auth is switched off for the reset and a new admin user is
        created, then auth is switched on again (new :attr:`admin_credentials`).
        """
        if self._auth_enabled:
            self.disable_auth()
        self._post("/moto-api/reset")
        self.admin_credentials = None
        if self.auth:
            self.enable_auth()

    def client(self, credentials: Credentials | tuple[str, str] | None = None, **kwargs: Any):
        """A boto3 client on this server (see :func:`s3_client`; ``service=`` for e.g. iam).

        Signs with ``credentials`` if given, else the admin key on an auth server, else
        testing/testing.
        """
        return s3_client(self.endpoint, credentials or self.admin_credentials, **kwargs)

    def new_bucket(self, name: str | None = None) -> S3Bucket:
        """Create a bucket (fresh random name unless given) and describe it."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        client = self.client()
        client.create_bucket(Bucket=name)
        return S3Bucket(endpoint=self.endpoint, bucket=name, client=client, server=self)

    # -- authentication ------------------------------------------------------------------

    def disable_auth(self) -> None:
        """Accept any credentials again (``POST /moto-api/reset-auth`` with ``inf``)."""
        self._post("/moto-api/reset-auth", b"inf")
        self._auth_enabled = False

    def enable_auth(self) -> Credentials:
        """Create the admin IAM user (if needed), then authenticate every request.

        Returns (and stores in :attr:`admin_credentials`) the admin key pair.
        """
        if self.admin_credentials is None:
            if self._auth_enabled:
                self.disable_auth()
            self.admin_credentials = self._make_user(
                "raymerge-test-admin", allow=("*",), deny=(), signer=TEST_CREDENTIALS
            )
        # moto counts requests and authenticates once the count reaches this number; 0: now.
        self._post("/moto-api/reset-auth", b"0")
        self._auth_enabled = True
        return self.admin_credentials

    def create_user(
        self,
        name: str | None = None,
        *,
        allow: Iterable[str] = ("s3:*",),
        deny: Iterable[str] = (),
    ) -> Credentials:
        """Create an IAM user with an inline policy and return its new access key.

        ``allow``/``deny`` are IAM actions on ``Resource: "*"``; ``allow=()`` gives a user whose
        every S3 request fails with ``AccessDenied`` (HEAD: ``"403"``) once auth is on.
        E.g. ``allow=("s3:GetObject", "s3:ListBucket")`` makes a read-only user whose
        PutObject / UploadPart / CreateMultipartUpload fail with ``AccessDenied``. Note moto
        checks multipart calls as ``s3:PutObject`` here (IAM side), whatever the real IAM name.
        """
        name = name or f"user-{uuid.uuid4().hex[:12]}"
        signer = self.admin_credentials if self._auth_enabled else TEST_CREDENTIALS
        return self._make_user(name, allow=allow, deny=deny, signer=signer)

    def _make_user(
        self, name: str, *, allow: Iterable[str], deny: Iterable[str], signer: Credentials
    ) -> Credentials:
        iam = s3_client(self.endpoint, signer, service="iam")
        iam.create_user(UserName=name)
        statements = []
        if list(allow):
            statements.append({"Effect": "Allow", "Action": list(allow), "Resource": "*"})
        if list(deny):
            statements.append({"Effect": "Deny", "Action": list(deny), "Resource": "*"})
        if statements:
            iam.put_user_policy(
                UserName=name,
                PolicyName="test-policy",
                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
            )
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])


# --------------------------------------------------------------------------------------------
# flaky network
# --------------------------------------------------------------------------------------------


def _parse_target(target: Any) -> tuple[str, int]:
    if isinstance(target, MotoServer):
        return target.host, target.port
    if isinstance(target, str):
        hostport = target.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        return host, int(port)
    host, port = target
    return host, int(port)


def _rst_close(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST and drop unsent data."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Conn:
    __slots__ = ("index", "client", "server", "lock", "closed", "thread")

    def __init__(self, index: int, client: socket.socket) -> None:
        self.index = index
        self.client = client
        self.server: socket.socket | None = None
        self.lock = threading.Lock()
        self.closed = False
        self.thread: threading.Thread | None = None

    def close(self, abrupt: bool) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for sock in (self.client, self.server):
                if sock is None:
                    continue
                if abrupt:
                    _rst_close(sock)
                else:
                    with contextlib.suppress(OSError):
                        sock.close()

    def wake(self) -> None:
        """From another thread: make the pump's poll return (it closes the sockets itself)."""
        with self.lock:
            if self.closed:
                return
            for sock in (self.client, self.server):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


class CuttingProxy:
    """Threaded TCP proxy ``127.0.0.1:free port -> target`` that resets connections mid-transfer.

    ``target``: a :class:`MotoServer`, an ``"http://host:port"`` endpoint or a ``(host, port)``.

    Every ``cut_every``-th accepted connection (1-based: with ``cut_every=3``, connections 3, 6,
    9, ...; ``1``: every connection; ``None``: never) is cut once it has forwarded
    ``after_bytes`` bytes in total, counting both directions (request bytes sent to the server
    plus response bytes sent to the client; ``0`` cuts right after accepting). Cutting resets
    both sockets (SO_LINGER 0, so the peers see ECONNRESET, unsent data is dropped). After
    ``max_cuts`` cuts, connections are left alone. A connection that ends before reaching
    ``after_bytes`` is not cut and not counted. Otherwise bytes pass unmodified, half-closes
    are forwarded, and a reset from one peer is passed on as a reset to the other.

    Note: moto's server (werkzeug) answers ``Connection: close``, so there is one TCP
    connection per HTTP request (and per botocore retry attempt).

    :meth:`configure` replaces all three settings (``cut_every``/``after_bytes`` apply to
    connections accepted afterwards, ``max_cuts`` at once, counted against the cuts so far,
    which are never reset). :attr:`cuts`
    and :attr:`connections` are thread-safe counters. :meth:`close` stops accepting, resets
    open connections and joins every thread it started.
    """

    CHUNK = 256 * 1024
    _POLL_MS = 100

    def __init__(
        self,
        target: Any,
        *,
        cut_every: int | None = None,
        after_bytes: int = 0,
        max_cuts: int | None = None,
    ) -> None:
        self.target = _parse_target(target)
        self.host = "127.0.0.1"
        self._lock = threading.Lock()
        self._cuts = 0
        self._connections = 0
        self._stop = threading.Event()
        self._conns: dict[int, _Conn] = {}
        self.configure(cut_every=cut_every, after_bytes=after_bytes, max_cuts=max_cuts)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"CuttingProxy-{self.port}-accept", daemon=True
        )
        self._accept_thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def cuts(self) -> int:
        with self._lock:
            return self._cuts

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def configure(
        self,
        *,
        cut_every: int | None = None,
        after_bytes: int = 0,
        max_cuts: int | None = None,
    ) -> None:
        if cut_every is not None and cut_every < 1:
            raise ValueError("cut_every must be >= 1 or None")
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        with self._lock:
            self.cut_every = cut_every
            self.after_bytes = after_bytes
            self.max_cuts = max_cuts

    def _take_cut(self) -> bool:
        with self._lock:
            if self.max_cuts is not None and self._cuts >= self.max_cuts:
                return False
            self._cuts += 1
            return True

    # -- threads -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(self._POLL_MS):
                    continue
                client, _ = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.01)
                continue
            with self._lock:
                if self._stop.is_set():
                    _rst_close(client)
                    return
                self._connections += 1
                index = self._connections
                every, after = self.cut_every, self.after_bytes
                conn = _Conn(index, client)
                self._conns[index] = conn
            candidate = every is not None and index % every == 0
            conn.thread = threading.Thread(
                target=self._serve,
                args=(conn, candidate, after),
                name=f"CuttingProxy-{self.port}-conn-{index}",
                daemon=True,
            )
            conn.thread.start()

    def _serve(self, conn: _Conn, candidate: bool, after: int) -> None:
        abrupt = True
        try:
            if candidate and after == 0 and self._take_cut():
                return
            server = socket.create_connection(self.target, timeout=5)
            with conn.lock:
                if conn.closed:
                    _rst_close(server)
                    return
                conn.server = server
            abrupt = self._pump(conn, candidate, after)
        except OSError:
            abrupt = True
        finally:
            conn.close(abrupt)
            with self._lock:
                self._conns.pop(conn.index, None)

    def _pump(self, conn: _Conn, candidate: bool, after: int) -> bool:
        """Forward until both sides are done. Returns True to close abruptly (RST)."""
        c, s = conn.client, conn.server
        c.setblocking(False)
        s.setblocking(False)
        other = {c: s, s: c}
        pending = {c: bytearray(), s: bytearray()}  # bytes waiting to be written to the key
        reading = {c: True, s: True}
        write_shut = {c: False, s: False}
        by_fd = {c.fileno(): c, s.fileno(): s}
        forwarded = 0
        progress = True
        poller = select.poll()
        for sock in (c, s):
            poller.register(sock, 0)
        while True:
            if self._stop.is_set():
                return True
            for sock in (c, s):
                # Propagate a half-close once everything before it was delivered.
                peer = other[sock]
                if not reading[peer] and not pending[sock] and not write_shut[sock]:
                    write_shut[sock] = True
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
            if all(write_shut.values()):
                return False
            for sock in (c, s):
                mask = 0
                if reading[sock] and len(pending[other[sock]]) < self.CHUNK:
                    mask |= select.POLLIN
                if pending[sock]:
                    mask |= select.POLLOUT
                poller.modify(sock, mask)
            events = poller.poll(self._POLL_MS)
            if events and not progress:
                time.sleep(0.002)  # only HUP/no-op events last round: don't spin
            progress = False
            for fd, ev in events:
                sock = by_fd[fd]
                peer = other[sock]
                if ev & select.POLLERR:
                    return True
                if ev & (select.POLLIN | select.POLLHUP) and reading[sock]:
                    try:
                        data = sock.recv(self.CHUNK)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        return True  # reset by a peer: pass it on as a reset
                    if data == b"":
                        reading[sock] = False
                        progress = True
                    elif data:
                        pending[peer] += data
                        progress = True
                if ev & select.POLLOUT and pending[sock]:
                    limit = max(1, after - forwarded) if candidate else len(pending[sock])
                    try:
                        sent = sock.send(pending[sock][:limit])
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        return True  # EPIPE / ECONNRESET: pass it on as a reset
                    if sent:
                        progress = True
                    del pending[sock][:sent]
                    forwarded += sent
                    if candidate and forwarded >= after:
                        if self._take_cut():
                            return True
                        candidate = False
                elif ev & select.POLLHUP and pending[sock]:
                    return True  # the peer is gone with data still owed to it

    # -- shutdown ------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, reset open connections, join all threads. Idempotent."""
        self._stop.set()
        if self._accept_thread.is_alive() and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            conn.wake()
        deadline = time.monotonic() + timeout
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - time.monotonic()))
        alive = [c.thread.name for c in conns if c.thread is not None and c.thread.is_alive()]
        if self._accept_thread.is_alive():
            alive.append(self._accept_thread.name)
        if alive:
            raise RuntimeError(f"CuttingProxy threads did not stop: {alive}")

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# pytest fixtures (import them into a conftest, or into a test module)
# --------------------------------------------------------------------------------------------

# One server of each kind per process, even if a fixture is registered twice (a conftest and a
# test module both importing it): the second registration shares the first one's server.
_shared_lock = threading.Lock()
_shared: dict[str, list[Any]] = {}  # kind -> [server, users]


@contextlib.contextmanager
def _shared_server(kind: str, **kwargs: Any) -> Iterator[MotoServer]:
    with _shared_lock:
        entry = _shared.get(kind)
        if entry is None:
            entry = _shared[kind] = [MotoServer(**kwargs), 0]
        entry[1] += 1
        server = entry[0]
    try:
        yield server
    finally:
        with _shared_lock:
            entry[1] -= 1
            if entry[1] == 0:
                del _shared[kind]
                server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """One moto server (auth off) for the whole session, stopped at the end."""
    with _shared_server("plain") as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> S3Bucket:
    """Reset the session server and create a bucket with a fresh name."""
    s3_server.reset()
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[MotoServer]:
    """A second moto server with IAM auth on (``MotoServer(auth=True)``), for the session.

    Not reset between tests: call ``s3_auth_server.reset()`` (new admin key) if a test needs a
    clean one, and use fresh bucket names (``new_bucket()``).
    """
    with _shared_server("auth", auth=True) as server:
        yield server


@pytest.fixture
def cutting_proxy(s3_server: MotoServer):
    """Factory: ``cutting_proxy(cut_every=..., after_bytes=..., max_cuts=..., target=...)``.

    Proxies to the session server unless ``target`` is given; all are closed after the test.
    """
    proxies: list[CuttingProxy] = []

    def make(*, target: Any = None, **kwargs: Any) -> CuttingProxy:
        proxy = CuttingProxy(target if target is not None else s3_server, **kwargs)
        proxies.append(proxy)
        return proxy

    yield make
    errors = []
    for proxy in proxies:
        try:
            proxy.close()
        except RuntimeError as e:
            errors.append(e)
    if errors:
        raise errors[0]
