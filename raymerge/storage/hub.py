"""Hugging Face Hub model repositories as checkpoints: `org/name` and `org/name@revision`.

A repo id in a config resolves in this order (config.py calls `resolve`):
1. a snapshot in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub) for that
   revision (a branch or tag through `refs/<revision>`, or a commit) that holds the weights
   (every shard its index names, or its `*.safetensors`): the snapshot folder is used as a
   local checkpoint, with no network at all;
2. with HF_HUB_OFFLINE=1, a clear error saying what the cache lacks;
3. with `--download` (`configure(download=True)`), the weights, the index and the config and
   tokenizer files are fetched into the cache with `snapshot_download`, then the snapshot is
   used;
4. else the Hub is asked for the revision's commit and file list, and the model is read in
   place as `hf://org/name@<commit>`: `HubSource` makes ranged GETs of
   `{endpoint}/{repo}/resolve/{commit}/{file}` (redirects followed, as the Hub sends large
   files to a CDN), so the plan reads each shard's header and each worker its units' rows,
   never whole files. The commit is pinned: the workers and a resumed run read the same bytes.

Workers rebuild sources from the URI alone, so a non-default endpoint (HF_ENDPOINT) travels in
it (`?endpoint=...`); the token (HF_TOKEN or the saved login) never does: each process uses
its own, as boto3 does S3 credentials. Environment variables are read when called, not when
huggingface_hub is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from raymerge.errors import CheckpointError, ConfigError, MergeFailed, RaymergeError, shown
from raymerge.storage.ranged import RangedReads

SCHEME = "hf"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
INDEX_NAME = "model.safetensors.index.json"
ATTEMPTS = 5  # a request that fails in transit (or a 429/5xx) is sent this often
BACKOFF_S = 0.25  # doubled after each failed attempt
TIMEOUT_S = 60.0
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_INDEX_BYTES = 64 << 20

# the Hub's rules: word characters, '-' and '.', starting and ending with a word character,
# no '--' or '..', at most 96 characters
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"({_PART})/({_PART})")
_REVISION = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}

_download = False
_listings: dict[tuple[str, str, str], tuple[str, dict[str, tuple[int | None, str]]]] = {}
_lock = threading.Lock()


def configure(download: bool) -> bool:
    """With `download`, repo ids are fetched into the cache before use (`--download`).
    Returns the previous setting."""
    global _download
    previous, _download = _download, download
    return previous


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str  # a branch, tag or commit
    endpoint: str

    @property
    def uri(self) -> str:
        query = (
            ""
            if self.endpoint == DEFAULT_ENDPOINT
            else "?" + urlencode({"endpoint": self.endpoint})
        )
        return f"{SCHEME}://{self.repo}@{self.revision}{query}"

    @property
    def page(self) -> str:
        return f"{self.endpoint}/{self.repo}"


def is_commit(revision: str) -> bool:
    return _COMMIT.fullmatch(revision) is not None


def _valid_repo(repo: str) -> bool:
    return _REPO_ID.fullmatch(repo) is not None and "--" not in repo and ".." not in repo


def _valid_revision(revision: str) -> bool:
    return (
        len(revision) <= 255
        and _REVISION.fullmatch(revision) is not None
        and not any(part in (".", "..") or part.endswith(".lock") for part in revision.split("/"))
    )


def parse_ref(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of "org/name" or "org/name@revision"; None otherwise."""
    repo, at, revision = ref.partition("@")
    if not _valid_repo(repo) or (at and not _valid_revision(revision)):
        return None
    return repo, (revision if at else None)


