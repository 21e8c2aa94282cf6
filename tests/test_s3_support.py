"""The S3 test infrastructure itself: moto server, cutting proxy, auth and policy rejections."""

# ruff: noqa: F811  (test arguments named like the fixtures imported below)
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
from botocore.exceptions import ClientError, ResponseStreamingError

# The fixtures are imported to register them for this module; harmless if a conftest imports
# them too (the servers are shared either way).
from tests.s3_support import (  # noqa: F401
    Credentials,
    CuttingProxy,
    MotoServer,
    MotoServerError,
    cutting_proxy,
    error_code,
    s3_auth_server,
    s3_bucket,
    s3_client,
    s3_server,
    set_test_credentials,
)

MiB = 1 << 20


def _payload(n: int, seed: int = 0) -> bytes:
    # Incompressible and cheap: random bytes from a fixed seed.
    import random

    return random.Random(seed).randbytes(n)


def _proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("CuttingProxy")]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -------------------------------------------------------------------------------------------
# server + fixtures
# -------------------------------------------------------------------------------------------


def test_put_get_through_server(s3_bucket):
    c = s3_bucket.client
    c.put_object(Bucket=s3_bucket.bucket, Key="a/b.txt", Body=b"hello")
    assert c.get_object(Bucket=s3_bucket.bucket, Key="a/b.txt")["Body"].read() == b"hello"
    assert s3_bucket.uri("a/") == f"s3://{s3_bucket.bucket}/a/"
    assert s3_bucket.endpoint.startswith("http://127.0.0.1:")


def test_bucket_fixture_resets_server(s3_bucket, s3_server):
    # The previous test's bucket is gone: each test starts from an empty server.
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert names == [s3_bucket.bucket]


def test_set_test_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "real-looking")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_PROFILE", "prod")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    set_test_credentials()
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "AWS_PROFILE" not in os.environ
    assert "AWS_SESSION_TOKEN" not in os.environ


def test_server_start_failure_is_reported_with_its_output():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(MotoServerError) as info:
            MotoServer(port=port)
        assert time.monotonic() - t0 < 15
    assert "exited" in str(info.value)
    assert "in use" in str(info.value)  # the server's own stderr, tail included


# -------------------------------------------------------------------------------------------
# proxy without cutting
# -------------------------------------------------------------------------------------------


def test_proxy_forwards_multi_mib_put_get_byte_exactly(s3_bucket, cutting_proxy):
    proxy = cutting_proxy()
    c = s3_client(proxy.endpoint, max_attempts=1)
    data = _payload(6 * MiB, seed=1)
    c.put_object(Bucket=s3_bucket.bucket, Key="big", Body=data)
    assert c.get_object(Bucket=s3_bucket.bucket, Key="big")["Body"].read() == data
    got = c.get_object(Bucket=s3_bucket.bucket, Key="big", Range="bytes=100-2097251")
    assert got["Body"].read() == data[100:2097252]
    # Straight from the server too: what went through the proxy is what was stored.
    direct = s3_bucket.client.get_object(Bucket=s3_bucket.bucket, Key="big")["Body"].read()
    assert hashlib.sha256(direct).digest() == hashlib.sha256(data).digest()
    assert proxy.cuts == 0
    assert proxy.connections >= 3


