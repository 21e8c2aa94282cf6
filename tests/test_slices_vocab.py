"""Frankenmerges with `slices:`/`layer_range`, and vocabularies cut or padded to the base."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymerge.checkpoint import open_checkpoint
from raymerge.config import parse_spec
from raymerge.errors import ConfigError
from raymerge.plan import make_plan
from raymerge.runner import RunOptions, run_merge
from tests.test_run import load_model

pytestmark = pytest.mark.ray


def merge(spec, out):
    return run_merge(spec, str(out), RunOptions(progress=False, workers=2), log=lambda _: None)


def plan_of(spec):
    return make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])


def test_passthrough_frankenmerge_renumbers_layers(ray_local, models, tmp_path):
    body = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": models["model_1"], "layer_range": [0, 2]}]},
            {"sources": [{"model": models["model_2"], "layer_range": [1, 3]}]},
        ],
        "dtype": "bfloat16",
    }
    spec = parse_spec(body, "c", str(tmp_path))
    merge(spec, tmp_path / "out")
    out = load_model(str(tmp_path / "out"))
    a, b = load_model(models["model_1"]), load_model(models["model_2"])
    suffix = "mlp.down_proj.weight"
    assert torch.equal(out[f"model.layers.0.{suffix}"], a[f"model.layers.0.{suffix}"])
    assert torch.equal(out[f"model.layers.1.{suffix}"], a[f"model.layers.1.{suffix}"])
    assert torch.equal(out[f"model.layers.2.{suffix}"], b[f"model.layers.1.{suffix}"])
    assert torch.equal(out[f"model.layers.3.{suffix}"], b[f"model.layers.2.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])  # post-weights: last slice
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])
    assert len([n for n in out if n.endswith(suffix)]) == 4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4


def test_ties_slices_with_slice_parameters_and_gradient(models, tmp_path):
    body = {
        "merge_method": "ties",
        "base_model": models["base"],
        "slices": [
            {
                "sources": [
                    {"model": models["base"], "layer_range": [0, 3]},
                    {
                        "model": models["model_1"],
                        "layer_range": [0, 3],
                        "parameters": {"weight": [0.0, 1.0]},
                    },
                    {"model": models["model_2"], "layer_range": [0, 3]},
                ],
                "parameters": {"density": 0.5, "weight": 0.25},
            }
        ],
    }
    spec = parse_spec(body, "c", str(tmp_path))
    plan = plan_of(spec)
    by_name = {t.name: t for t in plan.tensors}
    middle = by_name["model.layers.1.mlp.up_proj.weight"]
    assert middle.per_input[1]["weight"] == 0.5 and middle.per_input[2]["weight"] == 0.25
    assert middle.per_input[0] == {} and middle.base == 0  # the base takes no weight
    assert by_name["model.embed_tokens.weight"].per_input[1]["weight"] == 0.0  # t = 0 outside
    assert plan.num_layers == 3


@pytest.mark.parametrize(
    "slices, message",
    [
        ([{"sources": [{"model": "M1", "layer_range": [0, 9]}]}], "goes past the 3 layers"),
        (
            [
                {
                    "sources": [
                        {"model": "M1", "layer_range": [0, 2]},
                        {"model": "M2", "layer_range": [0, 1]},
                    ]
                }
            ],
            "different numbers of layers",
        ),
    ],
)
def test_bad_layer_ranges(models, tmp_path, slices, message):
    for entry in slices:
        for source in entry["sources"]:
            source["model"] = models["model_1" if source["model"] == "M1" else "model_2"]
    spec = parse_spec(
        {"merge_method": "linear", "slices": slices, "parameters": {"weight": 1.0}},
        "c",
        str(tmp_path),
    )
    with pytest.raises(ConfigError, match=message):
        plan_of(spec)


def test_layer_range_syntax_checked_with_config(models, tmp_path):
    body = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": models["model_1"], "layer_range": [3, 1]}]}],
    }
    with pytest.raises(ConfigError, match=r"slices\[0\].sources\[0\].layer_range"):
        parse_spec(body, "c", str(tmp_path))


def resized_copy(models, tmp_path, role, rows) -> str:
    """A copy of a model whose embedding and lm_head have `rows` rows."""
    folder = tmp_path / f"{role}-{rows}"
    shutil.copytree(models[role], folder)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                t = tensors[name]
                extra = torch.full((max(rows - t.shape[0], 0), t.shape[1]), 0.5, dtype=t.dtype)
                tensors[name] = torch.cat([t[:rows], extra])
        save_file(tensors, str(shard), {"format": "pt"})
    os.remove(folder / "model.safetensors.index.json")
    return str(folder)


def test_vocab_rows_follow_the_base(ray_local, models, tmp_path):
    bigger = resized_copy(models, tmp_path, "model_1", 330)
    smaller = resized_copy(models, tmp_path, "model_2", 300)
    body = {
        "merge_method": "task_arithmetic",
        "base_model": models["base"],
        "models": [
            {"model": bigger, "parameters": {"weight": 1.0}},
            {"model": smaller, "parameters": {"weight": 1.0}},
        ],
        "tokenizer_source": "base",
        "dtype": "float32",
    }
    spec = parse_spec(body, "c", str(tmp_path))
    merge(spec, tmp_path / "out")
    out = load_model(str(tmp_path / "out"))
    base, a, b = load_model(models["base"]), load_model(bigger), load_model(smaller)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == base[name].shape == (320, 64)
        padded_b = torch.cat([b[name], base[name][300:]])  # missing rows: no change from base
        want = (
            base[name].float()
            + (a[name][:320].float() - base[name].float())
            + (padded_b.float() - base[name].float())
        )
        torch.testing.assert_close(out[name], want)


def test_vocab_mismatch_without_tokenizer_source_is_refused(models, tmp_path):
    bigger = resized_copy(models, tmp_path, "model_1", 330)
    body = {
        "merge_method": "linear",
        "models": [
            {"model": models["model_2"], "parameters": {"weight": 1.0}},
            {"model": bigger, "parameters": {"weight": 1.0}},
        ],
    }
    spec = parse_spec(body, "c", str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=r"vocabulary sizes differ: tensor "
        r"'lm_head.weight' has shape \[320, 64\] .* but \[330, 64\]",
    ):
        plan_of(spec)
