"""Named layouts and virtual checkpoints: real Llama tensor names and shapes without files,
`raymerge plan --layout`, and merges of thousands of virtual tensors on the local Ray."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from raymerge import layouts
from raymerge.checkpoint import open_checkpoint
from raymerge.cli import main
from raymerge.config import parse_spec
from raymerge.errors import CheckpointError, ConfigError
from raymerge.index import verify
from raymerge.mapping import layer_of
from raymerge.methods.base import MergeInputs
from raymerge.runner import RunOptions, run_merge
from raymerge.storage import open_destination, open_source
from raymerge.storage.virtual import VirtualSource, parse_uri

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 10**9

# (tensors, parameters) of the real checkpoints: Meta-Llama-3-8B, -70B, Llama-3.1-405B
REAL = {
    "llama-3-8b": (291, 8_030_261_248),
    "llama-3-70b": (723, 70_553_706_496),
    "llama-3.1-405b": (1137, 405_853_388_800),
}


# --- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL))
def test_layouts_have_the_real_tensor_counts_and_sizes(name):
    entries = layouts.tensors(name)
    count, parameters = REAL[name]
    assert len(entries) == count == len({n for n, _ in entries})
    assert layouts.parameter_count(name) == parameters
    layout = layouts.LAYOUTS[name]
    shapes = dict(entries)
    h, i, v = layout.hidden, layout.intermediate, layout.vocab
    last = layout.layers - 1
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (v, h)
    assert shapes["model.norm.weight"] == (h,)
    assert shapes[f"model.layers.{last}.input_layernorm.weight"] == (h,)
    assert shapes[f"model.layers.{last}.post_attention_layernorm.weight"] == (h,)
    assert shapes[f"model.layers.{last}.self_attn.q_proj.weight"] == (h, h)
    assert shapes[f"model.layers.{last}.self_attn.o_proj.weight"] == (h, h)
    assert shapes[f"model.layers.{last}.self_attn.v_proj.weight"] == (1024, h)
    assert shapes[f"model.layers.{last}.mlp.gate_proj.weight"] == (i, h)
    assert shapes[f"model.layers.{last}.mlp.up_proj.weight"] == (i, h)
    assert shapes[f"model.layers.{last}.mlp.down_proj.weight"] == (h, i)
    assert f"model.layers.{layout.layers}.mlp.up_proj.weight" not in shapes


def test_real_shapes_of_the_70b():
    shapes = dict(layouts.tensors("llama-3-70b"))
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 8192)
    assert shapes["model.layers.79.mlp.down_proj.weight"] == (8192, 28672)
    assert shapes["model.embed_tokens.weight"] == (128256, 8192)
    config = layouts.config("llama-3-70b")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (80, 8192)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (64, 8)
    assert config["vocab_size"] == 128256 and config["tie_word_embeddings"] is False
    assert layouts.config("llama-3.1-405b")["rope_scaling"]["rope_type"] == "llama3"


def test_scale_keeps_names_and_count_and_divides_widths():
    real = layouts.tensors("llama-3-70b")
    small = layouts.tensors("llama-3-70b", scale=128)
    assert [n for n, _ in real] == [n for n, _ in small]
    for (_, big), (_, tiny) in zip(real, small):
        assert tuple(d // 128 for d in big) == tiny
    config = layouts.config("llama-3-70b", scale=128)
    assert config["hidden_size"] == 64 and config["head_dim"] == 1
    assert config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]
    more = layouts.tensors("llama-3-8b", scale=64, layers=100)
    assert len(more) == 9 * 100 + 3
    with pytest.raises(ConfigError, match="scale"):
        layouts.tensors("llama-3-8b", scale=0)
    with pytest.raises(ConfigError, match="known layouts"):
        layouts.tensors("llama-4")


def test_the_naming_matches_synth():
    """layouts.tensors and synth.llama_tensors write the same checkpoints' names in order."""
    from raymerge.synth import SynthOptions, llama_tensors

    o = SynthOptions(layers=80, hidden=64, intermediate=224, vocab=1002, heads=64, kv_heads=8)
    assert llama_tensors(o) == layouts.tensors("llama-3-70b", scale=128)


