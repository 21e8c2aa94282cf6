"""Bad input as a new user hits it: one clear error line (what, where, what to do), exit 2 for
usage/config problems and 1 for data problems, never a traceback or an "internal error".

Everything here runs without Ray: `plan`, `inspect` and `verify` read headers and indexes only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import threading
import time
import zlib

import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from raymerge import index as index_module
from raymerge.checkpoint import open_checkpoint
from raymerge.cli import main
from raymerge.config import load_spec, parse_spec
from raymerge.errors import CheckpointError, ConfigError, shown
from raymerge.index import TENSOR_INDEX, TENSOR_SCHEMA, table_bytes, verify
from raymerge.ray_cluster import check_address, ray_session
from raymerge.safetensors_format import read_header
from raymerge.storage import check_writable_destination, open_destination, open_source
from raymerge.storage.local import LocalSource
from tests.conftest import write_config

MAX_MESSAGE = 1200  # no message may quote an unbounded value


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def fails(result, code: int, *fragments: str) -> str:
    """The CLI exited with `code` and printed one line naming every fragment."""
    output = result.output.strip()
    assert isinstance(result.exception, SystemExit), (result.exception, output)
    assert result.exit_code == code, output
    assert "Traceback" not in output and "internal error" not in output, output
    assert len(output.splitlines()) == 1 and output.startswith("error: "), output
    assert len(output) < MAX_MESSAGE, output[:500]
    for fragment in fragments:
        assert fragment in output, output
    return output


def linear_config(*paths: str) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths],
    }


def plan_of(tmp_path, body_or_text) -> object:
    path = tmp_path / "c.yaml"
    if isinstance(body_or_text, dict):
        write_config(path, body_or_text)
    elif isinstance(body_or_text, bytes):
        path.write_bytes(body_or_text)
    else:
        path.write_text(body_or_text)
    return invoke("plan", path)


def raw_safetensors(path, header: dict | bytes, data: bytes = b"") -> str:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return str(path)


# --- 1. YAML configs ----------------------------------------------------------------------


def test_duplicate_top_level_key_names_key_and_lines(models, tmp_path):
    text = (
        f"merge_method: linear\nmodels:\n  - model: {models['model_1']}\n"
        "    parameters: {weight: 1.0}\nmerge_method: ties\n"
    )
    fails(plan_of(tmp_path, text), 2, "'merge_method' appears twice", "line 1", "line 5")


def test_duplicate_nested_key(models, tmp_path):
    text = (
        f"merge_method: linear\nmodels:\n  - model: {models['model_1']}\n"
        "    parameters:\n      weight: 1.0\n      weight: 0.5\n"
    )
    fails(plan_of(tmp_path, text), 2, "'weight' appears twice", "line 5", "line 6")


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("merge_method: linear\n1: x\nmodels: []\n", ("key '1' at line 2", "integer")),
        ("merge_method: linear\nraymerge: {1: 2, seed: 3}\n", ("key '1'", "not a string")),
        ("merge_method: linear\n? [a, b]\n: x\n", ("a list is used as a key", "line 2")),
        ("merge_method: linear\n? {a: 1}\n: x\n", ("a mapping is used as a key",)),
        ("merge_method: linear\nnull: 3\n", ("key 'null'", "null")),
    ],
)
def test_non_string_keys_exit_2(tmp_path, text, fragments):
    fails(plan_of(tmp_path, text), 2, *fragments)


def test_mixed_keys_in_a_dict_are_a_config_error(models, tmp_path):
    body = linear_config(models["model_1"])
    body.update({1: "x", ("a",): "y", "raymerge": {2: 1, "bogus": 3}})
    body["models"][0][7] = "z"
    with pytest.raises(ConfigError, match="unknown"):
        parse_spec(body, "c", str(tmp_path))


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):  # 10**10 values once expanded
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("merge_method: *a9")
    started = time.monotonic()
    fails(plan_of(tmp_path, "\n".join(lines) + "\n"), 2, "aliases", "100000 values")
    assert time.monotonic() - started < 10


def test_recursive_alias_is_refused(tmp_path):
    fails(plan_of(tmp_path, "merge_method: &a [*a]\n"), 2, "recursive")


def test_small_aliases_still_work(models, tmp_path):
    text = (
        "merge_method: linear\nmodels:\n"
        f"  - model: {models['model_1']}\n    parameters: &p {{weight: 1.0}}\n"
        f"  - model: {models['model_2']}\n    parameters: *p\n"
    )
    result = plan_of(tmp_path, text)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "body",
    [
        {"merge_method": ["x"] * 20_000},
        {"merge_method": "linear", "models": [{"model": "m" * 50_000}]},
        {"merge_method": "linear", "dtype": {"k": "v" * 50_000}},
        {"merge_method": "linear", "models": [{"model": "a", "layer_range": [0] * 9999}]},
        {"merge_method": "linear", "raymerge": {"seed": "s" * 50_000, "shard_size": "9" * 999}},
    ],
    ids=["method", "model-path", "dtype", "unknown-key", "raymerge-section"],
)
def test_messages_never_quote_unbounded_values(tmp_path, body):
    result = plan_of(tmp_path, body)
    assert result.exit_code == 2
    assert "internal error" not in result.output and "Traceback" not in result.output
    for line in result.output.splitlines():
        assert len(line) < 700, line[:300]


def test_absurd_layer_range_fails_fast(models, tmp_path):
    body = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": models["model_1"], "layer_range": [0, 10**10]}]}],
    }
    started = time.monotonic()
    fails(plan_of(tmp_path, body), 2, "layer_range", "goes past the 3 layers")
    assert time.monotonic() - started < 10


def test_absurd_declared_layer_count_is_not_trusted(models, tmp_path):
    folder = shutil.copytree(models["model_1"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 10**10}))
    body = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(folder), "layer_range": [0, 10**10]}]}],
    }
    started = time.monotonic()
    fails(plan_of(tmp_path, body), 2, "goes past the 3 layers")
    assert time.monotonic() - started < 10


def test_absurd_layer_index_in_a_header_fails_fast(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    tensors = {"model.layers.0.w": torch.zeros(2), f"model.layers.{10**10}.w": torch.zeros(2)}
    save_file(tensors, str(folder / "model.safetensors"))
    body = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(folder), "layer_range": [0, 10**10]}]}],
    }
    started = time.monotonic()
    fails(plan_of(tmp_path, body), 1, str(folder), "layer 10000000000", "not plausible")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "content, code, fragments",
    [
        ("", 2, ("is empty",)),
        ("# only a comment\n", 2, ("is empty",)),
        ("- merge_method: linear\n", 2, ("must be a YAML mapping", "a list")),
        ("just words\n", 2, ("must be a YAML mapping", "a single string")),
        ("merge_method: linear\n---\nmerge_method: ties\n", 2, ("more than one YAML document",)),
        (bytes(range(256)) * 4, 2, ("not UTF-8 text",)),
        (b"merge_method: linear\x00\n", 2, ("NUL bytes",)),
        ("merge_method: linear\x07\n", 2, ("not allowed in YAML",)),
        ("merge_method: " + "[" * 100_000 + "]" * 100_000 + "\n", 2, ("nested too deeply",)),
        ("merge_method: linear\nraymerge: {seed: " + "9" * 5000 + "}\n", 2, ("cannot be read",)),
        (b"a: 1\n" * 300_000, 2, ("too large for a merge config",)),
    ],
    ids=[
        "empty", "comment", "list", "scalar", "multi-document", "binary", "nul", "control-char",
        "deep", "huge-int", "huge-file",
    ],
)  # fmt: skip
def test_unusable_config_files(tmp_path, content, code, fragments):
    fails(plan_of(tmp_path, content), code, *fragments)


def test_config_path_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_spec(str(tmp_path))
    result = invoke("plan", tmp_path)  # click's own usage error
    assert result.exit_code == 2 and "is a directory" in result.output


# --- 2. checkpoint headers ----------------------------------------------------------------


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header, data, fragment",
    [
        (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nested too deeply"),
        ({"a": _entry(shape=[-1, 2])}, b"\0" * 8, "non-negative integers"),
        ({"a": _entry(shape=[2**62, 2**62], offsets=[0, 16])}, b"\0" * 16, "not plausible"),
        ({"a": _entry(shape=[1] * 9, offsets=[0, 4])}, b"\0" * 4, "not plausible"),
        ({"a": _entry(shape=[0, 2**62], offsets=[0, 0])}, b"", "not plausible"),
        ({"a": _entry(shape=[2**20, 2**20], offsets=[0, 16])}, b"\0" * 16, "needs"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,' + b"9" * 5000 + b"]}}", b"", "JSON"),
        ({"a" * 5000: _entry()}, b"\0" * 8, "not plausible"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{}}', b"\0" * 8, "twice"),
        ({"a": _entry(dtype="F8_E8M0")}, b"\0" * 8, "quantized"),
    ],
    ids=[
        "deep", "negative", "huge-dims", "too-many-dims", "huge-empty", "product-past-file",
        "huge-int", "long-name", "duplicate-name", "unknown-fp8-flavour",
    ],
)  # fmt: skip
def test_hostile_headers_exit_1(tmp_path, header, data, fragment):
    path = raw_safetensors(tmp_path / "x.safetensors", header, data)
    output = fails(invoke("inspect", path), 1, fragment, "x.safetensors")
    with pytest.raises(CheckpointError):
        read_header(LocalSource(str(tmp_path)), "x.safetensors")
    assert len(output) < 700


def test_folder_named_like_a_shard_inside_a_checkpoint(tmp_path):
    folder = tmp_path / "m"
    (folder / "model-00001-of-00002.safetensors").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model-00002-of-00002.safetensors"))
    fails(invoke("inspect", folder), 1, "model-00001-of-00002.safetensors", "not a regular file")


def test_index_pointing_at_a_folder(models, tmp_path):
    folder = shutil.copytree(models["model_1"], tmp_path / "m")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = next(iter(weight_map.values()))
    os.remove(folder / shard)
    (folder / shard).mkdir()
    fails(invoke("inspect", folder), 1, shard, "not a file")


def test_folder_given_as_a_safetensors_path(tmp_path):
    folder = tmp_path / "model-00001-of-00002.safetensors"
    folder.mkdir()
    fails(invoke("inspect", folder), 2, "is a folder, not a .safetensors file")


def test_non_safetensors_file_given(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    fails(invoke("inspect", tmp_path / "pytorch_model.bin"), 2, "not a .safetensors file")


def test_fp8_checkpoints_are_refused_with_the_reason(models, tmp_path):
    folder = tmp_path / "fp8"
    folder.mkdir()
    tensors = {"model.layers.0.mlp.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}
    tensors["model.layers.0.mlp.weight_scale_inv"] = torch.ones(1)
    save_file(tensors, str(folder / "model.safetensors"))
    save_file(
        {k: torch.zeros(v.shape) for k, v in tensors.items()}, str(tmp_path / "b.safetensors")
    )
    result = plan_of(tmp_path, linear_config(str(tmp_path / "b.safetensors"), str(folder)))
    fails(result, 2, "'model.layers.0.mlp.weight'", "model.safetensors", "FP8", "scale")
    assert invoke("inspect", folder).exit_code == 0  # looking is fine; merging is refused


# --- 3. the reference model's config.json -------------------------------------------------


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"num_hidden_layers": 3,', "not valid JSON"),
        ("[1, 2, 3]", "must be a JSON object"),
        ("\xff\xfe", "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
    ],
    ids=["truncated", "list", "binary", "deep"],
)
def test_malformed_config_json_stops_the_plan(models, tmp_path, content, fragment):
    folder = shutil.copytree(models["model_1"], tmp_path / "m")
    (folder / "config.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    result = plan_of(tmp_path, linear_config(str(folder), models["model_2"]))
    fails(result, 1, str(folder / "config.json"), fragment)
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(str(folder))


def test_oversized_config_json(models, tmp_path, monkeypatch):
    monkeypatch.setattr("raymerge.checkpoint.MAX_SIDE_FILE_BYTES", 100)
    folder = shutil.copytree(models["model_1"], tmp_path / "m")
    with pytest.raises(CheckpointError, match="too large"):
        open_checkpoint(str(folder))


def test_absent_config_json_is_fine(models, tmp_path):
    folder = shutil.copytree(models["model_1"], tmp_path / "m")
    os.remove(folder / "config.json")
    checkpoint = open_checkpoint(str(folder))
    assert checkpoint.read_json("config.json") is None
    assert open_checkpoint(models["model_1"]).read_json("config.json")["num_hidden_layers"] == 3


# --- 4. verify treats tensors.parquet as untrusted ----------------------------------------


def crafted_output(folder) -> list[dict]:
    """A small valid merge output made by hand (no Ray): one shard, its index, COMPLETE."""
    folder.mkdir()
    shard = "model-00001-of-00001.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    save_file(tensors, str(folder / shard))
    entries, _ = read_header(LocalSource(str(folder)), shard)
    data = (folder / shard).read_bytes()
    rows = [
        {
            "name": e.name,
            "shard": shard,
            "dtype": e.dtype,
            "shape": list(e.shape),
            "start": e.start,
            "end": e.end,
            "checksum": f"{zlib.crc32(data[e.start : e.end]):08x}",
            "layer": None,
            "method": "linear",
            "sources": ["x"],
        }
        for e in entries.values()
    ]
    write_index(folder, rows)
    (folder / "COMPLETE").write_text("{}\n")
    return rows


def write_index(folder, rows: list[dict], schema: pa.Schema = TENSOR_SCHEMA) -> None:
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    (folder / TENSOR_INDEX).write_bytes(table_bytes(pa.table(columns, schema=schema)))


def test_crafted_output_verifies(tmp_path):
    crafted_output(tmp_path / "out")
    report = verify(str(tmp_path / "out"))
    assert report.problems == [] and report.tensors == 2 and report.bytes_checked == 40
    assert invoke("verify", tmp_path / "out").exit_code == 0


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"shard": "../model-00001-of-00001.safetensors"}, "not a plain"),
        ({"shard": "/etc/passwd"}, "not a plain"),
        ({"shard": "sub/x.safetensors"}, "not a plain"),
        ({"shard": "COMPLETE"}, "not a plain"),
        ({"start": -5}, "byte range"),
        ({"start": 100, "end": 50}, "byte range"),
        ({"start": None}, "byte range"),
        ({"name": None}, "name is empty"),
        ({"shape": [3, 2]}, "[2, 3] in the shard's header but 'F32' [3, 2]"),
        ({"dtype": "BF16"}, "F32 [2, 3] in the shard's header but 'BF16'"),
        ({"end": 10**12}, "not where the index says"),
        ({"checksum": "0" * 10_000}, "checksum"),
    ],
)
def test_tampered_rows_are_reported(tmp_path, change, fragment):
    out = tmp_path / "out"
    rows = crafted_output(out)
    rows[0].update(change)
    write_index(out, rows)
    problems = verify(str(out)).problems
    assert any(fragment in p for p in problems), problems
    assert all(len(p) < 700 for p in problems)
    result = invoke("verify", out)
    assert result.exit_code == 1 and "internal error" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")


def test_tensor_the_index_does_not_list_is_reported(tmp_path):
    out = tmp_path / "out"
    rows = crafted_output(out)
    write_index(out, rows[:1])
    assert any("does not list" in p for p in verify(str(out)).problems)


@pytest.mark.parametrize("column", ["start", "shard", "checksum"])
def test_missing_column_is_a_checkpoint_error(tmp_path, column):
    out = tmp_path / "out"
    rows = crafted_output(out)
    schema = pa.schema([f for f in TENSOR_SCHEMA if f.name != column])
    write_index(out, rows, schema)
    with pytest.raises(CheckpointError, match=f"column '{column}' is missing"):
        verify(str(out))
    fails(invoke("verify", out), 1, TENSOR_INDEX, f"'{column}' is missing")


def test_wrong_column_type_is_a_checkpoint_error(tmp_path):
    out = tmp_path / "out"
    rows = [r | {"start": str(r["start"])} for r in crafted_output(out)]
    fields = [pa.field("start", pa.string()) if f.name == "start" else f for f in TENSOR_SCHEMA]
    write_index(out, rows, pa.schema(fields))
    fails(invoke("verify", out), 1, "column 'start' has type string, expected int64")


@pytest.mark.parametrize(
    "content", [b"", b"not parquet at all", b"PAR1" + os.urandom(200) + b"PAR1"]
)
def test_unreadable_tensor_index(tmp_path, content):
    out = tmp_path / "out"
    crafted_output(out)
    (out / TENSOR_INDEX).write_bytes(content)
    fails(invoke("verify", out), 1, TENSOR_INDEX, "not a readable Parquet file")


def test_oversized_tensor_index(tmp_path, monkeypatch):
    out = tmp_path / "out"
    crafted_output(out)
    monkeypatch.setattr(index_module, "MAX_TENSOR_INDEX_BYTES", 10)
    with pytest.raises(CheckpointError, match="too large"):
        verify(str(out))


def test_verify_a_file_or_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    fails(invoke("verify", tmp_path / "f"), 1, "not a folder")
    fails(invoke("verify", tmp_path / "nothing"), 1, "not a folder")


# --- 5. storage: URIs and unwritable destinations -----------------------------------------


@pytest.mark.parametrize("uri", ["gs://b/o", "ftp://org/model", "http://x/y"])
def test_other_uri_schemes_are_not_supported(uri):
    scheme = uri.split(":")[0]
    with pytest.raises(ConfigError, match=f"{scheme}:// destinations are not supported"):
        open_destination(uri)
    with pytest.raises(ConfigError, match=f"{scheme}:// sources are not supported"):
        open_source(uri)
    with pytest.raises(ConfigError, match="not supported"):
        check_writable_destination(uri)
    with pytest.raises(ConfigError, match="not supported"):
        open_checkpoint(uri)
    fails(invoke("inspect", uri), 2, uri, "not supported")
    fails(invoke("verify", uri), 2, uri, "not supported")
    assert not os.path.exists(uri.split("/")[0])


def test_other_remote_model_in_a_config(models, tmp_path):
    result = plan_of(tmp_path, linear_config("gs://bucket/model", models["model_1"]))
    fails(result, 2, "models[0].model", "gs:// models are not supported")


def test_writable_destination_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path / "file", "is an existing file"),
        (tmp_path / "file" / "sub" / "out", "is not a folder"),
        ("/proc/self/raymerge-out", "cannot be created under '/proc/self'"),
        ("/proc/raymerge-out", "cannot be created under '/proc'"),
        ("/sys/raymerge-out", "cannot be created under '/sys'"),
        ("", "empty"),
    ]
    for path, fragment in cases:
        with pytest.raises(ConfigError, match=fragment):
            check_writable_destination(str(path))
    check_writable_destination(str(tmp_path / "new" / "deeper"))
    check_writable_destination(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["file"]  # the probe leaves nothing behind


# --- 6. --address where no Ray answers ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_closed_port_fails_fast(scheme):
    address = f"{scheme}127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"--address {address}: no Ray cluster answers"):
        with ray_session(address):
            pass
    assert time.monotonic() - started < 20


def test_silent_listener_fails_within_the_timeout():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        accepted = []
        thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
        thread.start()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConfigError, match="not a Ray cluster"):
            check_address(address, timeout_s=1.0)
        assert time.monotonic() - started < 5
        for conn, _ in accepted:
            conn.close()


@pytest.mark.parametrize("address", ["garbage", "host:99999", "host:port", "a b:1"])
def test_malformed_address(address):
    with pytest.raises(ConfigError, match="not a Ray address"):
        check_address(address)


def test_shown_is_bounded():
    assert shown("x" * 10) == "'xxxxxxxxxx'"
    assert len(shown(["y"] * 100_000)) <= 200
