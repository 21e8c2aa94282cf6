"""Opening checkpoints in every HF layout, and refusing unsafe or broken ones."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from raymerge.checkpoint import open_checkpoint
from raymerge.errors import CheckpointError, ConfigError


def test_sharded_with_index(models):
    ckpt = open_checkpoint(models["base"])
    assert len(ckpt.files) > 1
    assert "model.layers.2.mlp.down_proj.weight" in ckpt.tensors


def test_single_model_safetensors_without_index(tmp_path):
    save_file({"a": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(str(tmp_path))
    assert list(ckpt.tensors) == ["a"] and ckpt.files == ["model.safetensors"]


def test_single_file_path(tmp_path):
    save_file({"a": torch.ones(3)}, str(tmp_path / "weights.safetensors"))
    ckpt = open_checkpoint(str(tmp_path / "weights.safetensors"))
    assert ckpt.tensors["a"].file == "weights.safetensors"


def test_index_pointing_outside_is_refused(tmp_path, models):
    folder = tmp_path / "evil"
    shutil.copytree(models["base"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../x.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({name: torch.ones(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        open_checkpoint(str(folder))


@pytest.mark.parametrize("target", ["/etc/passwd", "a/../../x.safetensors", "", "C:/x"])
def test_index_unsafe_names(tmp_path, target):
    save_file({"a": torch.ones(1)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": target}})
    )
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        open_checkpoint(str(tmp_path))


def test_index_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "gone.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(str(tmp_path))


def test_truncated_shard(tmp_path, models):
    folder = tmp_path / "cut"
    shutil.copytree(models["model_1"], folder)
    shard = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))[0]
    size = os.path.getsize(folder / shard)
    with open(folder / shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(str(folder))


def test_missing_and_pickle_only(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="pickle"):
        open_checkpoint(str(tmp_path))