def test_virtual_config_swaps_every_model_reference():
    data = {
        "merge_method": "ties",
        "base_model": "models/base",
        "models": [{"model": "models/a", "parameters": {"weight": 1}}, "models/b"],
        "slices": [{"sources": [{"model": "x y"}], "base_model": "models/base"}],
        "tokenizer_source": "base",
    }
    out = layouts.virtual_config(data, "llama-3-8b", 4)
    assert out["base_model"] == "virtual://llama-3-8b/models/base?scale=4"
    assert out["models"][0] == {
        "model": "virtual://llama-3-8b/models/a?scale=4", "parameters": {"weight": 1},
    }  # fmt: skip
    assert out["models"][1] == "virtual://llama-3-8b/models/b?scale=4"
    assert out["slices"][0]["sources"][0]["model"] == "virtual://llama-3-8b/x%20y?scale=4"
    assert out["slices"][0]["base_model"] == out["base_model"]
    assert out["tokenizer_source"] == "base"
    assert data["base_model"] == "models/base"  # the input is left as it was


# --- virtual sources -------------------------------------------------------------------------


def test_a_virtual_checkpoint_opens_like_a_real_one():
    uri = "virtual://llama-3-70b/demo/base"
    checkpoint = open_checkpoint(uri)
    assert len(checkpoint.tensors) == 723 and len(checkpoint.files) == 30
    assert checkpoint.total_bytes == 2 * REAL["llama-3-70b"][1]  # bf16
    for name, shape in layouts.tensors("llama-3-70b"):
        entry = checkpoint.tensors[name]
        assert entry.shape == shape and entry.dtype == "BF16"
    assert max(checkpoint.source.size(f) for f in checkpoint.files) <= 5 * GB + 10**6
    config = checkpoint.read_json("config.json")
    assert config == layouts.config("llama-3-70b")
    index = json.loads(checkpoint.source.read_range(
        "model.safetensors.index.json", 0, checkpoint.source.size("model.safetensors.index.json")
    ))  # fmt: skip
    assert index["metadata"]["total_size"] == checkpoint.total_bytes
    assert set(index["weight_map"]) == set(checkpoint.tensors)


