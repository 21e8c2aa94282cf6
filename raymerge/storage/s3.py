"""S3-compatible object storage (AWS S3, MinIO, Ceph, R2) through boto3.

Sources read with ranged GETs: a header or an index file in one request, tensor bytes in
`READ_CHUNK` pieces on a thread pool. A destination writes each shard as one multipart
upload: workers upload the plan's parts directly (part N is bytes [start, end) of the shard,
numbered as the plan numbers them) and the driver completes the upload once every part is in.
Small files are single PUTs, so they appear whole or not at all.

Credentials come from boto3's own chain on each process (never passed, printed or stored);
the endpoint (`--s3-endpoint`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`) and the retry
mode are resolved on the driver and travel to the workers in `S3Settings`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from raymerge.errors import CheckpointError, ConfigError, MergeFailed, RaymergeError, shown
from raymerge.storage.ranged import READ_THREADS, RangedReads

BODY_ATTEMPTS = 5  # a body cut mid-stream is fetched again this often (botocore retries
# failed requests, not bodies that break after the response started)
LIST_PAGE = 1000


@dataclass(frozen=True)
class S3Settings:
    """How to reach the store; resolved once on the driver, the same on every worker."""

    endpoint: str | None = None
    retry_mode: str = "standard"  # botocore's: legacy, standard or adaptive
    max_attempts: int = 10

    @classmethod
    def resolve(cls, endpoint: str | None = None, retry_mode: str | None = None) -> S3Settings:
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        mode = retry_mode or os.environ.get("AWS_RETRY_MODE") or "standard"
        if mode not in ("legacy", "standard", "adaptive"):
            raise ConfigError(f"S3 retry mode {shown(mode)}: use standard or adaptive")
        attempts = os.environ.get("AWS_MAX_ATTEMPTS", "10")
        if not attempts.isdigit() or int(attempts) < 1:
            raise ConfigError(f"AWS_MAX_ATTEMPTS={shown(attempts)}: must be a positive integer")
        return cls(endpoint or None, mode, int(attempts))


_settings = S3Settings()
_clients: dict[tuple, object] = {}
_lock = threading.Lock()


def configure(settings: S3Settings) -> None:
    """Use `settings` for every S3 client this process makes from now on."""
    global _settings
    _settings = settings


def settings() -> S3Settings:
    return _settings


def client():
    """This process's S3 client for the current settings (boto3 clients are thread-safe)."""
    key = (_settings, os.getpid())
    with _lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = _make_client(_settings)
        return found


def _make_client(chosen: S3Settings):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(
            "s3:// URIs need boto3: pip install 'raymerge[s3]' (or pip install boto3)"
        ) from None
    session = boto3.session.Session()
    config = Config(
        retries={"mode": chosen.retry_mode, "max_attempts": chosen.max_attempts},
        max_pool_connections=READ_THREADS + 8,  # the read pool plus a worker's uploads
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path"} if chosen.endpoint else {},
    )
    return session.client(
        "s3", endpoint_url=chosen.endpoint, config=config,
        region_name=session.region_name or "us-east-1",
    )  # fmt: skip


def split_uri(uri: str) -> tuple[str, str]:
    """("bucket", "key/prefix") of "s3://bucket/key/prefix" (no trailing slash)."""
    if not uri.lower().startswith("s3://"):
        raise ConfigError(f"{shown(uri)} is not an s3:// URI")
    rest = uri[5:]
    bucket, _, key = rest.partition("/")
    if not bucket or any(c in bucket for c in " \\:?#"):
        raise ConfigError(f"{shown(uri)}: no valid bucket name; write s3://BUCKET/PREFIX")
    return bucket, key.strip("/")


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or str(status or "")


DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
          "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem"}  # fmt: skip
MISSING = {"NoSuchKey", "404", "NotFound"}


def storage_error(exc: BaseException, where: str, action: str) -> RaymergeError:
    """One clear message for a failed S3 call: what, where, what to do."""
    from botocore import exceptions as be

    endpoint = _endpoint_words()
    if isinstance(exc, RaymergeError):
        return exc
    if isinstance(exc, be.NoCredentialsError | be.PartialCredentialsError):
        return ConfigError(
            f"{where}: no AWS credentials found for {action}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role on every node"
        )
    if isinstance(exc, be.EndpointConnectionError | be.ConnectTimeoutError):
        return MergeFailed(
            f"{where}: {endpoint} does not answer ({type(exc).__name__}); check "
            "--s3-endpoint / AWS_ENDPOINT_URL and that the store is up"
        )
    code = _code(exc)
    if code == "NoSuchBucket":
        return ConfigError(
            f"{where}: bucket does not exist at {endpoint}; create it or fix the URI "
            "(and --s3-endpoint for an S3-compatible store)"
        )
    if code in DENIED:
        return ConfigError(
            f"{where}: access denied while {action} ({code}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's policy"
        )
    message = getattr(exc, "response", {}).get("Error", {}).get("Message", "") or str(exc)
    return MergeFailed(f"{where}: {action} failed ({code or type(exc).__name__}: {message[:200]})")


