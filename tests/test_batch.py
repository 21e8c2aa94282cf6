"""`raymerge batch`: recipes from mergekit-multi files, grids and combinations; each recipe's
output equals `raymerge run` of that recipe alone; inputs are read once; a failing recipe
does not stop the others; a rerun resumes."""

from __future__ import annotations

import filecmp
import os

import pytest
import yaml
from click.testing import CliRunner

from raymerge.batch import load_batch
from raymerge.batch_runner import dry_run, recipe_outputs, recipe_spec, run_batch
from raymerge.checkpoint import open_checkpoint
from raymerge.cli import main
from raymerge.config import parse_spec
from raymerge.errors import ConfigError
from raymerge.plan import make_plan
from raymerge.runner import RunOptions, run_merge
from raymerge.storage import s3
from raymerge.synth import SynthOptions, synthesize
from tests.test_s3 import s3_files

SIZES = {"shard_size": 300_000, "part_size": 64 << 10}


def write_batch(path, documents: list[dict]) -> str:
    with open(path, "w") as f:
        yaml.safe_dump_all(documents, f, sort_keys=False)
    return str(path)


def linear(models, name="lin", **extra) -> dict:
    return {
        "name": name,
        "merge_method": "linear",
        "models": [
            {"model": models["model_1"], "parameters": {"weight": 1.0}},
            {"model": models["model_2"], "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
        **extra,
    }


def ties(models, name="ties", **extra) -> dict:
    return {
        "name": name,
        "merge_method": "ties",
        "base_model": models["base"],
        "models": [
            {"model": models["model_1"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": models["model_2"], "parameters": {"weight": 0.7, "density": 0.3}},
        ],
        "dtype": "bfloat16",
        **extra,
    }


def sweep(models) -> list[dict]:
    """A linear weight grid, a TIES density grid, and a stage 2 over a grid's output."""
    stage2 = {
        "name": "stage2",
        "merge_method": "linear",
        "models": [
            {"model": "lin-weight=0.5", "parameters": {"weight": 0.5}},
            {"model": models["model_3"], "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
    }
    return [
        linear(models, grid={"models.1.parameters.weight": [0.2, 0.5]}),
        ties(models, grid={"parameters.density": [0.3, 0.8]}),
        stage2,
    ]


def alone(batch_path: str, name: str, prefix: str, out: str, **options) -> None:
    """The recipe run by itself with run_merge (its stage-2 models read `prefix`)."""
    recipes = load_batch(batch_path)
    recipe = next(r for r in recipes if r.name == name)
    spec = recipe_spec(batch_path, recipe, recipe_outputs(prefix, recipes), SIZES)
    run_merge(spec, out, RunOptions(progress=False, workers=2, **options), log=lambda _: None)


def shard_names(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder)
                  if n.endswith((".safetensors", ".parquet", ".json")))  # fmt: skip


def same_output(a, b) -> bool:
    names = shard_names(a)
    return names == shard_names(b) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names
    )


# --- reading batch files -----------------------------------------------------------------


def test_mergekit_multi_documents_grids_and_combinations(models, tmp_path):
    pairs = {
        "name": "pair", "merge_method": "linear", "dtype": "bfloat16",
        "parameters": {"weight": 1.0},
        "combinations": {"models": [models["model_1"], models["model_2"], models["model_3"]],
                         "k": 2},
    }  # fmt: skip
    path = write_batch(tmp_path / "b.yaml", [*sweep(models), pairs])
    recipes = load_batch(path)
    names = [r.name for r in recipes]
    assert names == [
        "lin-weight=0.2", "lin-weight=0.5", "ties-density=0.3", "ties-density=0.8",
        "pair-model_1+model_2", "pair-model_1+model_3", "pair-model_2+model_3", "stage2",
    ]  # fmt: skip
    by_name = {r.name: r for r in recipes}
    assert by_name["lin-weight=0.2"].config["models"][1]["parameters"]["weight"] == 0.2
    assert by_name["ties-density=0.8"].config["parameters"]["density"] == 0.8
    assert "grid" not in by_name["ties-density=0.8"].config
    assert [m for m in by_name["pair-model_1+model_3"].config["models"]] == [
        models["model_1"], models["model_3"]]
    assert by_name["stage2"].needs == ("lin-weight=0.5",) and by_name["stage2"].stage == 1
    assert {r.stage for r in recipes if r.name != "stage2"} == {0}


def test_tokenizer_sources_that_name_recipes_are_stages(tmp_path):
    from raymerge.batch import with_outputs

    first = {"name": "base", "merge_method": "linear", "models": ["m1", "m2"]}
    second = {"name": "second", "merge_method": "linear", "models": ["m1", "m2"],
              "tokenizer": {"source": "union",
                            "tokens": {"<x>": {"source": "base"},
                                       "<y>": {"source": {"kind": "model_token",
                                                          "model": "base", "token": "a"}}}}}
    third = {"name": "third", "merge_method": "linear", "models": ["m1", "m2"],
             "tokenizer_source": "base"}  # the keyword, not the recipe
    recipes = {r.name: r for r in load_batch(write_batch(tmp_path / "b.yaml",
                                                         [first, second, third]))}
    assert recipes["second"].needs == ("base",) and recipes["third"].needs == ()
    swapped = with_outputs(recipes["second"].config, {"base": "/out/base"})
    assert swapped["tokenizer"]["source"] == "union"
    assert swapped["tokenizer"]["tokens"]["<x>"]["source"] == "/out/base"
    assert swapped["tokenizer"]["tokens"]["<y>"]["source"]["model"] == "/out/base"
    assert with_outputs(third, {"base": "/out/base"})["tokenizer_source"] == "base"


@pytest.mark.parametrize(
    "documents, fragment",
    [
        ([{"merge_method": "linear"}], "needs a `name:`"),
        ([{"name": "a b", "merge_method": "linear"}], "needs a `name:`"),
        ([{"name": "a", "merge_method": "linear"}, {"name": "a", "merge_method": "ties"}],
         "two recipes are named"),
        ([{"name": "a", "models": [{"model": "b"}]}, {"name": "b", "models": [{"model": "a"}]}],
         "in a cycle"),
        ([{"name": "a", "models": [{"model": "a"}]}], "names itself"),
        ([{"name": "a", "grid": {"parameters.weight": 0.5}}], "non-empty list"),
        ([{"name": "a", "models": [], "grid": {"models.3.parameters.weight": [1]}}],
         "not a position"),
        ([{"name": "a", "combinations": {"models": ["x", "y"], "k": 3}}], "from 1 to 2"),
        ([[1, 2]], "must be a merge config"),
    ],
)  # fmt: skip
def test_bad_batch_files_are_refused(tmp_path, documents, fragment):
    path = write_batch(tmp_path / "b.yaml", documents)
    with pytest.raises(ConfigError, match=fragment.replace("`", ".").replace("(", ".")):
        load_batch(path)


def test_cli_batch_file_errors_exit_2(tmp_path):
    path = write_batch(tmp_path / "b.yaml", [{"merge_method": "linear"}])
    result = CliRunner().invoke(main, ["batch", path, str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "needs a `name:`" in result.output
    assert not os.path.exists(tmp_path / "out")


def test_cutting_for_shared_reads_keeps_the_layout_and_the_digest(models, tmp_path):
    from raymerge.plan import cut_for_shared_reads

    spec = parse_spec(linear(models), "l", str(tmp_path), {"shard_size": 10_000_000})
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    whole = make_plan(spec, checkpoints)
    memory = 3 * max(t.memory_per_row() * t.rows for t in whole.tensors)  # a few per unit
    plan = make_plan(spec, checkpoints, memory)
    shared = {t.name: 3 * t.input_bytes_per_row() for t in plan.tensors}
    recut = cut_for_shared_reads(plan, spec, shared)
    assert (recut.digest, recut.shards, recut.parts) == (plan.digest, plan.shards, plan.parts)
    assert len(recut.units) > len(plan.units)  # each unit now holds three times the inputs
    assert recut.peak_worker_bytes() <= memory


def test_dry_run_lists_recipes_and_bytes_read_once(models, tmp_path):
    path = write_batch(tmp_path / "b.yaml", sweep(models))
    lines = dry_run(path, str(tmp_path / "out"), RunOptions(), SIZES)
    text = "\n".join(lines)
    assert "stage 1: lin-weight=0.2" in text and "stage 2: stage2" in text
    assert "after lin-weight=0.5" in text
    spec = parse_spec(ties(models), "t", str(tmp_path), SIZES)
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    from raymerge.sizes import human

    # the TIES recipes read base + model_1 + model_2, which the linear ones read a part of
    assert lines[-1].startswith(f"reads {human(plan.bytes_to_read)} once")
    assert not os.path.exists(tmp_path / "out")


# --- running batches -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(models, tmp_path_factory, ray_local):
    """The sweep, run once as a batch."""
    folder = tmp_path_factory.mktemp("batch")
    path = write_batch(folder / "b.yaml", sweep(models))
    summary = run_batch(path, str(folder / "out"), RunOptions(progress=False, workers=2),
                        SIZES, log=lambda _: None)  # fmt: skip
    return path, folder, summary


def test_each_recipe_equals_its_run_alone(swept, tmp_path):
    """Run one by one, in stage order (stage 2 reads the lone run of its stage-1 recipe),
    every recipe gives the batch's bytes."""
    path, folder, summary = swept
    assert summary.failed == []
    for name in ["lin-weight=0.2", "lin-weight=0.5", "ties-density=0.3", "ties-density=0.8",
                 "stage2"]:  # fmt: skip
        alone(path, name, str(tmp_path), str(tmp_path / name))
        batch, solo = folder / "out" / name, tmp_path / name
        if name == "stage2":  # its tensors.parquet names its inputs, which live elsewhere
            assert shard_names(batch) == shard_names(solo)
            assert all(filecmp.cmp(batch / n, solo / n, shallow=False)
                       for n in shard_names(batch) if n.endswith(".safetensors"))  # fmt: skip
        else:
            assert same_output(batch, solo), name
        assert os.path.exists(batch / "COMPLETE")


def test_inputs_are_read_once(swept, models):
    path, folder, summary = swept
    recipes = load_batch(path)
    outputs = recipe_outputs(str(folder / "out"), recipes)

    def plan_of(name):
        spec = recipe_spec(path, next(r for r in recipes if r.name == name), outputs, SIZES)
        return make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])

    # stage 1 reads what one TIES recipe reads (base, model_1, model_2: the linear recipes'
    # models among them), stage 2 what it reads alone
    once = plan_of("ties-density=0.3").bytes_to_read + plan_of("stage2").bytes_to_read
    assert summary.bytes_read == once
    separate = sum(plan_of(r.name).bytes_to_read for r in recipes)
    assert summary.bytes_separate == separate > 2 * once


def test_rerun_skips_complete_recipes(swept):
    path, folder, _ = swept
    summary = run_batch(path, str(folder / "out"), RunOptions(progress=False, workers=2),
                        SIZES, log=lambda _: None)  # fmt: skip
    assert {r.status for r in summary.runs} == {"complete"}
    assert summary.bytes_read == 0


def test_a_failing_recipe_leaves_the_others_complete(models, tmp_path, ray_local, monkeypatch):
    bad = linear(models, name="bad")
    bad["models"][0]["parameters"]["weight"] = "heavy"  # refused when planned
    after_bad = linear(models, name="after")
    after_bad["models"][1]["model"] = "bad"
    documents = [linear(models, name="good"), bad, after_bad, ties(models, name="t")]
    path = write_batch(tmp_path / "b.yaml", documents)
    # a merge error in one of t's units (raised by the worker, not retried)
    monkeypatch.setenv("RAYMERGE_FAULT", f"fail:t/000000:{tmp_path}")
    result = CliRunner().invoke(main, ["batch", path, str(tmp_path / "out"), "--workers", "2",
                                       "--no-progress", "--shard-size", "300KB"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "3 of 4 recipe(s) did not finish: bad, t, after" in result.output
    assert "injected merge error on t/000000" in result.output
    assert "reads recipe bad, which did not finish" in result.output
    assert os.path.exists(tmp_path / "out" / "good" / "COMPLETE")
    assert not os.path.exists(tmp_path / "out" / "t" / "COMPLETE")
    assert not os.path.exists(tmp_path / "out" / "bad")
    # fixed (the fault fires once): the rerun resumes t, skips good, still refuses bad
    result = CliRunner().invoke(main, ["batch", path, str(tmp_path / "out"), "--workers", "2",
                                       "--no-progress", "--shard-size", "300KB"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "good: already complete, skipped" in result.output
    assert "t: merged" in result.output
    assert "2 of 4 recipe(s) did not finish: bad, after" in result.output
    solo = tmp_path / "solo"
    spec = parse_spec(ties(models, name="t"), "t", str(tmp_path), {"shard_size": 300_000})
    run_merge(spec, str(solo), RunOptions(progress=False, workers=2), log=lambda _: None)
    assert same_output(tmp_path / "out" / "t", solo)


def test_rerun_resumes_the_recorded_units_of_a_failed_recipe(models, tmp_path, ray_local,
                                                            monkeypatch):  # fmt: skip
    path = write_batch(tmp_path / "b.yaml", [ties(models, name="t")])
    sizes = {"shard_size": 100_000, "part_size": 16 << 10}
    clean = run_batch(path, str(tmp_path / "clean"), RunOptions(progress=False, workers=2),
                      sizes, log=lambda _: None)  # fmt: skip
    units = clean.runs[0].plan.units
    assert len(units) >= 8
    last = units[-1].key  # a shard's small tail: among the last items to run
    monkeypatch.setenv("RAYMERGE_FAULT", f"fail:t/{last}:{tmp_path}")
    args = ["batch", path, str(tmp_path / "out"), "--workers", "2", "--no-progress",
            "--shard-size", "100KB", "--part-size", "16KiB"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert f"injected merge error on t/{last}" in result.output
    records = os.listdir(tmp_path / "out" / "t" / "_raymerge" / "units")
    recorded = len([n for n in records if n.endswith(".json") and not n.startswith(".")])
    assert recorded >= 1
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"t: merged ({len(units) - recorded} units merged, {recorded} resumed)" in result.output
    assert same_output(tmp_path / "out" / "t", tmp_path / "clean" / "t")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, str]:
    """Vocab-heavy models: 40,000-row embeddings span three reduction blocks."""
    out = tmp_path_factory.mktemp("wide")
    options = SynthOptions(models=2, with_base=True, layers=1, hidden=64, intermediate=96,
                           vocab=40_000, shard_size=8_000_000, seed=3)  # fmt: skip
    return synthesize(str(out), options)


def test_split_tensors_and_prepare_stages_in_a_batch(wide, tmp_path, ray_local):
    """A memory bound that cuts the vocab tensors into row ranges: TIES's split tensors get
    their facts from a prepare stage per recipe, and the bytes still equal runs alone."""
    models = wide
    documents = [linear(models, grid={"models.1.parameters.weight": [0.3]}),
                 ties(models, grid={"parameters.density": [0.4]})]  # fmt: skip
    path = write_batch(tmp_path / "b.yaml", documents)
    spec = parse_spec(ties(models), "t", str(tmp_path), SIZES)
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    tensor = next(t for t in plan.tensors if t.name == "lm_head.weight")
    memory = 2 * tensor.memory_per_row() * tensor.block_rows  # room for the shared inputs
    options = RunOptions(progress=False, workers=2, worker_memory=memory)
    summary = run_batch(path, str(tmp_path / "out"), options, SIZES, log=lambda _: None)
    assert summary.failed == []
    assert any(r.plan.split_tensors() for r in summary.runs)
    for run in summary.runs:
        out = tmp_path / "alone" / run.recipe.name
        alone(path, run.recipe.name, str(tmp_path / "out"), str(out))
        assert same_output(tmp_path / "out" / run.recipe.name, out), run.recipe.name


def test_batch_to_s3_equals_local(models, swept, s3_bucket, tmp_path):
    path, folder, _ = swept
    prefix = s3_bucket.uri("sweep")
    options = RunOptions(progress=False, workers=2, s3_endpoint=s3_bucket.endpoint)
    s3.configure(s3.S3Settings(s3_bucket.endpoint))
    sizes = {**SIZES, "part_size": 5 << 20}
    summary = run_batch(path, prefix, options, sizes, log=lambda _: None)
    assert summary.failed == []
    for run in summary.runs:
        if run.recipe.needs:
            continue  # its inputs are S3 outputs, so its card names other paths
        local = tmp_path / run.recipe.name
        alone(path, run.recipe.name, str(folder / "out"), str(local))
        remote = s3_files(s3_bucket, f"sweep/{run.recipe.name}")
        assert remote and all(
            open(local / n, "rb").read() == data for n, data in remote.items()
            if n.endswith(".safetensors")
        ), run.recipe.name  # fmt: skip