def test_virtual_options_and_their_errors():
    source = open_source("virtual://llama-3-8b/m?scale=16&dtype=float32&shard=100MB&layers=4")
    assert isinstance(source, VirtualSource)
    checkpoint = open_checkpoint(source.root)
    assert len(checkpoint.tensors) == 9 * 4 + 3
    assert {e.dtype for e in checkpoint.tensors.values()} == {"F32"}
    assert checkpoint.tensors["model.embed_tokens.weight"].shape == (128256 // 16, 4096 // 16)
    for bad, message in [
        ("virtual://llama-9/m", "known layouts"),
        ("virtual://llama-3-8b/", "layout and a model"),
        ("virtual://llama-3-8b/m?scale=0", "scale"),
        ("virtual://llama-3-8b/m?scale=x", "scale"),
        ("virtual://llama-3-8b/m?size=3", "unknown option"),
        ("virtual://llama-3-8b/m?dtype=int8", "dtype"),
        ("virtual://llama-3-8b/m?dtype=float8_e4m3fn", "dtype"),
        ("virtual://llama-3-8b/m?shard=-1", "shard"),
        ("virtual://llama-3-8b/m?scale=2&scale=4", "twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_uri(bad)
    with pytest.raises(ConfigError, match="virtual:// destinations are not supported"):
        open_destination("virtual://llama-3-8b/out")
    with pytest.raises(CheckpointError, match="no such file"):
        source.size("weights.bin")
    file = checkpoint.files[0]
    with pytest.raises(CheckpointError, match="file ends at byte"):
        source.read_range(file, source.size(file) - 2, 4)


def test_a_config_may_name_virtual_models(tmp_path):
    config = {
        "merge_method": "linear",
        "models": [
            {"model": "virtual://llama-3-8b/a?scale=64", "parameters": {"weight": 1}},
            {"model": "virtual://llama-3-8b/nope?scale=0", "parameters": {"weight": 1}},
            {"model": "virtual://llama-2/b", "parameters": {"weight": 1}},
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_spec(config, "c.yaml", str(tmp_path))
    assert "models[1].model" in str(info.value) and "scale" in str(info.value)
    assert "models[2].model" in str(info.value) and "known layouts" in str(info.value)
    assert "models[0]" not in str(info.value)


def _digests(uri: str) -> list[str]:
    """sha256 of a few byte ranges of every shard: headers, tensor bytes, across ends."""
    source = open_source(uri)
    digests = []
    for file in sorted(f for f in source.list() if f.endswith(".safetensors")):
        size = source.size(file)
        for start, length in ((0, 4096), (size // 3, 3 << 20), (size - 5000, 5000)):
            digests.append(hashlib.sha256(source.read_range(file, start, length)).hexdigest())
    return digests


def test_bytes_are_the_same_in_every_process():
    uri = "virtual://llama-3-8b/some/model?scale=8&shard=50MB"
    code = (
        "import json, sys; from tests.test_layouts import _digests; "
        "print(json.dumps(_digests(sys.argv[1])))"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONHASHSEED": "123"}
    done = subprocess.run(
        [sys.executable, "-c", code, uri], capture_output=True, text=True, env=env, cwd=ROOT,
        check=True,
    )  # fmt: skip
    assert json.loads(done.stdout) == _digests(uri)
    again = pickle.loads(pickle.dumps(open_source(uri)))
    assert again.root == uri and _digests(again.root) == _digests(uri)
    assert _digests("virtual://llama-3-8b/other/model?scale=8&shard=50MB") != _digests(uri)


def test_the_driver_side_stays_without_torch():
    code = (
        "import sys; from raymerge.checkpoint import open_checkpoint; "
        "c = open_checkpoint('virtual://llama-3.1-405b/m?scale=64'); "
        "f = c.files[0]; c.source.read_range(f, 0, c.source.size(f)); "
        "print(len(c.tensors), 'torch' in sys.modules, 'numpy' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert done.stdout.split() == ["1137", "False", "False"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_values_are_finite_and_models_differ(dtype):
    import torch

    from raymerge.dtypes import torch_dtype

    def tensor(model: str, name: str):
        checkpoint = open_checkpoint(f"virtual://llama-3-8b/{model}?scale=16&dtype={dtype}")
        entry = checkpoint.tensors[name]
        raw = bytearray(checkpoint.source.read_range(entry.file, entry.start, entry.nbytes))
        return torch.frombuffer(raw, dtype=torch_dtype(entry.dtype)).reshape(entry.shape)

    a = tensor("a", "model.embed_tokens.weight")  # 2 MiB: the tiled block wraps around
    assert torch.isfinite(a).all() and a.float().abs().max() < 0.05 and a.float().std() > 0.01
    b = tensor("b", "model.embed_tokens.weight")
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert torch.equal(a, tensor("a", "model.embed_tokens.weight"))


def test_pieces_of_a_read_equal_the_whole():
    source = open_source("virtual://llama-3-8b/m?scale=32")
    file = source.list()[1]
    whole = source.read_range(file, 0, 5 << 20)
    cuts = [0, 3, 8, 100, 1 << 20, (1 << 20) + 7, 3 << 20, 5 << 20]
    pieces = b"".join(source.read_range(file, a, b - a) for a, b in zip(cuts, cuts[1:]))
    assert pieces == whole
    buffer = bytearray(1000)
    source.readinto(file, 12345, memoryview(buffer))
    assert bytes(buffer) == whole[12345:13345]


# --- raymerge plan --layout ------------------------------------------------------------------


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def test_plan_a_70b_ties_merge_without_files():
    config = os.path.join(ROOT, "configs", "ties.yaml")
    result = invoke("plan", "--layout", "llama-3-70b", "--worker-memory", "8GiB", config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    model_bytes = 2 * REAL["llama-3-70b"][1]  # 141.1 GB in bf16
    assert [i["bytes"] for i in report["inputs"]] == [model_bytes] * 4
    assert [i["role"] for i in report["inputs"]] == ["base", "model", "model", "model"]
    assert report["inputs"][0]["path"] == "virtual://llama-3-70b/demo-out/models/base?scale=1"
    assert report["tensors"] == 723
    assert report["bytes_to_read"] == 4 * model_bytes
    headers = report["bytes_to_write"] - model_bytes
    assert 0 < headers < 30 * 100_000  # 30 shards' headers
    assert len(report["shards"]) == 30  # 5 GB shards, as Meta's checkpoint has
    assert report["units"] > report["parts"] > 30
    assert report["split_tensors"]  # the embeddings and MLPs do not fit 8 GiB whole
    assert report["peak_worker_bytes"] <= 8 << 30
    text = invoke("plan", "--layout", "llama-3-70b", "--worker-memory", "8GiB", config)
    assert text.exit_code == 0, text.output
    assert "tensors: 723" in text.output and "shards: 30" in text.output
    assert "bytes to read: 525.67 GiB" in text.output  # 4 x 141.1 GB
    assert "bytes to write: 131.42 GiB" in text.output
    assert f"work units: {report['units']} " in text.output
    assert "virtual://llama-3-70b/demo-out/models/model_3?scale=1" in text.output


def test_plan_a_405b_at_a_scale_and_refusals():
    config = os.path.join(ROOT, "configs", "linear.yaml")
    result = invoke("plan", "--layout", "llama-3.1-405b", "--scale", "16", config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tensors"] == 1137
    assert report["bytes_to_read"] == 3 * 2 * layouts.parameter_count("llama-3.1-405b", 16)
    real = invoke("plan", "--layout", "llama-3.1-405b", "--worker-memory", "16GiB", config)
    assert real.exit_code == 0 and "bytes to read: 2.21 TiB" in real.output
    assert invoke("plan", "--scale", "4", config).exit_code == 2
    assert invoke("plan", "--layout", "gpt-5", config).exit_code == 2
    small = invoke("plan", "--layout", "llama-3-70b", "--worker-memory", "16MiB", config)
    assert small.exit_code == 2 and "raise --worker-memory" in small.output


def test_plan_a_70b_zipit_merge_splits_only_the_vocabulary_tensors(tmp_path):
    """ZipIt cannot cut a layer's tensors (their rows move), but the embeddings and lm_head
    (only their columns move) split by rows; a tensor that may not be cut stays whole in one
    write part instead of being refused for spanning several."""
    calibration = tmp_path / "calibration.npy"
    np.save(calibration, np.arange(4096) % 256)
    body = yaml.safe_load(open(os.path.join(ROOT, "configs", "zipit.yaml")))
    body["parameters"]["calibration"] = str(calibration)
    config = tmp_path / "zipit.yaml"
    config.write_text(yaml.safe_dump(body))
    args = ("plan", "--layout", "llama-3-70b", "--worker-memory", "40GiB", "--part-size", "5MiB")
    result = invoke(*args, config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert sorted(report["split_tensors"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert report["whole_only"] == report["merged_tensors"] - 2
    text = invoke(*args, config)
    assert "(721 of 723 merged tensors cannot be split: each must fit whole)" in text.output
    tight = invoke("plan", "--layout", "llama-3-70b", "--worker-memory", "2GiB", config)
    assert tight.exit_code == 2
    assert "tensor 'model.layers.0.mlp.down_proj.weight' [8192, 28672] needs" in tight.output
    assert "zipit cannot split a tensor" in tight.output and "raise --worker-memory" in tight.output


# --- merges on the local Ray -------------------------------------------------------------------


def virtual_spec(tmp_path, layout: str, query: str, weights=(0.5, 0.3, 0.2), **overrides):
    config = {
        "merge_method": "linear",
        "models": [
            {"model": f"virtual://{layout}/m{k}?{query}", "parameters": {"weight": w}}
            for k, w in enumerate(weights)
        ],
        "dtype": "bfloat16",
    }
    return parse_spec(config, "virtual.yaml", str(tmp_path), overrides)


def merge(spec, out, **options):
    options = RunOptions(progress=False, worker_memory=64 << 20, **options)
    return run_merge(spec, str(out), options, log=lambda _: None)


def reference(spec, name: str):
    """The tensor merged in memory, from the virtual sources' bytes, by the method itself."""
    import torch

    from raymerge.dtypes import torch_dtype

    inputs = []
    for model in spec.inputs:
        checkpoint = open_checkpoint(model.path)
        e = checkpoint.tensors[name]
        raw = bytearray(checkpoint.source.read_range(e.file, e.start, e.nbytes))
        inputs.append(torch.frombuffer(raw, dtype=torch_dtype(e.dtype)).reshape(e.shape))
    layer = layer_of(name)
    shared, per_input = spec.resolve(0, name, [name] * len(inputs), 0.0 if layer is None else 0.5)
    merged = spec.method.merge(MergeInputs(name, inputs, None, shared, per_input, spec.seed))
    return merged.to(inputs[0].dtype)


@pytest.mark.ray
def test_merge_of_virtual_70b_models_one_unit_per_tensor(ray_local, tmp_path):
    """The 70B's 723 tensors (widths / 128), each its own write part and unit, 8 shards."""
    import torch

    from raymerge import open as open_output

    spec = virtual_spec(tmp_path, "llama-3-70b", "scale=128", part_size=1, shard_size=200_000)
    out = tmp_path / "out"
    summary = merge(spec, out, workers=2)
    plan = summary.plan
    assert len(plan.tensors) == len(plan.units) == summary.units_done == 723
    assert len(plan.shards) > 5
    assert verify(str(out)).problems == []
    assert (out / "COMPLETE").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 80
    merged = open_output(str(out))
    for name in ("model.embed_tokens.weight", "model.layers.41.mlp.down_proj.weight",
                 "model.layers.79.self_attn.k_proj.weight", "model.norm.weight"):  # fmt: skip
        assert torch.equal(merged[name], reference(spec, name)), name


@pytest.mark.ray
def test_merge_schedules_thousands_of_virtual_units(ray_local, tmp_path):
    """The 70B's tensor kinds with 240 layers: 2,163 units through the pool and ledger."""
    spec = virtual_spec(
        tmp_path, "llama-3-70b", "scale=128&layers=240", weights=(1.0, 1.0),
        part_size=1, shard_size=250_000,
    )  # fmt: skip
    out = tmp_path / "out"
    summary = merge(spec, out, workers=2)
    units = len(summary.plan.units)
    assert units == summary.units_done == 9 * 240 + 3
    records = [json.loads(p.read_text()) for p in (out / "_raymerge" / "units").iterdir()]
    assert len(records) < units / 16  # tiny units travel (and are recorded) in batches
    assert sum(len(r.get("records", [r])) for r in records) == units
    report = verify(str(out))
    assert report.problems == [] and report.tensors == units
    assert report.shards == len(summary.plan.shards) > 10
    assert summary.bytes_written == sum(s.size for s in summary.plan.shards)
    headers = sum(len(s.header) for s in summary.plan.shards)
    assert summary.bytes_read == 2 * (summary.bytes_written - headers)  # two inputs per byte


@pytest.mark.ray
def test_batched_records_resume(ray_local, tmp_path):
    """A run cut short after its batches were recorded resumes from them; a torn batch
    record means its units' shards are redone, nothing else."""
    import shutil

    spec = virtual_spec(
        tmp_path, "llama-3-70b", "scale=128&layers=80", weights=(1.0, 1.0),
        part_size=1, shard_size=250_000,
    )  # fmt: skip
    out = tmp_path / "out"
    first = merge(spec, out, workers=2)
    shutil.copytree(out, tmp_path / "whole")
    for name in ("COMPLETE", "tensors.parquet", "model.safetensors.index.json"):
        (out / name).unlink()  # as if the driver died after the last unit
    victim = max((out / "_raymerge" / "units").iterdir(), key=lambda p: p.stat().st_size)
    torn = {r["shard"] for r in json.loads(victim.read_text())["records"]}
    victim.write_text(victim.read_text()[:100])
    again = merge(spec, out, workers=2)
    # a committed shard missing a unit's record is rewritten whole; the others are kept
    redone = sum(u.shard in torn for u in first.plan.units)
    assert again.units_done == redone < len(first.plan.units) / 2
    assert again.units_resumed == len(first.plan.units) - redone
    for name in sorted(os.listdir(tmp_path / "whole")):
        if name.endswith((".safetensors", ".parquet", ".json")):
            assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
