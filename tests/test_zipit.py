"""ZipIt, permute and RegMean end to end on a local Ray: the calibration stage, the matches,
each tensor rewritten, and the output checked against what it must be.

The exactness tests build model B as a function-preserving permutation of model A (MLP
neurons, whole KV groups and the query heads inside them, the residual stream): permute and
zipit must then give back A byte for byte.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from raymerge.config import load_spec
from raymerge.errors import ConfigError, DataError, MergeFailed
from raymerge.runner import RunOptions, run_merge
from raymerge.synth import SynthOptions, synthesize
from raymerge.zipit import forward
from raymerge.zipit.shape import LlamaShape, layer_tensor_names
from tests.conftest import write_config
from tests.test_run import load_model, merge

LAYERS, HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2, 64, 96, 320, 4, 2
HEAD_DIM = HIDDEN // HEADS


@pytest.fixture(scope="module")
def model_a(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("zipit-a")
    options = SynthOptions(models=1, with_base=False, layers=LAYERS, hidden=HIDDEN,
                           intermediate=INTERMEDIATE, vocab=VOCAB, heads=HEADS,
                           kv_heads=KV_HEADS, seed=11, dtype=torch.float32)  # fmt: skip
    return synthesize(str(out), options)["model_1"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calibration") / "tokens.npy"
    np.save(path, np.random.default_rng(5).integers(0, VOCAB, size=4096))
    return str(path)


def save_model(tensors: dict[str, torch.Tensor], like: str, out) -> str:
    os.makedirs(out, exist_ok=True)
    body = {k: v.contiguous() for k, v in tensors.items()}
    save_file(body, os.path.join(out, "model.safetensors"))
    with open(os.path.join(like, "config.json")) as f:
        config = f.read()
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config)
    return str(out)


def permuted(tensors: dict[str, torch.Tensor], seed: int, residual: bool = True,
             mlp: bool = True, heads: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """The same function with its features in other orders: B's residual dim j is A's
    p[j], layer l's neuron i is A's q_l[i], its query head h is A's sigma_l[h]."""
    rng = np.random.default_rng(seed)
    p = rng.permutation(HIDDEN) if residual else np.arange(HIDDEN)
    out = dict(tensors)
    out["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:, p]
    out["lm_head.weight"] = tensors["lm_head.weight"][:, p]
    out["model.norm.weight"] = tensors["model.norm.weight"][p]
    group = HEADS // KV_HEADS
    for layer in range(LAYERS):
        names = layer_tensor_names(layer)
        q = rng.permutation(INTERMEDIATE) if mlp else np.arange(INTERMEDIATE)
        kv = rng.permutation(KV_HEADS) if heads else np.arange(KV_HEADS)
        sigma = np.concatenate([
            kv[g] * group + (rng.permutation(group) if heads else np.arange(group))
            for g in range(KV_HEADS)
        ])  # fmt: skip
        t = {role: tensors[name] for role, name in names.items()}
        qrows = np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in sigma])
        kvrows = np.concatenate([np.arange(g * HEAD_DIM, (g + 1) * HEAD_DIM) for g in kv])
        new = {
            "input_layernorm": t["input_layernorm"][p],
            "post_attention_layernorm": t["post_attention_layernorm"][p],
            "q_proj": t["q_proj"][qrows][:, p],
            "k_proj": t["k_proj"][kvrows][:, p],
            "v_proj": t["v_proj"][kvrows][:, p],
            "o_proj": t["o_proj"][p][:, qrows],
            "gate_proj": t["gate_proj"][q][:, p],
            "up_proj": t["up_proj"][q][:, p],
            "down_proj": t["down_proj"][p][:, q],
        }
        for role, name in names.items():
            out[name] = new[role]
    return out


def logits_of(tensors: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    shape = LlamaShape(HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, 1e-5,
                       10000.0, None, False)  # fmt: skip
    with torch.no_grad():
        return forward.model_logits(shape, tensors.__getitem__, tokens)


def zip_config(method: str, a: str, b: str, calibration: str, **parameters) -> dict:
    return {
        "merge_method": method,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"calibration": calibration, "calibration_tokens": 2048,
                       "sequence_length": 64, **parameters},
        "dtype": "float32",
    }  # fmt: skip