def _endpoint_words() -> str:
    found = _settings.endpoint
    return f"the S3 endpoint {found}" if found else "AWS's S3 endpoint"


def _transient_body_errors() -> tuple[type[BaseException], ...]:
    from botocore import exceptions as be
    from urllib3 import exceptions as ue

    return (be.ResponseStreamingError, be.IncompleteReadError, be.ReadTimeoutError,
            be.ConnectionClosedError, ue.ProtocolError, ue.ReadTimeoutError,
            ConnectionError)  # fmt: skip


class S3Source(RangedReads):
    """Reads objects under s3://bucket/prefix; a listing fills sizes and ETags for later."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.bucket, self.prefix = split_uri(self.root)
        self._meta: dict[str, tuple[int, str]] = {}  # name -> (size, ETag)
        self._listed = False  # once listed, a name not in _meta is not there (no HEAD)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def _head(self, name: str) -> tuple[int, str] | None:
        found = self._meta.get(name)
        if found is not None or (self._listed and "/" not in name):
            return found
        try:
            head = client().head_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            if _code(exc) in MISSING:
                return None
            raise storage_error(exc, self.describe(name), "reading its size") from None
        found = self._meta[name] = (int(head["ContentLength"]), str(head.get("ETag", "")))
        return found

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def size(self, name: str) -> int:
        found = self._head(name)
        if found is None:
            raise CheckpointError(f"{self.describe(name)}: no such object")
        return found[0]

    def list(self) -> list[str]:
        """Names of the objects directly under the prefix (sizes and ETags kept)."""
        files, _ = list_prefix(self.bucket, self.prefix, self.root)
        for name, size, etag in files:
            self._meta[name] = (size, etag)
        self._listed = True
        return sorted(name for name, _, _ in files)

    def _get(self, name: str, start: int, target: memoryview) -> None:
        """One ranged GET into `target`; a body cut mid-stream is fetched again."""
        where = self.describe(name)
        end = start + len(target) - 1
        transient = _transient_body_errors()
        for attempt in range(BODY_ATTEMPTS):
            try:
                response = client().get_object(
                    Bucket=self.bucket, Key=self._key(name), Range=f"bytes={start}-{end}"
                )
                data = response["Body"].read()
            except transient:
                if attempt + 1 == BODY_ATTEMPTS:
                    raise MergeFailed(
                        f"{where}: reading bytes {start}-{end} broke off {BODY_ATTEMPTS} times; "
                        "check the network to the store, then rerun to resume"
                    ) from None
                continue
            except Exception as exc:
                if _code(exc) in ("InvalidRange", "416"):
                    data = b""
                else:
                    raise storage_error(exc, where, f"reading bytes {start}-{end}") from None
            if len(data) != len(target):
                raise CheckpointError(
                    f"{where}: object ends before byte {end + 1} ({len(data)} of "
                    f"{len(target)} bytes from {start}); re-upload the checkpoint"
                )
            target[:] = data
            return

    def fingerprint(self, name: str) -> str:
        found = self._head(name)
        if found is None:
            raise CheckpointError(f"{self.describe(name)}: no such object")
        return f"{found[0]}:{found[1]}"

    def __reduce__(self):
        return (S3Source, (self.root,))


def list_prefix(bucket: str, prefix: str, where: str):
    """([(name, size, ETag)] of objects directly under `prefix`, [sub-folder names])."""
    base = f"{prefix}/" if prefix else ""
    files, folders = [], []
    try:
        pages = client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=base, Delimiter="/", PaginationConfig={"PageSize": LIST_PAGE}
        )
        for page in pages:
            for entry in page.get("Contents", []):
                name = entry["Key"][len(base):]
                if name:
                    files.append((name, int(entry["Size"]), str(entry.get("ETag", ""))))
            for entry in page.get("CommonPrefixes", []):
                folders.append(entry["Prefix"][len(base):].rstrip("/"))
    except Exception as exc:
        raise storage_error(exc, where, "listing it") from None
    return files, folders


class S3Destination:
    """Writes a merge output under s3://bucket/prefix: shards as multipart uploads."""

    whole_parts = True  # a part is one upload: its bytes must be sent together

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.bucket, self.prefix = split_uri(self.root)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def list(self) -> list[str]:
        return self.list_dir("")

    def list_dir(self, name: str) -> list[str]:
        folder = self._key(name) if name else self.prefix
        files, folders = list_prefix(self.bucket, folder, self.describe(name))
        return sorted([f for f, _, _ in files] + [f + "/" for f in folders])

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): False when the object exists."""
        try:
            client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data,
                                IfNoneMatch="*")  # fmt: skip
        except Exception as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise storage_error(exc, self.describe(name), "writing") from None
        return True

    def read_text(self, name: str) -> str | None:
        try:
            body = client().get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except Exception as exc:
            if _code(exc) in MISSING:
                return None
            raise storage_error(exc, self.describe(name), "reading") from None
        try:
            return body.decode()
        except UnicodeDecodeError:
            return None

    def write_file(self, name: str, data: bytes) -> None:
        try:
            client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except Exception as exc:
            raise storage_error(exc, self.describe(name), "writing") from None

    def remove(self, name: str) -> None:
        """Delete one object, or every object under a folder name."""
        keys = [self._key(name)]
        files, folders = list_prefix(self.bucket, self._key(name), self.describe(name))
        keys += [f"{self._key(name)}/{f}" for f, _, _ in files]
        for folder in folders:
            self.remove(f"{name}/{folder}")
        try:
            for lo in range(0, len(keys), LIST_PAGE):
                client().delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[lo:lo + LIST_PAGE]], "Quiet": True,
                })  # fmt: skip
        except Exception as exc:
            raise storage_error(exc, self.describe(name), "deleting") from None

    def uploads(self, name: str) -> list[str]:
        """Upload ids of the multipart uploads in progress for this shard's key."""
        key = self._key(name)
        ids = []
        try:
            pages = client().get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=key
            )
            for page in pages:
                ids += [u["UploadId"] for u in page.get("Uploads", []) if u["Key"] == key]
        except Exception as exc:
            raise storage_error(exc, self.describe(name), "listing its uploads") from None
        return ids

    def begin_shard(self, name: str, size: int, previous: str | None) -> tuple[str, bool]:
        """Pick up the upload `previous` names if the store still has it, else start one;
        any other upload in progress for this key (a run killed before its ledger named
        it) is aborted, so none is left behind to be billed."""
        kept = None
        for upload in self.uploads(name):
            if upload == previous:
                kept = upload
            else:
                self._abort(name, upload)
        if kept is not None:
            return kept, True
        try:
            created = client().create_multipart_upload(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            raise storage_error(exc, self.describe(name), "starting its upload") from None
        return created["UploadId"], False

    def uploaded_parts(self, name: str, token: str) -> dict[int, str] | None:
        """Part number -> receipt ("N:ETag") of the parts the store holds for upload `token`,
        from the store's own ListParts."""
        parts: dict[int, str] = {}
        try:
            pages = client().get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=self._key(name), UploadId=token
            )
            for page in pages:
                parts.update({p["PartNumber"]: f"{p['PartNumber']}:{p['ETag']}"
                              for p in page.get("Parts", [])})  # fmt: skip
        except Exception as exc:
            if _code(exc) == "NoSuchUpload":
                return {}
            raise storage_error(exc, self.describe(name), "listing its parts") from None
        return parts

    def write_part(self, name: str, token: str, part_number: int, offset: int, data) -> str:
        """Upload one part; returns "N:ETag" (what completing the upload needs)."""
        body = memoryview(data).cast("B").tobytes()
        try:
            reply = client().upload_part(Bucket=self.bucket, Key=self._key(name),
                                         UploadId=token, PartNumber=part_number, Body=body)
        except Exception as exc:
            error = storage_error(exc, self.describe(name), f"uploading part {part_number}")
            if isinstance(error, MergeFailed):
                error = MergeFailed(f"{error}; parts already uploaded are kept: rerun to resume")
            raise error from None
        return f"{part_number}:{reply['ETag']}"

    def read_part(self, token: str, start: int, length: int) -> bytes | None:
        return None  # an upload's parts cannot be read back; ListParts and ETags check them

    def commit_shard(self, name: str, token: str, receipts: list[str]) -> None:
        """Complete the upload from (part number, ETag) receipts: the shard appears whole."""
        parts = sorted({tuple(r.split(":", 1)) for r in receipts}, key=lambda p: int(p[0]))
        try:
            client().complete_multipart_upload(
                Bucket=self.bucket, Key=self._key(name), UploadId=token,
                MultipartUpload={"Parts": [{"PartNumber": int(n), "ETag": e} for n, e in parts]},
            )  # fmt: skip
        except Exception as exc:
            raise storage_error(exc, self.describe(name), "completing its upload") from None

    def abort_shard(self, name: str, token: str) -> None:
        self._abort(name, token)

    def _abort(self, name: str, upload: str) -> None:
        try:
            client().abort_multipart_upload(Bucket=self.bucket, Key=self._key(name),
                                            UploadId=upload)  # fmt: skip
        except Exception as exc:
            if _code(exc) in ("NoSuchUpload", "404"):
                return
            raise storage_error(exc, self.describe(name), "aborting its upload") from None

    def check_writable(self) -> None:
        """Raise a clear error unless the bucket exists and a probe object can be written."""
        import uuid

        probe = f"_raymerge-write-test-{uuid.uuid4().hex}"
        try:
            client().head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchBucket"):
                raise ConfigError(
                    f"output {self.root}: bucket {self.bucket!r} does not exist at "
                    f"{_endpoint_words()}; create it or fix the URI (and --s3-endpoint for an "
                    "S3-compatible store)"
                ) from None
            raise storage_error(exc, self.root, "checking the bucket") from None
        self.write_file(probe, b"")
        try:
            client().delete_object(Bucket=self.bucket, Key=self._key(probe))
        except Exception as exc:
            raise storage_error(exc, self.describe(probe), "deleting a probe object") from None

    def __reduce__(self):
        return (S3Destination, (self.root,))