def parse_uri(uri: str) -> HubRef:
    """The parts of "hf://org/name[@revision][?endpoint=URL]"; without an endpoint, this
    process's HF_ENDPOINT, else the public Hub."""
    if not uri.lower().startswith(f"{SCHEME}://"):
        raise ConfigError(f"{shown(uri)} is not an hf:// URI")
    rest, _, query = uri[len(SCHEME) + 3 :].rstrip("/").partition("?")
    parsed = parse_ref(rest)
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"endpoint"})
    if parsed is None or unknown:
        raise ConfigError(
            f"{shown(uri)}: not a Hugging Face model URI; write hf://ORG/NAME or "
            "hf://ORG/NAME@REVISION (a branch, tag or commit), optionally ?endpoint=URL"
            + (f" (unknown option {shown(unknown[0])})" if unknown else "")
        )
    at = options.get("endpoint", "").rstrip("/") or endpoint()
    if not re.match(r"^https?://[^/\s]+", at):
        raise ConfigError(f"{shown(uri)}: endpoint {shown(at)} is not an http(s) URL")
    return HubRef(parsed[0], parsed[1] or DEFAULT_REVISION, at)


# --- the environment, read when called ------------------------------------------------------


def endpoint() -> str:
    """HF_ENDPOINT, else the public Hub."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> str:
    """huggingface_hub's cache: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub
    (HF_HOME defaulting to $XDG_CACHE_HOME/huggingface, then ~/.cache/huggingface)."""
    env = os.environ
    found = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not found:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        found = os.path.join(env.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    return os.path.expandvars(os.path.expanduser(found))


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


# --- resolution --------------------------------------------------------------------------


def resolve(repo: str, revision: str | None, at: str | None = None) -> str:
    """A local snapshot folder or a pinned hf:// URI for `repo` at `revision`, as the module
    docstring says. `at`: the endpoint (default HF_ENDPOINT, else the public Hub)."""
    ref = HubRef(repo, revision or DEFAULT_REVISION, (at or endpoint()).rstrip("/"))
    cache = cache_dir()
    folder, problem = cached_snapshot(cache, ref.repo, ref.revision)
    if folder is not None and not (_download and not offline() and not is_commit(ref.revision)):
        return folder
    if offline():
        raise ConfigError(
            f"not in the Hugging Face cache at {shown(cache)} ({problem}) and HF_HUB_OFFLINE is "
            "set; fetch it once where the Hub can be reached (`raymerge run --download ...`, or "
            f"`hf download {ref.repo} --include '*.safetensors' '*.json'`), or point "
            "HF_HUB_CACHE (HF_HOME) at a cache that holds it"
        )
    if _download:
        try:
            return download(ref, cache)
        except MergeFailed:
            if folder is None:
                raise
            return folder  # the Hub is out of reach: the cached snapshot, as huggingface_hub does
    commit, files = listing(ref)
    if not any(n.endswith(".safetensors") and "/" not in n for n in files):
        raise ConfigError(
            f"{ref.repo} at {ref.revision} holds no *.safetensors files (raymerge does not load "
            "pickle .bin/.pt weights); pick a revision with safetensors weights"
        )
    return HubRef(ref.repo, commit, ref.endpoint).uri


def cached_snapshot(cache: str, repo: str, revision: str) -> tuple[str | None, str]:
    """(the cache's snapshot folder of `revision` if it holds the weights, else None; what
    is missing, for a message)."""
    storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
    if not os.path.isdir(storage):
        return None, f"no {os.path.basename(storage)} folder"
    commit = revision
    if not is_commit(revision):
        try:
            with open(os.path.join(storage, "refs", revision)) as f:
                commit = f.read(100).strip()
        except OSError:
            return None, f"no refs/{revision}: revision {revision!r} was never fetched"
        if not is_commit(commit):
            return None, f"refs/{revision} holds no commit hash"
    folder = os.path.join(storage, "snapshots", commit)
    if not os.path.isdir(folder):
        return None, f"no snapshot of commit {commit}"
    missing = weights_problem(folder)
    if missing:
        return None, f"snapshot {commit} {missing}"
    return folder, ""


def weights_problem(folder: str) -> str | None:
    """None when `folder` holds the weights: every shard its index names, or at least one
    *.safetensors file (symlinks into the blobs must not dangle); else what it lacks."""
    index = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, "rb") as f:
                shards = sorted(set(json.loads(f.read(MAX_INDEX_BYTES))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None  # opening the checkpoint reports a broken index clearly
        missing = [s for s in shards if not (isinstance(s, str) and _isfile(folder, s))]
        if missing:
            more = f" and {len(missing) - 1} more shard(s)" if len(missing) > 1 else ""
            return f"lacks {missing[0]}{more} (an interrupted download?)"
        return None
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    if not names:
        return "holds no *.safetensors files"
    broken = [n for n in names if not _isfile(folder, n)]
    return f"lacks the blob of {broken[0]}" if broken else None


def _isfile(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name))


def listing(ref: HubRef) -> tuple[str, dict[str, tuple[int | None, str]]]:
    """(commit, {file: (size, ETag)}) of `ref` from the Hub's model_info; a commit's listing
    is kept for the process (its files never change), a branch is asked for each time."""
    if is_commit(ref.revision):
        with _lock:
            found = _listings.get((ref.endpoint, ref.repo, ref.revision))
        if found is not None:
            return found
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=ref.endpoint).model_info(
            ref.repo, revision=ref.revision, files_metadata=True, timeout=TIMEOUT_S
        )
    except Exception as exc:
        raise hub_error(exc, ref) from None
    commit = str(info.sha or "")
    if not is_commit(commit):
        raise MergeFailed(f"{ref.page}: the Hub gave no commit for revision {ref.revision!r}")
    files = {}
    for sibling in info.siblings or []:
        lfs = getattr(sibling, "lfs", None)
        etag = (getattr(lfs, "sha256", None) if lfs else None) or sibling.blob_id or ""
        files[sibling.rfilename] = (sibling.size, str(etag))
    with _lock:
        _listings[(ref.endpoint, ref.repo, commit)] = (commit, files)
    return commit, files


def download(ref: HubRef, cache: str) -> str:
    """Fetch what a merge reads (the shards the index names, or every top-level
    *.safetensors, the index, config and tokenizer files, a LoRA adapter's config) into the
    cache; the snapshot."""
    from huggingface_hub import snapshot_download

    from raymerge.checkpoint import CONFIG_FILES, TOKENIZER_FILES

    commit, files = listing(ref)
    from raymerge.storage.lora import ADAPTER_CONFIG

    wanted = {n for n in (*CONFIG_FILES, *TOKENIZER_FILES, ADAPTER_CONFIG) if n in files}
    if INDEX_NAME in files:
        source = HubSource(HubRef(ref.repo, commit, ref.endpoint).uri)
        try:
            index = json.loads(source.read_range(INDEX_NAME, 0, source.size(INDEX_NAME)))
            wanted |= {INDEX_NAME, *(str(v) for v in index["weight_map"].values())}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            wanted |= {INDEX_NAME}  # opening the checkpoint reports the broken index
    if not wanted & {n for n in files if n.endswith(".safetensors")}:
        wanted |= {n for n in files if n.endswith(".safetensors") and "/" not in n}
    try:
        folder = snapshot_download(
            ref.repo, revision=ref.revision, cache_dir=cache, endpoint=ref.endpoint,
            allow_patterns=sorted(wanted),
        )  # fmt: skip
    except Exception as exc:
        raise hub_error(exc, ref) from None
    problem = weights_problem(folder)
    if problem:
        raise MergeFailed(f"{ref.page}: after downloading, {folder} {problem}; rerun to resume")
    return folder


def hub_error(exc: BaseException, ref: HubRef) -> RaymergeError:
    """One line for a failed Hub call: what, where, what to do."""
    from huggingface_hub import utils as hf

    if isinstance(exc, RaymergeError):
        return exc
    if isinstance(exc, hf.GatedRepoError):
        return _denied(ref, "it is a gated model")
    if isinstance(exc, hf.RevisionNotFoundError):
        return ConfigError(
            f"{ref.repo} has no revision {ref.revision!r} at {ref.endpoint}; give a branch, tag "
            f"or commit that exists (see {ref.page})"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ConfigError(
            f"no model repository {ref.repo!r} at {ref.endpoint} (or it is private and no "
            "token with access is set); check the id, or set HF_TOKEN for a private repo"
        )
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return _denied(ref, f"HTTP {status}")
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return MergeFailed(f"{ref.page}: the Hub answered HTTP {status} ({first}); retry later")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return ConfigError(
            f"{ref.repo}: huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it "
            "was imported); unset HF_HUB_OFFLINE in every process, or use a cached model"
        )
    if isinstance(exc, _transport_errors() + (hf.LocalEntryNotFoundError,)):
        return _unreachable(ref, exc)
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return MergeFailed(f"{ref.page}: the Hub call failed ({type(exc).__name__}: {text})")


def _denied(ref: HubRef, why: str) -> ConfigError:
    return ConfigError(
        f"{ref.repo}: access denied ({why}); accept its license on {ref.page} with your account, "
        "then set HF_TOKEN (or run `hf auth login`) on every node"
    )


def _unreachable(ref: HubRef, exc: BaseException) -> MergeFailed:
    return MergeFailed(
        f"{ref.repo}: cannot reach the Hugging Face Hub at {ref.endpoint} "
        f"({type(exc).__name__}); check the network and HF_ENDPOINT, or use a cached copy "
        "with HF_HUB_OFFLINE=1 (fetch it once with --download where the Hub is reachable)"
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP client raises when a request fails in transit (httpx for
    huggingface_hub >= 1.0, requests before), and the OS's own socket errors."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                            ("requests", "RequestException")):  # fmt: skip
        module = sys.modules.get(name)
        error = getattr(module, attribute, None) if module is not None else None
        if isinstance(error, type):
            found.append(error)
    return tuple(found)


# --- reading in place ----------------------------------------------------------------------


@dataclass
class _Reply:
    status: int
    headers: object
    chunks: Callable[[], Iterator[bytes]]


@contextlib.contextmanager
def _request(method: str, url: str, headers: dict[str, str]) -> Iterator[_Reply]:
    """One streamed request through huggingface_hub's own session (its proxies and TLS
    settings), redirects followed: httpx strips the token on a redirect to another host."""
    from huggingface_hub.utils import get_session

    session = get_session()
    if callable(getattr(session, "stream", None)):  # httpx (huggingface_hub >= 1.0)
        with session.stream(method, url, headers=headers, follow_redirects=True,
                            timeout=TIMEOUT_S) as reply:  # fmt: skip
            yield _Reply(reply.status_code, reply.headers, reply.iter_bytes)
    else:  # requests (huggingface_hub < 1.0)
        reply = session.request(method, url, headers=headers, allow_redirects=True,
                                timeout=TIMEOUT_S, stream=True)  # fmt: skip
        with contextlib.closing(reply):
            yield _Reply(reply.status_code, reply.headers, lambda: reply.iter_content(1 << 20))


def _auth_headers() -> dict[str, str]:
    """huggingface_hub's headers: its user agent and this process's token (HF_TOKEN, else
    the saved login, refreshed when it expires), built per request (about 50 us)."""
    from huggingface_hub.utils import build_hf_headers

    return dict(build_hf_headers())


class HubSource(RangedReads):
    """Reads the files of a Hub model repo at one commit with ranged GETs; the file list
    (sizes and ETags) comes from one model_info call, made only when something asks."""

    def __init__(self, root: str) -> None:
        self.ref = parse_uri(root)
        self.root = self.ref.uri

    def _listing(self) -> tuple[str, dict[str, tuple[int | None, str]]]:
        return listing(self.ref)

    def describe(self, name: str) -> str:
        return f"{SCHEME}://{self.ref.repo}@{self.ref.revision}/{name}"

    def exists(self, name: str) -> bool:
        return name in self._listing()[1]

    def size(self, name: str) -> int:
        found = self._listing()[1].get(name)
        if found is None:
            raise CheckpointError(f"{self.describe(name)}: no such file in the repository")
        if found[0] is None:
            raise CheckpointError(f"{self.describe(name)}: the Hub's file list gives no size")
        return int(found[0])

    def list(self) -> list[str]:
        """Names of the files at the top of the repository."""
        return sorted(n for n in self._listing()[1] if "/" not in n)

    def fingerprint(self, name: str) -> str:
        commit, files = self._listing()
        size, etag = files.get(name, (None, ""))
        return f"{commit}:{size}:{etag}"

    def _url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        commit = self.ref.revision if is_commit(self.ref.revision) else self._listing()[0]
        return hf_hub_url(self.ref.repo, name, revision=commit, endpoint=self.ref.endpoint)

    def _get(self, name: str, start: int, target: memoryview) -> None:
        """One ranged GET into `target`; transient failures are retried, a short body is an
        error."""
        where = self.describe(name)
        end = start + len(target) - 1
        headers = dict(_auth_headers(), Range=f"bytes={start}-{end}")
        headers["Accept-Encoding"] = "identity"
        url = self._url(name)
        from huggingface_hub.utils import OfflineModeIsEnabled

        for attempt in range(ATTEMPTS):
            try:
                with _request("GET", url, headers) as reply:
                    if reply.status in (200, 206):
                        self._fill(reply, where, start, target)
                        return
                    if reply.status not in RETRY_STATUS or attempt + 1 == ATTEMPTS:
                        raise self._status_error(reply, where, start, end)
            except RaymergeError:
                raise
            except OfflineModeIsEnabled as exc:
                raise hub_error(exc, self.ref) from None
            except _transport_errors() as exc:
                if attempt + 1 == ATTEMPTS:
                    raise _unreachable(self.ref, exc) from None
            time.sleep(BACKOFF_S * 2**attempt)

    def _fill(self, reply: _Reply, where: str, start: int, target: memoryview) -> None:
        if reply.status == 200 and start != 0:
            raise MergeFailed(
                f"{where}: the server ignored the Range header (HTTP 200 for bytes from "
                f"{start}); check HF_ENDPOINT (a proxy or mirror that drops ranges?)"
            )
        done = 0
        for chunk in reply.chunks():
            take = min(len(chunk), len(target) - done)
            target[done : done + take] = chunk[:take]
            done += take
            if done == len(target):
                break  # a 200 for the whole file: the rest is not needed
        if done != len(target):
            raise CheckpointError(
                f"{where}: file ends before byte {start + len(target)} ({done} of "
                f"{len(target)} bytes from {start}); the repository's file is shorter than "
                "its header says"
            )

    def _status_error(self, reply: _Reply, where: str, start: int, end: int) -> RaymergeError:
        code = reply.headers.get("X-Error-Code", "")
        if reply.status == 416:
            return CheckpointError(
                f"{where}: file ends before byte {end + 1} (HTTP 416 for bytes {start}-{end}); "
                "the repository's file is shorter than its header says"
            )
        if code == "GatedRepo" or reply.status in (401, 403):
            why = "it is a gated model" if code == "GatedRepo" else f"HTTP {reply.status}"
            return _denied(self.ref, why)
        if reply.status == 404:
            return CheckpointError(
                f"{where}: not found on the Hub (HTTP 404{', ' + code if code else ''}); the "
                "repository changed since it was listed? rerun to list it again"
            )
        return MergeFailed(
            f"{where}: reading bytes {start}-{end} failed (HTTP {reply.status}); retry later, "
            "then rerun to resume"
        )

    def __reduce__(self):
        return (HubSource, (self.root,))
