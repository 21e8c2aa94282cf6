"""Hugging Face repo ids as models (`org/name`, `org/name@revision`): from the local cache
with HF_HUB_OFFLINE=1, read in place from a Hub (a loopback stand-in, tests/hub_support.py)
with ranged GETs, fetched into the cache with --download; and one clear line for each way the
Hub or the cache can refuse. Every merge is compared byte for byte with the same merge of
local folders."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import huggingface_hub.constants
import pytest
from click.testing import CliRunner

from raymerge.card import input_origin
from raymerge.cli import main
from raymerge.config import load_spec
from raymerge.errors import CheckpointError, ConfigError
from raymerge.storage import hub, open_source
from tests.conftest import write_config
from tests.hub_support import TOKEN, FakeHub, write_cache
from tests.s3_support import free_port

OUTPUT_FILES = ("model.safetensors.index.json", "config.json", "tokenizer.json")
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}}}\n'


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """A private cache, no token, online, the default endpoint: set in the environment, which
    raymerge reads when it resolves (huggingface_hub reads some of it at import, so its
    offline switch and token paths are pinned here too)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name in ("HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH"):  # no saved login of this machine
        monkeypatch.setattr(huggingface_hub.constants, name, str(tmp_path / "none"), raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def fake_hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def folders(models, tmp_path) -> dict[str, str]:
    """The session's models; model_1 with a tokenizer file (copied into outputs)."""
    one = tmp_path / "inputs" / "model_1"
    shutil.copytree(models["model_1"], one)
    (one / "tokenizer.json").write_bytes(TOKENIZER)
    return dict(models, model_1=str(one))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0 and result.exception is None, (result.exception, result.output)
    return result.output


def fails(result, code: int, *fragments: str) -> str:
    output = result.output.strip()
    assert isinstance(result.exception, SystemExit), (result.exception, output)
    assert result.exit_code == code, output
    assert output.startswith("error: ") and len(output.splitlines()) == 1, output
    assert "Traceback" not in output and "internal error" not in output, output
    for fragment in fragments:
        assert fragment in output, output
    return output


def output_files(folder) -> dict[str, bytes]:
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors") or n in OUTPUT_FILES]
    assert any(n.endswith(".safetensors") for n in names), names
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(names)}


def merge(tmp_path, body: dict, name: str, *flags) -> dict[str, bytes]:
    """`raymerge run` of `body` on the session's Ray; the output's shards and side files."""
    config = write_config(tmp_path / f"{name}.yaml", body)
    out = tmp_path / name
    ok(invoke("run", config, out, "--workers", "2", "--no-progress", *flags))
    return output_files(out)


def ties(base: str, one: str, two: str) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": one, "parameters": {"weight": 0.7, "density": 0.4}},
            {"model": two, "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "dtype": "bfloat16",
    }


def linear_layer(one: str, two: str) -> dict:
    """One layer of two models: a merge that needs a fraction of each checkpoint."""
    return {
        "merge_method": "linear",
        "slices": [{"sources": [
            {"model": one, "layer_range": [1, 2], "parameters": {"weight": 0.6}},
            {"model": two, "layer_range": [1, 2], "parameters": {"weight": 0.4}},
        ]}],
        "dtype": "bfloat16",
    }  # fmt: skip


def header_bytes(folder: str) -> int:
    """What reading every shard's header costs: 8 bytes of length, then the header."""
    total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                total += 8 + struct.unpack("<Q", f.read(8))[0]
    return total


def file_size(folder: str, *names: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in names)


def whole_size(folder: str) -> int:
    return file_size(folder, *os.listdir(folder))


# --- references: what a repo id may be --------------------------------------------------------


