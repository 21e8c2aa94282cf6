"""Config checking: every problem reported at once, with its YAML path and the fix."""

from __future__ import annotations

import pytest

from raymerge.config import load_spec, parse_spec
from raymerge.errors import ConfigError
from tests.conftest import ties_config, write_config


def parse(body, tmp_path):
    return parse_spec(body, "cfg.yaml", str(tmp_path))


def resolve(spec, name, t):
    return spec.resolve(0, name, [name] * len(spec.slices[0].sources), t)


def problems(body, tmp_path) -> str:
    with pytest.raises(ConfigError) as info:
        parse(body, tmp_path)
    assert info.value.exit_code == 2
    return str(info.value)


def test_valid_ties_config(models, tmp_path):
    spec = parse(ties_config(models), tmp_path)
    assert spec.method.name == "ties"
    assert spec.base_input == 0 and len(spec.inputs) == 4
    assert [s.input for s in spec.slices[0].sources] == [1, 2, 3, 0]
    assert spec.slices[0].base == 3
    assert spec.out_dtype == "BF16"


def test_unknown_method_lists_choices(models, tmp_path):
    body = ties_config(models) | {"merge_method": "tie"}
    message = problems(body, tmp_path)
    assert "unknown merge method 'tie'" in message and "linear" in message


def test_all_problems_reported_together(models, tmp_path):
    body = ties_config(models)
    body["models"][0]["parameters"]["density"] = 1.5
    body["models"][1]["parameters"]["normalize"] = True
    body["models"][2]["model"] = str(tmp_path / "missing")
    body["normalize"] = True
    body["parameters"] = {"lamda": 1}
    message = problems(body, tmp_path)
    assert "5 problems" in message
    assert "models[0].parameters.density: 1.5 is outside [0, 1]" in message
    assert "models[1].parameters.normalize" in message and "top-level `parameters:`" in message
    assert "models[2].model" in message and "not found" in message
    assert "normalize: unknown top-level key; method parameters go under `parameters:`" in message
    assert "parameters.lamda: unknown parameter 'lamda'" in message


@pytest.mark.parametrize("density", [-0.1, 1.01, "abc", [0.5, 2.0]])
def test_density_out_of_range(models, tmp_path, density):
    body = ties_config(models)
    body["models"][0]["parameters"]["density"] = density
    assert "density" in problems(body, tmp_path)


@pytest.mark.parametrize("weights", [[0.5, -0.5], [0.0, 0.0]])
def test_linear_bad_weights_with_normalize(models, tmp_path, weights):
    body = {
        "merge_method": "linear",
        "models": [
            {"model": models["model_1"], "parameters": {"weight": weights[0]}},
            {"model": models["model_2"], "parameters": {"weight": weights[1]}},
        ],
    }
    message = problems(body, tmp_path)
    assert "normalize" in message
    body["parameters"] = {"normalize": False}
    parse(body, tmp_path)  # without normalize the same weights are fine


def test_missing_weight_and_base(models, tmp_path):
    body = {"merge_method": "ties", "models": [{"model": models["model_1"]}]}
    message = problems(body, tmp_path)
    assert "needs a base model" in message and "needs 'weight'" in message


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: ties\nmodels:\n  - model: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML syntax error at line"):
        load_spec(str(path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(str(tmp_path / "none.yaml"))


def test_relative_paths_resolve_against_config_folder(models, tmp_path):
    import os

    body = ties_config(models)
    root = os.path.dirname(models["base"])
    body["base_model"] = "base"
    for i, entry in enumerate(body["models"]):
        entry["model"] = f"model_{i + 1}"
    spec = load_spec(write_config(os.path.join(root, "c.yaml"), body))
    assert spec.inputs[spec.base_input].path == models["base"]


def test_parameter_resolution_filters_and_gradients(models, tmp_path):
    body = ties_config(models)
    body["models"][0]["parameters"]["weight"] = [
        {"filter": "self_attn", "value": [0.0, 1.0]},
        {"value": 0.5},
    ]
    body["parameters"] = {"density": 0.25, "lambda": [1.0, 3.0]}
    del body["models"][1]["parameters"]["density"]
    spec = parse(body, tmp_path)
    shared, per = resolve(spec, "model.layers.1.self_attn.q_proj.weight", 0.5)
    assert shared["lambda"] == 2.0
    assert per[0]["weight"] == 0.5 and per[1]["density"] == 0.25 and per[3] == {}
    _, per = resolve(spec, "model.layers.1.mlp.up_proj.weight", 0.5)
    assert per[0]["weight"] == 0.5
    _, per = resolve(spec, "model.layers.2.self_attn.q_proj.weight", 1.0)
    assert per[0]["weight"] == 1.0


def test_filter_without_fallback_is_a_plan_time_error(models, tmp_path):
    body = ties_config(models)
    body["models"][0]["parameters"]["weight"] = [{"filter": "mlp", "value": 1.0}]
    spec = parse(body, tmp_path)
    with pytest.raises(ConfigError, match="no value of 'weight' applies to tensor"):
        resolve(spec, "model.embed_tokens.weight", 0.0)


def test_raymerge_section_and_overrides(models, tmp_path):
    body = ties_config(models) | {"raymerge": {"seed": 3, "shard_size": "1MB"}}
    spec = parse_spec(body, "c", str(tmp_path), {"part_size": "8MiB", "dtype": "float32"})
    assert (spec.seed, spec.shard_size, spec.part_size, spec.out_dtype) == (
        3,
        10**6,
        8 * 2**20,
        "F32",
    )
    body["raymerge"] = {"seed": -1, "colour": 1}
    message = problems(body, tmp_path)
    assert "raymerge.colour" in message and "raymerge.seed" in message