def run_config(tmp_path, body: dict, out_name: str = "out", **options):
    path = write_config(tmp_path / f"{out_name}.yaml", body)
    spec = load_spec(path)
    summary = merge(spec, tmp_path / out_name, **options)
    return summary, load_model(str(tmp_path / out_name))


def test_permuted_copy_computes_the_same_function(model_a):
    a = load_model(model_a)
    b = permuted(a, seed=1)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits_of(a, tokens), logits_of(b, tokens), atol=1e-5)


@pytest.mark.parametrize("method", ["permute", "zipit"])
def test_a_permuted_copy_merges_back_into_the_original(ray_local, tmp_path, model_a,
                                                       calibration, method):  # fmt: skip
    a = load_model(model_a)
    b_dir = save_model(permuted(a, seed=2), model_a, tmp_path / "b")
    body = zip_config(method, model_a, b_dir, calibration, residual="permute")
    summary, merged = run_config(tmp_path, body, workers=2)
    assert merged.keys() == a.keys()
    for name in a:
        assert torch.equal(merged[name], a[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_attention_heads"] == HEADS


def test_residual_average_with_matched_layers(ray_local, tmp_path, model_a, calibration):
    """A fine-tune-like pair (same residual basis): neurons and heads matched, the residual
    stream averaged, and again A comes back."""
    a = load_model(model_a)
    b_dir = save_model(permuted(a, seed=3, residual=False), model_a, tmp_path / "b")
    _, merged = run_config(tmp_path, zip_config("zipit", model_a, b_dir, calibration))
    for name in a:
        assert torch.equal(merged[name], a[name]), name


def test_bad_calibration_is_refused_before_ray(tmp_path, model_a):
    missing = str(tmp_path / "nope.npy")
    b_dir = save_model(load_model(model_a), model_a, tmp_path / "b")
    body = zip_config("permute", model_a, b_dir, missing)
    path = write_config(tmp_path / "c.yaml", body)
    spec = load_spec(path)
    with pytest.raises(ConfigError, match="nope.npy"):
        merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def calibration_features(tensors: dict[str, torch.Tensor], sequences: np.ndarray) -> list[dict]:
    """Per layer, our forward's input features of every linear layer over the sequences."""
    shape = LlamaShape(HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, 1e-5,
                       10000.0, None, False)  # fmt: skip
    tokens = torch.from_numpy(sequences)
    with torch.no_grad():
        hidden = forward.embed(tensors["model.embed_tokens.weight"], tokens)
        rope = forward.rope_tables(shape, tokens.shape[1])
        layers = []
        for layer in range(LAYERS):
            weights = {r: tensors[n] for r, n in layer_tensor_names(layer).items()}
            hidden, found = forward.layer_forward(shape, weights, hidden, rope)
            layers.append(found)
    return layers


ROLE_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "heads",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp"}  # fmt: skip


def test_regmean_matches_a_least_squares_reference(ray_local, tmp_path, model_a, calibration):
    """With alpha 1, each merged linear weight is the least-squares fit of every model's
    outputs on its own inputs (numpy lstsq over the stacked inputs); other tensors average."""
    a = load_model(model_a)
    rng = torch.Generator().manual_seed(9)
    b = {k: v + 0.05 * torch.randn(v.shape, generator=rng) for k, v in a.items()}
    b_dir = save_model(b, model_a, tmp_path / "b")
    body = zip_config("regmean", model_a, b_dir, calibration, alpha=1.0)
    _, merged = run_config(tmp_path, body)
    sequences = np.load(calibration)[:2048].reshape(-1, 64)
    features = [calibration_features(m, sequences) for m in (a, b)]
    for layer in range(LAYERS):
        for role, name in layer_tensor_names(layer).items():
            if role not in ROLE_INPUT:
                assert torch.allclose(merged[name], (a[name] + b[name]) / 2, atol=1e-6)
                continue
            x = [f[layer][ROLE_INPUT[role]].double().numpy() for f in features]
            y = [xi @ m[name].double().numpy().T for xi, m in zip(x, (a, b))]
            want, *_ = np.linalg.lstsq(np.concatenate(x), np.concatenate(y), rcond=None)
            got = merged[name].double().numpy()
            assert np.abs(got - want.T).max() < 1e-4 * np.abs(want).max(), name


def test_regmean_of_identical_models_is_the_identity(ray_local, tmp_path, model_a, calibration):
    a = load_model(model_a)
    b_dir = save_model(a, model_a, tmp_path / "b")
    _, merged = run_config(tmp_path, zip_config("regmean", model_a, b_dir, calibration))
    for name in a:
        assert torch.allclose(merged[name], a[name], atol=1e-5, rtol=1e-4), name


def test_zipit_regmean_of_a_permuted_copy_is_the_original(ray_local, tmp_path, model_a,
                                                          calibration):  # fmt: skip
    a = load_model(model_a)
    b_dir = save_model(permuted(a, seed=4), model_a, tmp_path / "b")
    body = zip_config("zipit", model_a, b_dir, calibration, residual="permute",
                      combine="regmean")  # fmt: skip
    _, merged = run_config(tmp_path, body)
    for name in a:
        assert torch.allclose(merged[name], a[name], atol=1e-5, rtol=1e-4), name


def test_any_worker_count_gives_the_same_bytes_and_a_rerun_reuses_the_stage(
    ray_local, tmp_path, model_a, calibration, monkeypatch
):
    a = load_model(model_a)
    rng = torch.Generator().manual_seed(1)
    b = permuted({k: v + 0.1 * torch.randn(v.shape, generator=rng) for k, v in a.items()}, 6)
    b_dir = save_model(b, model_a, tmp_path / "b")
    body = zip_config("zipit", model_a, b_dir, calibration, residual="permute", beta=0.5)
    _, one = run_config(tmp_path, body, "one", workers=1)
    # many small units, and the run stopped by a merge error after the stage
    path = write_config(tmp_path / "three.yaml", body)
    spec = load_spec(path, {"shard_size": 60_000, "part_size": 8_000})
    stop_at(monkeypatch, tmp_path, "000003", spec, tmp_path / "three", workers=3)
    lines: list[str] = []
    run_merge(spec, str(tmp_path / "three"), RunOptions(progress=False, workers=3),
              log=lines.append)  # fmt: skip
    assert any("reusing the stored zipit artifact" in line for line in lines), lines
    three = load_model(str(tmp_path / "three"))
    assert one.keys() == three.keys()
    for name in one:
        assert torch.equal(one[name], three[name]), name


def test_merged_checkpoint_loads_with_transformers(ray_local, tmp_path, model_a, calibration):
    transformers = pytest.importorskip("transformers")
    a = load_model(model_a)
    rng = torch.Generator().manual_seed(2)
    b = permuted({k: v + 0.1 * torch.randn(v.shape, generator=rng) for k, v in a.items()}, 8)
    b_dir = save_model(b, model_a, tmp_path / "b")
    body = zip_config("zipit", model_a, b_dir, calibration, residual="permute")
    _, merged = run_config(tmp_path, body)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = model(tokens).logits
    assert torch.allclose(theirs, logits_of(merged, tokens), atol=1e-4)


def plan_of(tmp_path, body: dict):
    from raymerge.checkpoint import open_checkpoint
    from raymerge.plan import make_plan

    path = write_config(tmp_path / "plan.yaml", body)
    spec = load_spec(path)
    return make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])