@pytest.mark.parametrize("ref, parsed", [
    ("mistralai/Mistral-7B-v0.1", ("mistralai/Mistral-7B-v0.1", None)),
    ("org/name@main", ("org/name", "main")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("Org_1/na.me-2@" + "a" * 40, ("Org_1/na.me-2", "a" * 40)),
    ("name", None), ("a/b/c", None), ("./org/name", None), ("org/name@", None),
    ("org/-name", None), ("org/na--me", None), ("org/na..me", None), ("org/name@../x", None),
    ("org/name@a b", None), ("org name/x", None), ("/abs/path", None), ("org/name@x@y", None),
])  # fmt: skip
def test_repo_id_syntax(ref, parsed):
    assert hub.parse_ref(ref) == parsed


def test_hf_uri_round_trip_and_pickling(fake_hub, folders, hf_env):
    commit = fake_hub.add("acme/one", folders["model_1"])
    uri = f"hf://acme/one@{commit}?endpoint={fake_hub.endpoint}"
    source = open_source(uri)
    assert source.root == hub.HubRef("acme/one", commit, fake_hub.endpoint).uri
    assert hub.parse_uri(source.root) == hub.HubRef("acme/one", commit, fake_hub.endpoint)
    copy = pickle.loads(pickle.dumps(source))  # how a Ray worker gets it: the URI alone
    assert copy.root == source.root
    shard = "model-00001-of-00006.safetensors"
    with open(os.path.join(folders["model_1"], shard), "rb") as f:
        data = f.read()
    assert copy.read_range(shard, 100, 5000) == data[100:5100]
    assert copy.fingerprint(shard).startswith(f"{commit}:{len(data)}:")
    assert "hf_raymerge" not in source.root and "token" not in source.root
    default = hub.HubRef("acme/one", commit, hub.DEFAULT_ENDPOINT).uri
    assert default == f"hf://acme/one@{commit}"  # the public Hub needs no endpoint in the URI
    with pytest.raises(ConfigError, match="not a Hugging Face model URI"):
        hub.parse_uri("hf://datasets/acme/one")
    origin = input_origin(uri, "acme/one")
    assert (origin.hub_id, origin.revision) == ("acme/one", commit)
    listed = ok(invoke("inspect", f"hf://acme/one?endpoint={fake_hub.endpoint}"))
    assert "model.embed_tokens.weight" in listed and "in 6 file(s)" in listed


def test_ranged_reads_retry_and_refuse_short_files(fake_hub, folders, hf_env, monkeypatch):
    monkeypatch.setattr(hub, "BACKOFF_S", 0.01)
    commit = fake_hub.add("acme/one", folders["model_1"])
    source = open_source(f"hf://acme/one@{commit}?endpoint={fake_hub.endpoint}")
    shard = "model-00002-of-00006.safetensors"
    size = source.size(shard)
    with open(os.path.join(folders["model_1"], shard), "rb") as f:
        data = f.read()
    fake_hub.fail_next_gets = 2  # two 503s, then the bytes
    assert source.read_range(shard, 0, size) == data
    fake_hub.cut_next_gets = 2  # two bodies broken off halfway, then the whole one
    assert source.read_range(shard, 1000, size - 1000) == data[1000:]
    assert fake_hub.cut_next_gets == 0
    fake_hub.fail_next_gets = hub.ATTEMPTS
    with pytest.raises(Exception, match="HTTP 503"):
        source.read_range(shard, 0, 8)
    fake_hub.fail_next_gets = 0
    with pytest.raises(CheckpointError, match="file ends before byte"):
        source.read_range(shard, size - 4, 8)  # a short body
    with pytest.raises(CheckpointError, match="HTTP 416"):
        source.read_range(shard, size + 10, 8)
    big = bytearray(size)  # several chunks at once
    monkeypatch.setattr(hub.HubSource, "read_chunk", 4096)
    source.readinto(shard, 0, memoryview(big))
    assert bytes(big) == data


# --- the cache, offline --------------------------------------------------------------------


@pytest.mark.ray
def test_cached_repo_ids_offline_equal_local_folders(ray_local, folders, hf_env, tmp_path,
                                                     monkeypatch):  # fmt: skip
    """Branch, tag and commit revisions from a cache as huggingface_hub lays it out, with
    HF_HUB_OFFLINE=1 and an endpoint where nothing listens: the same bytes as local folders."""
    write_cache(str(hf_env), "acme/base", folders["base"])
    write_cache(str(hf_env), "acme/one", folders["model_1"], refs=("main", "v1"))
    two = write_cache(str(hf_env), "acme/two", folders["model_2"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    reference = merge(tmp_path, ties(folders["base"], folders["model_1"], folders["model_2"]),
                      "local")  # fmt: skip
    body = ties("acme/base", "acme/one@v1", f"acme/two@{two}")
    assert merge(tmp_path, body, "cached") == reference
    config = (tmp_path / "cached" / "raymerge_config.yml").read_text()
    assert f"models--acme--two/snapshots/{two}" in config  # the snapshot, a local folder
    card = (tmp_path / "cached" / "README.md").read_text()
    assert "[acme/two](https://huggingface.co/acme/two)" in card and f"`{two}`" in card
    assert "given as `acme/one@v1`" in card


def test_missing_or_partial_cache_offline_is_a_clear_error(folders, hf_env, tmp_path,
                                                           monkeypatch):  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_cache(str(hf_env), "acme/base", folders["base"])
    write_cache(str(hf_env), "acme/part", folders["model_1"],
                skip=("model-00003-of-00006.safetensors",))  # fmt: skip
    cases = [
        ("acme/nope", "no models--acme--nope folder"),
        ("acme/base@v9", "no refs/v9"),
        ("acme/base@" + "0" * 40, "no snapshot of commit"),
        ("acme/part", "lacks model-00003-of-00006.safetensors"),
    ]
    for ref, why in cases:
        body = ties("acme/base", ref, folders["model_2"])
        config = write_config(tmp_path / "c.yaml", body)
        output = fails(invoke("plan", config), 2, repr(ref), why, "HF_HUB_OFFLINE",
                       "--download", "Hugging Face cache")  # fmt: skip
        assert "models[0].model" in output


def test_local_folder_wins_over_a_repo_id(folders, hf_env, tmp_path, monkeypatch):
    """A ref that exists as a path (relative to the config's folder) is a local folder,
    whatever the Hub or the cache would say."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(folders["model_1"], tmp_path / "acme" / "one")
    config = write_config(tmp_path / "c.yaml", ties(folders["base"], "acme/one",
                                                     folders["model_2"]))  # fmt: skip
    spec = load_spec(config)
    assert spec.inputs[1].path == str(tmp_path / "acme" / "one")


# --- the Hub, read in place ----------------------------------------------------------------


@pytest.mark.ray
def test_hub_plan_reads_headers_and_merge_reads_units(ray_local, fake_hub, folders, hf_env,
                                                      tmp_path, monkeypatch):  # fmt: skip
    """`raymerge plan` of two repo ids reads each shard's 8-byte length and header, the index
    and config.json, nothing else; the merge then reads the units' bytes and the side files it
    copies: a fraction of the files. The output equals the local-folder merge byte for byte,
    and the token is used but never written."""
    one = fake_hub.add("acme/one", folders["model_1"], refs=("main", "v1"))
    fake_hub.add("acme/two", folders["model_2"])
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # sent; the repos are public
    reference = merge(tmp_path, linear_layer(folders["model_1"], folders["model_2"]), "local")
    body = linear_layer("acme/one@v1", "acme/two")
    config = write_config(tmp_path / "hub.yaml", body)
    side = ("model.safetensors.index.json", "config.json")
    opened = sum(header_bytes(folders[m]) + file_size(folders[m], *side)
                 for m in ("model_1", "model_2"))  # fmt: skip
    report = json.loads(ok(invoke("plan", config, "--json")))
    assert fake_hub.served_total() == opened, dict(fake_hub.served)
    assert report["inputs"][0]["path"] == f"hf://acme/one@{one}?endpoint=" + \
        fake_hub.endpoint.replace(":", "%3A").replace("/", "%2F")  # fmt: skip
    fake_hub.reset()
    assert merge(tmp_path, body, "hub") == reference
    copied = file_size(folders["model_1"], "config.json", "tokenizer.json")
    served = fake_hub.served_total()
    assert served == opened + report["bytes_to_read"] + copied, dict(fake_hub.served)
    whole = whole_size(folders["model_1"]) + whole_size(folders["model_2"])
    assert served < 0.7 * whole, (served, whole)
    assert fake_hub.calls["head"] == 0  # ranged GETs only, never a download
    written = b"".join(p.read_bytes() for p in (tmp_path / "hub").rglob("*") if p.is_file())
    assert TOKEN.encode() not in written
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "[acme/one](https://huggingface.co/acme/one)" in card and f"`{one}`" in card
    rerun = load_spec(str(tmp_path / "hub" / "raymerge_config.yml"))  # what `run` repeats
    assert [m.path for m in rerun.inputs] == [m["path"] for m in report["inputs"]]


@pytest.mark.ray
def test_download_fills_the_cache_then_merges_offline(ray_local, fake_hub, folders, hf_env,
                                                      tmp_path, monkeypatch):  # fmt: skip
    base = fake_hub.add("acme/base", folders["base"])
    one = fake_hub.add("acme/one", folders["model_1"])
    fake_hub.add("acme/two", folders["model_2"])
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    reference = merge(tmp_path, ties(folders["base"], folders["model_1"], folders["model_2"]),
                      "local")  # fmt: skip
    body = ties("acme/base", "acme/one", "acme/two")
    assert merge(tmp_path, body, "downloaded", "--download") == reference
    snapshot = hf_env / "models--acme--one" / "snapshots" / one
    assert sorted(os.listdir(snapshot)) == sorted(os.listdir(folders["model_1"]))
    assert (hf_env / "models--acme--base" / "refs" / "main").read_text() == base
    for name in os.listdir(folders["model_1"]):
        assert (snapshot / name).read_bytes() == open(os.path.join(folders["model_1"], name),
                                                      "rb").read()  # fmt: skip
    fake_hub.close()  # no Hub at all now
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert merge(tmp_path, body, "offline") == reference
    config = (tmp_path / "offline" / "raymerge_config.yml").read_text()
    assert f"models--acme--one/snapshots/{one}" in config


# --- the Hub's refusals: one line, the right exit code --------------------------------------


def test_gated_repo_needs_the_token(fake_hub, folders, hf_env, tmp_path, monkeypatch):
    fake_hub.add("acme/gated", folders["model_1"], gated=True)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    config = write_config(tmp_path / "c.yaml", ties(folders["base"], "acme/gated",
                                                     folders["model_2"]))  # fmt: skip
    for token in (None, "hf_wrong"):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        output = fails(invoke("plan", config), 2, "acme/gated", "access denied", "HF_TOKEN",
                       "accept its license", f"{fake_hub.endpoint}/acme/gated")  # fmt: skip
        assert "hf_wrong" not in output
    fails(invoke("run", config, tmp_path / "out"), 2, "HF_TOKEN")
    assert not (tmp_path / "out" / "COMPLETE").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ok(invoke("plan", config))


def test_hub_errors_are_one_line(fake_hub, folders, hf_env, tmp_path, monkeypatch):
    fake_hub.add("acme/one", folders["model_1"])
    fake_hub.add("acme/private", folders["model_1"], private=True)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    cases = [
        ("acme/nope", 2, ("no model repository 'acme/nope'", "HF_TOKEN")),
        ("acme/private", 2, ("no model repository 'acme/private'", "private")),
        ("acme/one@no-such-branch", 2, ("has no revision 'no-such-branch'",)),
        ("hf://acme/one@v7", 2, ("has no revision 'v7'",)),
    ]
    for ref, code, fragments in cases:
        config = write_config(tmp_path / "c.yaml", ties(folders["base"], ref, folders["model_2"]))
        fails(invoke("plan", config), code, *fragments)
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", down)
    config = write_config(tmp_path / "c.yaml", ties(folders["base"], "acme/one",
                                                     folders["model_2"]))  # fmt: skip
    fails(invoke("plan", config), 1, "cannot reach the Hugging Face Hub", down,
          "HF_HUB_OFFLINE=1", "--download")  # fmt: skip
    fails(invoke("run", config, tmp_path / "out", "--download"), 1, "cannot reach")
