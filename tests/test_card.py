"""The output is ready to publish: README.md (the model card) and raymerge_config.yml (the
normalized config), as mergekit writes its card and mergekit_config.yml."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from raymerge.card import CARD_FILE, CONFIG_FILE, config_yaml, input_origin, model_card
from raymerge.checkpoint import open_checkpoint
from raymerge.config import load_spec, parse_spec
from raymerge.errors import ConfigError
from raymerge.index import verify
from raymerge.plan import make_plan
from raymerge.runner import RunOptions, run_merge
from tests.conftest import ties_config, write_config

SIZES = {"shard_size": 50_000, "part_size": 8_000}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def everything(spec) -> tuple:
    """What a spec means: its digest-relevant json plus what the run reads beside it."""
    return (spec.to_json(), [m.path for m in spec.inputs], spec.base_input, spec.uses_slices,
            spec.tokenizer_source, spec.resize_vocab, spec.out_dtype, spec.seed,
            spec.shard_size, spec.part_size)  # fmt: skip


def reloaded(spec, tmp_path):
    path = tmp_path / "reloaded" / CONFIG_FILE
    path.parent.mkdir(exist_ok=True)
    path.write_text(config_yaml(spec))
    return load_spec(str(path))


def card_for(spec):
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    plan = make_plan(spec, checkpoints, 1 << 30)
    return model_card(spec, plan, checkpoints, "my-merge"), plan


def merge(spec, out, **options):
    return run_merge(spec, str(out), RunOptions(progress=False, **options), log=lambda _: None)


@pytest.fixture
def base_with_extras(models, tmp_path):
    """The base model with a README.md and a tokenizer file of its own."""
    base = tmp_path / "base_copy"
    shutil.copytree(models["base"], base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# THE INPUT'S OWN CARD\n")
    (base / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return str(base)


def test_card_front_matter_and_sections(models, tmp_path):
    spec = parse_spec(ties_config(models), "c", str(tmp_path), SIZES)
    card, plan = card_for(spec)
    meta = front_matter(card)
    assert set(meta) == {"base_model", "tags", "library_name"}
    assert meta["tags"] == ["merge", "raymerge"] and meta["library_name"] == "transformers"
    assert meta["base_model"] == []  # local paths are no Hub ids (the Hub refuses them)
    assert "# my-merge" in card
    assert "[TIES](https://arxiv.org/abs/2306.01708) merge method using" in card
    assert f"merge method using `{models['base']}` as a base." in card
    assert f"* `{models['base']}` (base): local files, no revision recorded; " in card
    for name in ("model_1", "model_2", "model_3"):
        assert f"* `{models[name]}`: local files, no revision recorded; " in card
    block = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert block == config_yaml(spec).rstrip()
    assert f"digest: `{plan.digest}`" in card and f"{len(plan.tensors)} tensors (bfloat16)" in card


def test_hub_inputs_are_named_with_their_revision(models, tmp_path):
    """A Hugging Face cache snapshot, and a `--local-dir` download's metadata, say which
    repository and commit the files are; nothing is guessed from a name alone."""
    snapshot = tmp_path / "hub" / "models--acme--base-7b" / "snapshots" / COMMIT
    snapshot.parent.mkdir(parents=True)
    os.symlink(models["base"], snapshot)  # the cache links files into snapshots
    local = tmp_path / "acme" / "tuned"
    shutil.copytree(models["model_1"], local)
    meta = local / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text(f'{"f" * 40}\n"etag"\n1700000000.0\n')
    body = ties_config(models)
    body["base_model"] = str(snapshot)
    body["models"][0]["model"] = "acme/tuned"  # relative to the config's folder
    config = write_config(tmp_path / "c.yaml", body)
    spec = load_spec(config, SIZES)
    assert input_origin(spec.inputs[0].path, spec.inputs[0].given).revision == COMMIT
    card, _ = card_for(spec)
    assert front_matter(card)["base_model"] == ["acme/base-7b", "acme/tuned"]
    hub = "https://huggingface.co"
    assert f"using [acme/base-7b]({hub}/acme/base-7b) as a base" in card
    assert f"* [acme/base-7b]({hub}/acme/base-7b) (base): given as `{snapshot}`; revision " \
        f"`{COMMIT}`; " in card  # fmt: skip
    assert f"* [acme/tuned]({hub}/acme/tuned): revision `{'f' * 40}`; " in card
    assert card.count("no revision recorded") == 2  # model_2 and model_3: plain local folders


def slices_config(models) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": models["model_1"],
        "slices": [
            {"sources": [{"model": models["model_1"], "layer_range": [0, 2]},
                         {"model": models["model_2"], "layer_range": [0, 2]}],
             "parameters": {"t": [0.0, 0.5, 1.0]}},
            {"sources": [{"model": models["model_2"], "layer_range": [1, 3]},
                         {"model": models["model_3"], "layer_range": [1, 3]}],
             "base_model": models["model_2"],
             "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}},
        ],
        "tokenizer_source": models["model_3"],
        "out_dtype": "float16",
    }  # fmt: skip


@pytest.mark.parametrize("variant", ["ties", "base_listed", "slices", "tokenizer_base",
                                     "linear_no_base", "overrides"])  # fmt: skip
def test_config_file_loads_back_to_the_same_spec(models, tmp_path, variant):
    body = ties_config(models, normalize=True)
    overrides = dict(SIZES)
    if variant == "base_listed":
        body["models"].insert(1, {"model": models["base"]})
    elif variant == "slices":
        body = slices_config(models)
    elif variant == "tokenizer_base":
        body["tokenizer"] = {"source": "base"}
    elif variant == "linear_no_base":
        body = {"merge_method": "linear", "models": [
            {"model": models["model_2"], "parameters": {"weight": 0.3}},
            {"model": models["model_1"], "parameters": {"weight": [0.1, 0.9]}}],
            "tokenizer_source": models["model_1"], "dtype": "float32"}  # fmt: skip
    elif variant == "overrides":
        body["raymerge"] = {"seed": 5, "part_size": "16KiB"}
        overrides = {"seed": 11, "dtype": "float16", "shard_size": 70_000}
    spec = load_spec(write_config(tmp_path / "c.yaml", body), overrides)
    again = reloaded(spec, tmp_path)
    assert everything(again) == everything(spec)
    assert config_yaml(again) == config_yaml(spec)  # a fixed point


@pytest.mark.ray
def test_a_merge_writes_card_and_config_and_force_replaces_them(
    ray_local, models, base_with_extras, tmp_path
):
    body = ties_config(models)
    body["base_model"] = base_with_extras
    spec = parse_spec(body, "c", str(tmp_path), SIZES)
    out = tmp_path / "out"
    merge(spec, out)
    assert verify(str(out)).problems == []
    card = (out / CARD_FILE).read_text()
    assert "THE INPUT'S OWN CARD" not in card  # an input's README.md is never copied
    assert front_matter(card)["tags"] == ["merge", "raymerge"]
    assert "# out\n" in card  # named after the output folder, as mergekit does
    assert (out / "tokenizer.json").exists()  # tokenizer files are copied as before
    assert everything(load_spec(str(out / CONFIG_FILE))) == everything(spec)
    run = yaml.safe_load((out / "_raymerge" / "run.json").read_text())
    assert {CARD_FILE, CONFIG_FILE} <= set(run["owns"])
    (out / CARD_FILE).write_text("edited by hand\n")
    os.remove(out / CONFIG_FILE)
    merge(spec, out, force=True)  # --force treats both as raymerge's
    assert (out / CARD_FILE).read_text() == card
    assert (out / CONFIG_FILE).read_text() == config_yaml(spec)
    assert verify(str(out)).problems == []


@pytest.mark.ray
def test_no_copy_tokenizer_leaves_the_tokenizer_out(ray_local, models, base_with_extras, tmp_path):
    body = ties_config(models)
    body["base_model"] = base_with_extras
    spec = parse_spec(body, "c", str(tmp_path), SIZES)
    out = tmp_path / "out"
    merge(spec, out, copy_tokenizer=False)
    assert not (out / "tokenizer.json").exists() and (out / "config.json").exists()
    assert (out / CARD_FILE).exists() and verify(str(out)).problems == []


@pytest.mark.ray
def test_a_foreign_readme_is_never_overwritten(ray_local, models, tmp_path):
    """README.md is now a name raymerge writes: a folder raymerge did not write that holds
    one is refused, even with --force."""
    spec = parse_spec(ties_config(models), "c", str(tmp_path), SIZES)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("someone's notes\n")
    with pytest.raises(ConfigError, match="holds README.md, which raymerge did not write"):
        merge(spec, out, force=True)
    assert (out / "README.md").read_text() == "someone's notes\n"