@pytest.fixture
def model_b(tmp_path, model_a) -> str:
    return save_model(load_model(model_a), model_a, tmp_path / "b")


def test_calibration_formats_give_the_same_sequences(tmp_path, model_a, model_b):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.random.default_rng(1).integers(0, VOCAB, size=700)
    np.save(tmp_path / "ids.npy", ids.reshape(7, 100))
    pq.write_table(pa.table({"input_ids": [ids[:300].tolist(), ids[300:].tolist()]}),
                   tmp_path / "ids.parquet")  # fmt: skip
    plans = [
        plan_of(tmp_path, zip_config("permute", model_a, model_b, str(tmp_path / name),
                                     calibration_tokens=650))  # fmt: skip
        for name in ("ids.npy", "ids.parquet")
    ]
    assert plans[0].stage.fingerprint == plans[1].stage.fingerprint
    assert "10 sequences of 64 tokens" in plans[0].stage.summary
    np.save(tmp_path / "ids.npy", ids[::-1].copy())  # the same file, other tokens
    other = plan_of(tmp_path, zip_config("permute", model_a, model_b, str(tmp_path / "ids.npy"),
                                         calibration_tokens=650))  # fmt: skip
    assert other.digest != plans[0].digest  # another merge: nothing done before is reused


def test_text_calibration_uses_the_first_models_tokenizer(tmp_path, model_a, model_b):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(VOCAB - 1)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 319},
                                           unk_token="[UNK]"))  # fmt: skip
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    first = save_model(load_model(model_a), model_a, tmp_path / "a")
    tokenizer.save(os.path.join(first, "tokenizer.json"))
    (tmp_path / "text.txt").write_text(" ".join(words[i % 50] for i in range(300)))
    plan = plan_of(tmp_path, zip_config("zipit", first, model_b, str(tmp_path / "text.txt")))
    assert "4 sequences of 64 tokens" in plan.stage.summary
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        plan_of(tmp_path, zip_config("zipit", model_b, first, str(tmp_path / "text.txt")))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"calibration": "missing.npy"}, ConfigError,
         "'missing.npy' not found \\(looked for '.*missing.npy' or '.*missing.npy'\\)"),
        ({"calibration": "/nowhere/x.npy"}, ConfigError, "x.npy.*cannot be read"),
        ({"calibration": "big.npy"}, DataError, r"token ids must lie in \[0, 320\)"),
        ({"calibration": "floats.npy"}, DataError, "integer array"),
        ({"calibration": "short.npy"}, ConfigError, "fewer than one sequence"),
        ({"calibration": "junk.parquet"}, DataError, "not a readable Parquet"),
        ({"alpha": 0.0}, ConfigError, "alpha must be above 0"),
        ({"match": ["mlp", "banana"]}, ConfigError, r"not a list of \['mlp', 'attention'\]"),
        ({"beta": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]}, ConfigError,
         "hold for the whole model"),
    ],
)  # fmt: skip
def test_bad_settings_and_data_are_refused_at_plan_time(tmp_path, model_a, model_b, change,
                                                        error, message):  # fmt: skip
    np.save(tmp_path / "big.npy", np.full(200, VOCAB))
    np.save(tmp_path / "floats.npy", np.zeros(200))
    np.save(tmp_path / "short.npy", np.zeros(10, dtype=np.int64))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    parameters = {"calibration": "big.npy"} | change
    body = zip_config("zipit", model_a, model_b, **parameters)
    with pytest.raises(error, match=message):
        plan_of(tmp_path, body)