def test_proxy_raw_tcp_both_directions_and_half_close():
    """Bytes pass unmodified both ways, and a half-close (FIN) is forwarded."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def echo_server():
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)
            conn.sendall(hashlib.sha256(received).digest() + bytes(received[::-1]))

    server = threading.Thread(target=echo_server, daemon=True)
    server.start()
    data = _payload(3 * MiB + 7, seed=2)
    with CuttingProxy(listener.getsockname()) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            back = bytearray()
            while chunk := s.recv(65536):
                back.extend(chunk)
        server.join(10)
    listener.close()
    assert bytes(received) == data
    assert bytes(back) == hashlib.sha256(data).digest() + data[::-1]
    assert proxy.cuts == 0 and proxy.connections == 1


# -------------------------------------------------------------------------------------------
# proxy cutting
# -------------------------------------------------------------------------------------------


def test_botocore_retries_through_cuts_put_and_ranged_get(s3_bucket, cutting_proxy):
    data = _payload(8 * MiB, seed=3)
    # Every connection is cut after 1 MiB (mid-upload), three times; then it goes through.
    proxy = cutting_proxy(cut_every=1, after_bytes=MiB, max_cuts=3)
    c = s3_client(proxy.endpoint, max_attempts=10)
    c.put_object(Bucket=s3_bucket.bucket, Key="big", Body=data)
    assert proxy.cuts == 3
    stored = s3_bucket.client.get_object(Bucket=s3_bucket.bucket, Key="big")["Body"].read()
    assert stored == data

    # A ranged GET cut while the request is sent (before any response byte): botocore retries.
    proxy.configure(cut_every=1, after_bytes=300, max_cuts=5)
    got = c.get_object(Bucket=s3_bucket.bucket, Key="big", Range=f"bytes={MiB}-{3 * MiB - 1}")
    assert got["Body"].read() == data[MiB : 3 * MiB]
    assert proxy.cuts == 5


def test_cut_mid_response_body_surfaces_as_streaming_error(s3_bucket, cutting_proxy):
    """botocore does NOT retry a cut in the middle of a response body: the reader must."""
    data = _payload(4 * MiB, seed=4)
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key="big", Body=data)
    proxy = cutting_proxy(cut_every=1, after_bytes=MiB, max_cuts=1)
    c = s3_client(proxy.endpoint, max_attempts=10)
    body = c.get_object(Bucket=s3_bucket.bucket, Key="big")["Body"]
    with pytest.raises(ResponseStreamingError):
        body.read()
    assert proxy.cuts == 1
    # Next connection is left alone (max_cuts reached).
    assert c.get_object(Bucket=s3_bucket.bucket, Key="big")["Body"].read() == data


def test_cut_every_nth_connection(s3_bucket, cutting_proxy):
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key="k", Body=b"x")
    proxy = cutting_proxy(cut_every=3, after_bytes=0, max_cuts=2)
    c = s3_client(proxy.endpoint, max_attempts=10)
    for _ in range(5):
        assert c.head_object(Bucket=s3_bucket.bucket, Key="k")["ContentLength"] == 1
    # moto answers "Connection: close": one connection per attempt. Connections 3 and 6 were
    # cut (each retried on a new connection), so 5 requests took 7 connections.
    assert proxy.cuts == 2
    assert proxy.connections == 7


def test_proxy_close_leaks_no_threads_or_sockets(s3_bucket):
    threads0, fds0 = _proxy_threads(), _open_fds()
    proxy = CuttingProxy(s3_bucket.endpoint, cut_every=2, after_bytes=200)
    c = s3_client(proxy.endpoint, max_attempts=10)
    for i in range(4):
        c.put_object(Bucket=s3_bucket.bucket, Key=f"k{i}", Body=b"y" * 5000)
    c.close()
    assert proxy.cuts >= 1
    # A connection still open (idle, mid-request) when the proxy closes.
    idle_thread = f"CuttingProxy-{proxy.port}-conn-{proxy.connections + 1}"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as idle:
        idle.sendall(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\npartial")
        deadline = time.monotonic() + 5
        while idle_thread not in _proxy_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert idle_thread in _proxy_threads()
        proxy.close()
        assert _proxy_threads() == threads0
        with pytest.raises(OSError):  # the proxy reset it
            idle.sendall(b"more")
            idle.recv(1)
            idle.sendall(b"more")
    assert _open_fds() <= fds0
    proxy.close()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


# -------------------------------------------------------------------------------------------
# rejections: auth and bucket policies
# -------------------------------------------------------------------------------------------


def _code(fn) -> str:
    with pytest.raises(ClientError) as info:
        fn()
    return error_code(info.value)


def test_auth_server_rejects_wrong_credentials(s3_auth_server):
    srv = s3_auth_server
    b = srv.new_bucket()  # with the admin key
    b.client.put_object(Bucket=b.bucket, Key="k", Body=b"data")
    admin = srv.admin_credentials
    assert admin.access_key_id.startswith("AKIA")

    env_like = srv.client(Credentials("testing", "testing"), max_attempts=1)
    assert _code(lambda: env_like.get_object(Bucket=b.bucket, Key="k")) == "InvalidAccessKeyId"
    assert _code(lambda: env_like.list_objects_v2(Bucket=b.bucket)) == "InvalidAccessKeyId"
    assert _code(lambda: env_like.head_object(Bucket=b.bucket, Key="k")) == "403"

    wrong_secret = srv.client(Credentials(admin.access_key_id, "wrong"), max_attempts=1)
    code = _code(lambda: wrong_secret.put_object(Bucket=b.bucket, Key="k2", Body=b"x"))
    assert code == "SignatureDoesNotMatch"

    nobody = srv.client(srv.create_user(allow=()), max_attempts=1)
    assert _code(lambda: nobody.get_object(Bucket=b.bucket, Key="k")) == "AccessDenied"

    reader = srv.client(srv.create_user(allow=("s3:GetObject", "s3:ListBucket")), max_attempts=1)
    assert reader.get_object(Bucket=b.bucket, Key="k")["Body"].read() == b"data"
    assert _code(lambda: reader.put_object(Bucket=b.bucket, Key="k3", Body=b"x")) == (
        "AccessDenied"
    )
    assert _code(lambda: reader.create_multipart_upload(Bucket=b.bucket, Key="m")) == (
        "AccessDenied"
    )


def test_bucket_policy_rejects_upload_parts(s3_bucket):
    c, bucket = s3_bucket.client, s3_bucket.bucket
    part = _payload(5 * MiB, seed=5)

    def part_code(key, upload_id, number, body):
        return _code(
            lambda: c.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
        )

    # Denied before the upload: it starts (POST), but every part is refused with a bare 403.
    s3_bucket.deny("s3:PutObject", key_pattern="out/*")
    uid = c.create_multipart_upload(Bucket=bucket, Key="out/a")["UploadId"]
    assert part_code("out/a", uid, 1, part) == "403"
    assert _code(lambda: c.put_object(Bucket=bucket, Key="out/b", Body=b"x")) == "403"
    c.put_object(Bucket=bucket, Key="elsewhere/b", Body=b"x")  # outside the pattern: fine
    c.abort_multipart_upload(Bucket=bucket, Key="out/a", UploadId=uid)

    # Denied in the middle of an upload: later parts fail, earlier ones remain usable.
    s3_bucket.clear_policy()
    uid = c.create_multipart_upload(Bucket=bucket, Key="out/c")["UploadId"]
    first = c.upload_part(Bucket=bucket, Key="out/c", UploadId=uid, PartNumber=1, Body=part)
    s3_bucket.deny("s3:PutObject", key_pattern="out/*")
    assert part_code("out/c", uid, 2, b"z") == "403"
    s3_bucket.clear_policy()
    c.complete_multipart_upload(
        Bucket=bucket,
        Key="out/c",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": first["ETag"]}]},
    )
    assert c.head_object(Bucket=bucket, Key="out/c")["ContentLength"] == len(part)
