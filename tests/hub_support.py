"""A stand-in for the Hugging Face Hub on 127.0.0.1, and a cache laid out as huggingface_hub
lays it out.

`FakeHub` answers what huggingface_hub and raymerge ask: model_info
(`/api/models/{repo}[/revision/{rev}]`, with `blobs=True` the sizes, blob ids and LFS
hashes), the tree listing `snapshot_download` uses (`/api/models/{repo}/tree/{rev}`), and
HEAD and GET (with `Range`: 206 and `Content-Range`) on `/{repo}/resolve/{rev}/{file}`, where
a GET of an LFS file (`*.safetensors`) is redirected to `/cdn/...`, as the real Hub redirects
to its CDN. A gated repo's files need the token (401 without one, 403 with a wrong one, the
Hub's `X-Error-Code: GatedRepo`); unknown repos, revisions and files get the Hub's 401/404
with its error codes. It counts the body bytes served per (repo, file).

`write_cache` builds `<cache>/models--org--name/{blobs/<etag>, snapshots/<commit>/<file>
(relative symlinks to the blobs), refs/<branch>}` from a folder's files, with the ETags the
Hub gives (an LFS file's SHA-256, else its git blob id), so the cache and the server agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
TOKEN = "hf_raymerge_test_token"


@dataclass(frozen=True)
class HubFile:
    data: bytes

    @property
    def lfs(self) -> bool:
        return False

    @property
    def blob_id(self) -> str:  # git's object id of the content
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class LfsFile(HubFile):
    @property
    def lfs(self) -> bool:
        return True


def hub_file(name: str, data: bytes) -> HubFile:
    return LfsFile(data) if name.endswith(LFS_SUFFIXES) else HubFile(data)


def etag(file: HubFile) -> str:
    """What the Hub sends as ETag and the cache names the blob: SHA-256 for LFS files."""
    return file.sha256 if file.lfs else file.blob_id


def folder_files(folder: str) -> dict[str, HubFile]:
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = hub_file(name, f.read())
    return files


def commit_of(repo: str, files: dict[str, HubFile], salt: str = "") -> str:
    digest = hashlib.sha1(f"{repo}:{salt}".encode())
    for name in sorted(files):
        digest.update(f"{name}:{etag(files[name])}\n".encode())
    return digest.hexdigest()


def write_cache(
    cache: str, repo: str, folder: str, refs: tuple[str, ...] = ("main",),
    skip: tuple[str, ...] = (),
) -> str:  # fmt: skip
    """Put `folder`'s files in the cache as repo `repo` at one commit (refs pointing at it);
    files in `skip` are left out of the snapshot (an interrupted download). Returns the
    commit."""
    files = folder_files(folder)
    commit = commit_of(repo, files)
    storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    for name, file in files.items():
        if name in skip:
            continue
        blob = os.path.join(storage, "blobs", etag(file))
        with open(blob, "wb") as f:
            f.write(file.data)
        os.symlink(os.path.join("..", "..", "blobs", etag(file)), os.path.join(snapshot, name))
    for ref in refs:
        with open(os.path.join(storage, "refs", ref), "w") as f:
            f.write(commit)  # huggingface_hub writes the bare hash, no newline
    return commit


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    gated: bool = False
    private: bool = False


class FakeHub:
    """The Hub's API and file endpoints for a few repos, on 127.0.0.1 (port 0)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: Counter[tuple[str, str]] = Counter()  # (repo, file) -> body bytes
        self.calls: Counter[str] = Counter()  # "info", "tree", "head", "get", "cdn"
        self.fail_next_gets = 0  # answer this many file GETs with 503 first
        self.cut_next_gets = 0  # then break this many off halfway through the body
        self._lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo: str, folder: str, refs: tuple[str, ...] = ("main",), salt: str = "",
            gated: bool = False, private: bool = False) -> str:  # fmt: skip
        """Serve `folder`'s files as `repo` at a new commit that `refs` point to."""
        files = folder_files(folder)
        commit = commit_of(repo, files, salt)
        entry = self.repos.setdefault(repo, Repo())
        entry.commits[commit] = files
        entry.refs.update({ref: commit for ref in refs})
        entry.gated, entry.private = gated, private
        return commit

    def reset(self) -> None:
        with self._lock:
            self.served.clear()
            self.calls.clear()

    def served_total(self) -> int:
        with self._lock:
            return sum(self.served.values())

    def count(self, kind: str, repo: str = "", name: str = "", nbytes: int = 0) -> None:
        with self._lock:
            self.calls[kind] += 1
            if nbytes:
                self.served[(repo, name)] += nbytes

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

    def log_message(self, *args) -> None:  # quiet
        pass

    # --- plumbing ---

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              head: bool = False) -> None:  # fmt: skip
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def _error(self, status: int, code: str, head: bool = False) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(status, body, {"X-Error-Code": code, "Content-Type": "application/json"},
                   head=head)  # fmt: skip

    def _json(self, value) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        """The repo if this request may see it; else the Hub's answer is sent."""
        repo = self.owner.repos.get(repo_id)
        if repo is None or (repo.private and self._token() != TOKEN):
            # the Hub answers 401 for a missing or private repo without a token, 404 with one
            self._error(404 if self._token() else 401, "RepoNotFound", head)
            return None
        return repo

    def _commit(self, repo: Repo, revision: str, head: bool = False) -> str | None:
        commit = repo.refs.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", head)
        return commit

    # --- routes ---

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = parse_qs(url.query)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            rest = parts[4:]
            if not rest or (rest[0] == "revision" and len(rest) == 2):
                return self._model_info(repo_id, unquote(rest[1]) if rest else "main", query)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, unquote(rest[1]))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            name = "/".join(unquote(p) for p in parts[4:])
            return self._resolve(repo_id, unquote(parts[3]), name, head)
        if parts[0] == "cdn" and len(parts) >= 5:
            repo_id = f"{unquote(parts[1])}/{unquote(parts[2])}"
            name = "/".join(unquote(p) for p in parts[4:])
            return self._file(repo_id, unquote(parts[3]), name, head, kind="cdn")
        self._error(404, "NotFound", head)

    def _model_info(self, repo_id: str, revision: str, query: dict) -> None:
        self.owner.count("info")
        repo = self._repo(repo_id)
        commit = repo and self._commit(repo, revision)
        if repo is None or commit is None:
            return
        blobs = query.get("blobs", [""])[0].lower() in ("1", "true")
        siblings = []
        for name, file in sorted(repo.commits[commit].items()):
            sibling: dict = {"rfilename": name}
            if blobs:
                sibling.update(size=len(file.data), blobId=file.blob_id)
                if file.lfs:
                    sibling["lfs"] = {"size": len(file.data), "sha256": file.sha256,
                                      "pointerSize": 134}  # fmt: skip
            siblings.append(sibling)
        self._json({
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": commit,
            "private": repo.private, "gated": "manual" if repo.gated else False,
            "disabled": False, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z", "author": repo_id.split("/")[0],
            "downloads": 0, "likes": 0, "library_name": "transformers", "siblings": siblings,
        })  # fmt: skip

    def _tree(self, repo_id: str, revision: str) -> None:
        self.owner.count("tree")
        repo = self._repo(repo_id)
        commit = repo and self._commit(repo, revision)
        if repo is None or commit is None:
            return
        entries = []
        for name, file in sorted(repo.commits[commit].items()):
            entry: dict = {"type": "file", "oid": file.blob_id, "size": len(file.data),
                           "path": name}  # fmt: skip
            if file.lfs:
                entry["lfs"] = {"oid": file.sha256, "size": len(file.data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self.owner.repos.get(repo_id)
        commit = repo.refs.get(revision, revision) if repo is not None else revision
        file = repo.commits.get(commit, {}).get(name) if repo is not None else None
        if not head and file is not None and file.lfs:
            if not self._may_read(repo, head):
                return
            self.owner.count("redirect")
            location = f"/cdn/{repo_id}/{commit}/{name}"  # relative, as a same-host CDN
            return self._send(302, b"", {"Location": location, "X-Repo-Commit": commit})
        self._file(repo_id, revision, name, head, kind="head" if head else "get")

    def _may_read(self, repo: Repo, head: bool) -> bool:
        """A gated repo's files need the token; False when the refusal was sent."""
        if not repo.gated or self._token() == TOKEN:
            return True
        self._error(403 if self._token() else 401, "GatedRepo", head)
        return False

    def _file(self, repo_id: str, revision: str, name: str, head: bool, kind: str) -> None:
        hub = self.owner
        hub.count(kind)
        repo = self._repo(repo_id, head)
        commit = repo and self._commit(repo, revision, head)
        if repo is None or commit is None or not self._may_read(repo, head):
            return
        file = repo.commits[commit].get(name)
        if file is None:
            return self._error(404, "EntryNotFound", head)
        if not head and hub.fail_next_gets > 0:
            with hub._lock:
                hub.fail_next_gets -= 1
            return self._error(503, "Unavailable")
        size = len(file.data)
        headers = {"ETag": f'"{etag(file)}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        wanted = self.headers.get("Range")
        status, body = 200, file.data
        if wanted:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if match is None or match.group(1) == match.group(2) == "":
                return self._error(400, "BadRange", head)
            if match.group(1) == "":  # the last N bytes
                start, end = max(0, size - int(match.group(2))), size - 1
            else:
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            if start >= size or start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"}, head)
            status, body = 206, file.data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if not head:
            hub.count("bytes", repo_id, name, len(body))
        if not head and hub.cut_next_gets > 0 and len(body) > 1:
            with hub._lock:
                hub.cut_next_gets -= 1
            return self._cut(status, body, headers)
        self._send(status, body, headers, head)

    def _cut(self, status: int, body: bytes, headers: dict) -> None:
        """Promise the whole body, send half, close the connection."""
        self.send_response(status)
        for key, value in dict(headers, **{"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