def test_models_that_are_not_llama_shaped_alike_are_refused(tmp_path, model_a, calibration):
    a = load_model(model_a)
    extra = save_model(a | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(HIDDEN)},
                       model_a, tmp_path / "bias")  # fmt: skip
    with pytest.raises(ConfigError, match="q_proj.bias"):
        plan_of(tmp_path, zip_config("permute", model_a, extra, calibration))
    other = save_model(a, model_a, tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps(config | {"rope_theta": 5e5}))
    with pytest.raises(ConfigError, match="one shape"):
        plan_of(tmp_path, zip_config("permute", model_a, other, calibration))
    (tmp_path / "other" / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="hidden_act"):
        plan_of(tmp_path, zip_config("permute", model_a, other, calibration))


def test_cli_reports_bad_calibration_in_one_line(tmp_path, model_a, model_b):
    from click.testing import CliRunner

    from raymerge.cli import main

    np.save(tmp_path / "big.npy", np.full(200, VOCAB))
    path = write_config(tmp_path / "c.yaml", zip_config("zipit", model_a, model_b, "big.npy"))
    result = CliRunner().invoke(main, ["run", path, str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "token ids must lie in [0, 320)" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["plan", path])
    assert result.exit_code == 1, result.output
    np.save(tmp_path / "big.npy", np.zeros(200, dtype=np.int64))
    result = CliRunner().invoke(main, ["plan", path])
    assert result.exit_code == 0, result.output
    assert "prepare: zipit statistics over 3 sequences of 64 tokens" in result.output


def test_calibration_from_s3(tmp_path, model_a, model_b, s3_bucket):
    from raymerge.storage import s3

    ids = np.random.default_rng(4).integers(0, VOCAB, size=300)
    np.save(tmp_path / "ids.npy", ids)
    s3_bucket.client.upload_file(str(tmp_path / "ids.npy"), s3_bucket.bucket, "calib/ids.npy")
    s3.configure(s3.S3Settings(s3_bucket.endpoint))
    try:
        remote = plan_of(tmp_path, zip_config("permute", model_a, model_b,
                                              s3_bucket.uri("calib/ids.npy")))  # fmt: skip
    finally:
        s3.configure(s3.S3Settings())
    local = plan_of(tmp_path, zip_config("permute", model_a, model_b, str(tmp_path / "ids.npy")))
    assert remote.stage.fingerprint == local.stage.fingerprint


def test_passes_over_windows_of_layers_give_the_same_bytes(ray_local, tmp_path, model_a,
                                                           calibration, monkeypatch):  # fmt: skip
    """A pass per layer (what a large model gets: each item's sums stay small) gives the
    bytes of one pass over every layer, RegMean's Gram matrices included."""
    from raymerge.zipit import stage

    a = load_model(model_a)
    rng = torch.Generator().manual_seed(5)
    b = permuted({k: v + 0.1 * torch.randn(v.shape, generator=rng) for k, v in a.items()}, 9)
    b_dir = save_model(b, model_a, tmp_path / "b")
    body = zip_config("zipit", model_a, b_dir, calibration, residual="permute", beta=0.5,
                      combine="regmean")  # fmt: skip
    assert plan_of(tmp_path, body).stage.settings["window"] == LAYERS
    _, whole = run_config(tmp_path, body, "whole", workers=2)
    monkeypatch.setattr(stage, "PASS_BYTES", 1)
    assert "in passes of 1 layer" in plan_of(tmp_path, body).stage.summary
    _, windows = run_config(tmp_path, body, "windows", workers=2)
    for name in whole:
        assert torch.equal(whole[name], windows[name]), name


@pytest.mark.parametrize("damage", [None, "hidden"])
def test_a_run_stopped_in_a_later_pass_resumes_at_that_pass(
    ray_local, tmp_path, model_a, calibration, monkeypatch, damage
):
    """Stopped in its second pass, a rerun starts at that pass from what the first stored
    (hidden states, matches, residual shares, Gram tiles): nothing of the first pass is
    gathered again, and the bytes equal a run never stopped. A stored file damaged
    meanwhile sends the stage back to its first pass: the same bytes again."""
    from raymerge.zipit import stage

    monkeypatch.setattr(stage, "PASS_BYTES", 1)
    b_dir = noisy_permuted_copy(tmp_path, model_a, 16)
    body = zip_config("zipit", model_a, b_dir, calibration, residual="permute", beta=0.5,
                      combine="regmean")  # fmt: skip
    _, clean = run_config(tmp_path, body, "clean")
    spec = load_spec(write_config(tmp_path / "again.yaml", body))
    out = tmp_path / "again"
    stop_at(monkeypatch, tmp_path, "match-mlp-00001", spec, out)
    assert (out / "_raymerge" / "zipit-pass.json").exists()
    assert not (out / "_raymerge" / "zipit.json").exists()
    if damage:
        next((out / "_raymerge" / "zipit" / "hidden").rglob("*.npy")).unlink()
    lines: list[str] = []
    run_merge(spec, str(out), RunOptions(progress=False), log=lines.append)
    resumed = [line for line in lines if "resuming zipit after pass 1 of 2" in line]
    first_pass = [line for line in lines if "pass 1 of 2)" in line]
    if damage:
        assert not resumed and first_pass, lines
        assert any("missing or damaged" in line for line in lines), lines
    else:
        assert resumed and not first_pass, lines
        assert any("pass 2 of 2)" in line for line in lines), lines
    same_tensors(clean, load_model(str(out)))


def test_a_stored_pass_of_another_window_or_shape_is_not_put_back():
    """A stored pass is put back whole or not at all: passes of another window of layers (or
    a record of another shape) leave the state as it was, and the stage starts over."""
    from raymerge.stages import _resumable, _resumed
    from raymerge.zipit.stage import STAGE

    carried = {"window": 1, "hidden": {"calibration-00000": None}, "matches": {},
               "residual": [[0, {"name": "r", "nbytes": 1, "crc": 0}]], "grams": {}}  # fmt: skip
    for stored in ({"passes": 1, "carry": carried}, {"passes": 1, "carry": {"window": 2}},
                   {"passes": "1", "carry": carried}, {"passes": 2, "carry": carried}):  # fmt: skip
        state = {"settings": {"window": 2}}
        assert not (_resumable(stored, passes=2) and _resumed(STAGE, state, stored))
        assert state == {"settings": {"window": 2}}
    state = {"settings": {"window": 1}}
    stored = {"passes": 1, "carry": carried}
    assert _resumable(stored, passes=2) and _resumed(STAGE, state, stored)
    assert state["residual"] == {0: {"name": "r", "nbytes": 1, "crc": 0}}


def test_zipit_in_a_batch_equals_its_run_alone(ray_local, tmp_path, model_a, calibration):
    """A batch of a zipit and a linear recipe over the same two models: the zipit recipe
    runs its stage through the batch's pool and gives the bytes of its run alone."""
    import yaml

    from raymerge.batch_runner import run_batch

    a = load_model(model_a)
    rng = torch.Generator().manual_seed(6)
    b = permuted({k: v + 0.1 * torch.randn(v.shape, generator=rng) for k, v in a.items()}, 10)
    b_dir = save_model(b, model_a, tmp_path / "b")
    zipped = zip_config("zipit", model_a, b_dir, calibration, residual="permute") | {"name": "z"}
    averaged = {"name": "avg", "merge_method": "linear", "dtype": "float32",
                "models": [{"model": model_a, "parameters": {"weight": 1.0}},
                           {"model": b_dir, "parameters": {"weight": 1.0}}]}  # fmt: skip
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump_all([zipped, averaged], sort_keys=False))
    summary = run_batch(str(path), str(tmp_path / "out"), RunOptions(progress=False, workers=2),
                        {}, log=lambda _: None)  # fmt: skip
    assert not summary.failed, summary.lines()
    _, alone = run_config(tmp_path, {k: v for k, v in zipped.items() if k != "name"}, "alone")
    batched = load_model(str(tmp_path / "out" / "z"))
    for name in alone:
        assert torch.equal(alone[name], batched[name]), name


# ----------------------------------------------------------------------------- bounded stage


def noisy_permuted_copy(tmp_path, model_a, seed: int) -> str:
    a = load_model(model_a)
    rng = torch.Generator().manual_seed(seed)
    b = permuted({k: v + 0.1 * torch.randn(v.shape, generator=rng) for k, v in a.items()}, seed)
    return save_model(b, model_a, tmp_path / "b")


def stop_at(monkeypatch, tmp_path, key: str, spec, out, **options) -> None:
    """Merge `spec` into `out`, stopped by a merge error at the item (or unit) `key`."""
    monkeypatch.setenv("RAYMERGE_FAULT", f"fail:{key}:{tmp_path}")
    with pytest.raises(MergeFailed):
        merge(spec, out, **options)
    monkeypatch.delenv("RAYMERGE_FAULT")


def same_tensors(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for name in one:
        assert torch.equal(one[name], other[name]), name


@pytest.mark.parametrize(("tile", "band", "workers"), [(16, 1, 2), (40, 3, 3), (24, 2, 1)])
def test_any_tile_band_and_worker_count_give_the_same_bytes(ray_local, tmp_path, model_a,
                                                            calibration, monkeypatch, tile,
                                                            band, workers):  # fmt: skip
    """Σxxᵀ cut into tiles of any size, grouped into bands of any number of row tiles per
    item, on any number of workers: the bytes of the stage's defaults (one tile per group
    at these widths, one worker), for every group (zip, heads, residual, RegMean)."""
    from raymerge.zipit import stage

    b_dir = noisy_permuted_copy(tmp_path, model_a, 12)
    body = zip_config("zipit", model_a, b_dir, calibration, residual="permute", beta=0.5,
                      combine="regmean")  # fmt: skip
    _, whole = run_config(tmp_path, body, "whole", workers=1)
    monkeypatch.setattr(stage, "TILE", tile)
    monkeypatch.setattr(stage, "BAND_TILES", band)
    settings = plan_of(tmp_path, body).stage.settings
    assert settings["tile"] == tile and set(settings["band_tiles"].values()) == {band}
    _, cut = run_config(tmp_path, body, "cut", workers=workers)
    same_tensors(whole, cut)


def test_worker_memory_sizes_the_bands_at_llama_3_8b_width():
    """A band of Σxxᵀ row tiles holds as many as --worker-memory allows (at most
    BAND_TILES): at 8B width one 2048-row band of the zip's upper triangle is ~0.6 GiB."""
    from raymerge.layouts import config as layout_config
    from raymerge.zipit import budget, stage

    shape = LlamaShape.from_config(layout_config("llama-3-8b"))
    settings = {"models": 2, "tile": 2048, "needs": {"mlp": ["all"], "heads": ["cross"]}}
    widest = {memory: budget.widest_band(shape, settings, "mlp", 2048, memory, stage.BAND_TILES)
              for memory in (1 << 29, 1 << 30, 3 << 30, None)}  # fmt: skip
    assert widest == {1 << 29: 1, 1 << 30: 1, 3 << 30: 4, None: 4}
    assert budget.gram_bytes(shape, settings, "mlp", 1, 2048) < 1 << 30
    assert budget.gram_bytes(shape, settings, "heads", 4, 2048) < 1 << 30


def test_the_plan_states_the_stage_memory_at_llama_3_8b_width(tmp_path, calibration):
    """`raymerge plan --layout llama-3-8b`: the stage's largest item is the zip's 28672²
    fp64 correlation matrix (6.1 GiB), stated with the bound; under it, refused."""
    from click.testing import CliRunner

    from raymerge.cli import main

    body = zip_config("zipit", "a", "b", calibration, residual="permute") | {"dtype": "bfloat16"}
    path = write_config(tmp_path / "c.yaml", body)
    args = ["plan", path, "--layout", "llama-3-8b", "--worker-memory"]
    result = CliRunner().invoke(main, [*args, "48GiB"])
    assert result.exit_code == 0, result.output
    assert ("prepare memory per worker: at most 6.28 GiB of data (the greedy zip of the mlp "
            "features (28672² fp64 correlations))") in result.output  # fmt: skip
    report = json.loads(CliRunner().invoke(main, [*args, "48GiB", "--json"]).output)
    assert f"{report['stage_worker_bytes'] / (1 << 30):.2f}" == "6.28"
    assert report["peak_worker_bytes"] >= report["stage_worker_bytes"]


def test_a_stage_that_does_not_fit_worker_memory_is_refused_at_plan_time(tmp_path, model_a,
                                                                         model_b, calibration):
    """Planned with less --worker-memory than its largest item needs, the stage is refused
    before Ray starts: one line naming what needs how much and the flag (exit 2)."""
    from click.testing import CliRunner

    from raymerge.cli import main

    body = zip_config("zipit", model_a, model_b, calibration, sequence_length=512,
                      calibration_tokens=4096)  # fmt: skip
    planned = plan_of(tmp_path, body)
    need = planned.stage.worker_bytes
    # the bound Ray is asked to reserve per worker (RunOptions.pool) covers a stage item
    assert planned.peak_worker_bytes() == need > 4 * max(u.io_bytes for u in planned.units)
    path = write_config(tmp_path / "c.yaml", body)
    result = CliRunner().invoke(main, ["plan", path, "--worker-memory", str(need - 1)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "per worker, more than --worker-memory" in lines[0], lines
    assert "raise --worker-memory to at least" in lines[0]
    result = CliRunner().invoke(main, ["plan", path, "--worker-memory", str(need)])
    assert result.exit_code == 0, result.output
    assert "prepare memory per worker: at most" in result.output
    result = CliRunner().invoke(main, ["run", path, str(tmp_path / "out"), "--no-progress",
                                       "--worker-memory", str(need - 1)])  # fmt: skip
    assert result.exit_code == 2 and not (tmp_path / "out").exists(), result.output


MANY_UNITS = {"shard_size": 60_000, "part_size": 8_000}  # a fault can stop a run mid-merge


def gram_files(out) -> list:
    return sorted((out / "_raymerge" / "zipit").rglob("*.npy"))


@pytest.mark.parametrize("damage", ["flipped", "missing", "truncated"])
def test_a_damaged_or_missing_gram_file_is_gathered_again(
    ray_local, tmp_path, model_a, calibration, monkeypatch, damage
):
    """RegMean's Gram matrices are files beside the ledger, named with their size and CRC
    in the artifact; a resumed run rereads them first, and one that is damaged or missing
    sends the stage back to the statistics: the bytes of a clean run, never a crash."""
    b_dir = noisy_permuted_copy(tmp_path, model_a, 13)
    body = zip_config("regmean", model_a, b_dir, calibration)
    _, clean = run_config(tmp_path, body, "clean")
    spec = load_spec(write_config(tmp_path / "again.yaml", body), MANY_UNITS)
    out = tmp_path / "again"
    stop_at(monkeypatch, tmp_path, "000003", spec, out)
    stored = json.loads((out / "_raymerge" / "zipit.json").read_text())
    assert "grams" in stored["value"] and "__array__" not in json.dumps(stored["value"]["grams"])
    files = gram_files(out)
    assert files and all(f.parent.parent.name == "grams" for f in files)
    victim = files[len(files) // 2]
    raw = victim.read_bytes()
    if damage == "flipped":
        victim.write_bytes(raw[:-3] + bytes([raw[-3] ^ 0x10]) + raw[-2:])
    elif damage == "truncated":
        victim.write_bytes(raw[:-16])
    else:
        victim.unlink()
    lines: list[str] = []
    run_merge(spec, str(out), RunOptions(progress=False), log=lines.append)
    assert any("missing or damaged" in line for line in lines), lines
    assert not any("reusing the stored zipit artifact" in line for line in lines), lines
    same_tensors(clean, load_model(str(out)))
    assert victim.read_bytes() == raw


def test_a_rerun_reuses_intact_gram_files_and_force_removes_them(
    ray_local, tmp_path, model_a, calibration, monkeypatch
):
    b_dir = noisy_permuted_copy(tmp_path, model_a, 14)
    body = zip_config("permute", model_a, b_dir, calibration, combine="regmean")
    spec = load_spec(write_config(tmp_path / "c.yaml", body), MANY_UNITS)
    out = tmp_path / "out"
    stop_at(monkeypatch, tmp_path, "000003", spec, out)
    lines: list[str] = []
    run_merge(spec, str(out), RunOptions(progress=False), log=lines.append)
    assert any("reusing the stored zipit artifact" in line for line in lines), lines
    first = load_model(str(out))
    stale = out / "_raymerge" / "zipit" / "grams" / "L09999" / "stale.npy"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an earlier run")
    lines.clear()
    run_merge(spec, str(out), RunOptions(progress=False, force=True), log=lines.append)
    assert not any("reusing" in line for line in lines), lines
    assert not stale.exists() and gram_files(out)
    same_tensors(first, load_model(str(out)))


def test_regmean_to_s3_equals_local(ray_local, tmp_path, model_a, calibration, s3_bucket):
    """RegMean with an S3 output: the Gram matrices go to the bucket beside the ledger (no
    pickle, no JSON), workers read them back per tensor, and the shards equal a local run's."""
    b_dir = noisy_permuted_copy(tmp_path, model_a, 15)
    body = zip_config("zipit", model_a, b_dir, calibration, residual="permute",
                      combine="regmean")  # fmt: skip
    _, local = run_config(tmp_path, body, "local", workers=2)
    spec = load_spec(write_config(tmp_path / "s3.yaml", body))
    options = RunOptions(progress=False, workers=2, s3_endpoint=s3_bucket.endpoint)
    run_merge(spec, s3_bucket.uri("zipped"), options, log=lambda _: None)
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.bucket, Prefix="zipped/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    grams = [k for k in keys if k.startswith("zipped/_raymerge/zipit/grams/")]
    assert grams and all(k.endswith(".npy") for k in grams)
    assert not [k for k in keys if "/features/" in k or "/sums/" in k or "/hidden/" in k]
    for name in local_shards(tmp_path / "local"):
        remote = s3_bucket.client.get_object(Bucket=s3_bucket.bucket, Key=f"zipped/{name}")
        assert remote["Body"].read() == (tmp_path / "local" / name).read_bytes(), name


def local_shards(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
