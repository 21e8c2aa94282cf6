"""`tokenizer_source: union` and mergekit's `tokenizer:` block: embedding and lm_head rows
matched by token string, the union vocabulary, its tokenizer files, `tokens:` overrides and
`pad_to_multiple_of`, checked against slow references that look each token up by hand."""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil

import pytest
import torch
from click.testing import CliRunner
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from raymerge.card import config_yaml
from raymerge.checkpoint import open_checkpoint
from raymerge.cli import main
from raymerge.config import load_spec, parse_spec
from raymerge.errors import CheckpointError, ConfigError
from raymerge.mapping import layer_of
from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from raymerge.plan import make_plan
from raymerge.runner import RunOptions, run_merge
from raymerge.synth import SynthOptions, synthesize
from raymerge.tokenizer import union_order
from tests import reference
from tests.conftest import write_config
from tests.test_run import load_model

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
SPECIALS = ["<unk>", "<s>", "</s>"]


def make_tokenizer(words: list[str], added: list[tuple[str, bool]]) -> str:
    """A WordLevel tokenizer.json: `words` as its model vocabulary (ids in order), the three
    specials as special added tokens, then `added` (content, special) appended."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    for content, special in added:
        tok.add_tokens([AddedToken(content, special=special, normalized=not special)])
    return tok.to_str()


def make_model(root, name: str, rows: int, seed: int, tokenizer: str | None) -> str:
    """A synthetic Llama checkpoint with `rows` vocab rows (config.json vocab_size) and the
    tokenizer.json given."""
    options = SynthOptions(models=1, with_base=False, layers=2, hidden=64, intermediate=96,
                           vocab=rows, shard_size=2_000_000, seed=seed)  # fmt: skip
    folder = synthesize(str(root / f"synth-{name}"), options)["model_1"]
    target = root / name
    shutil.move(folder, target)
    if tokenizer is not None:
        (target / "tokenizer.json").write_text(tokenizer)
    return str(target)


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict[str, str]:
    """base, a and b: overlapping and distinct tokens, tokens at other ids, added tokens
    (one an ordinary token of another model), and b's last added token past its vocab_size."""
    root = tmp_path_factory.mktemp("union")
    w = [f"w{i}" for i in range(40)]
    base = make_tokenizer(SPECIALS + w, [("<|base_extra|>", True)])  # 44 tokens
    a = make_tokenizer(
        SPECIALS + w[:30][::-1] + [f"a{i}" for i in range(10)],
        [("<|im_start|>", True), ("<|im_end|>", True), ("shared_tok", False)],
    )
    b = make_tokenizer(SPECIALS + w[10:] + [f"b{i}" for i in range(8)] + ["a3", "a4", "shared_tok"],
                       [("<|im_start|>", True), ("<|b_special|>", True)])  # fmt: skip
    paths = {
        "base": make_model(root, "base", 44, 1, base),
        "a": make_model(root, "a", 46, 2, a),
        "b": make_model(root, "b", 45, 3, b),  # 46 tokens: <|b_special|> has no row
    }
    base_dir = root / "base"
    (base_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages }}",
        "added_tokens_decoder": {}, "tokenizer_class": "PreTrainedTokenizerFast",
    }))  # fmt: skip
    (base_dir / "special_tokens_map.json").write_text('{"bos_token": "<s>"}\n')
    return paths


# --- slow references -----------------------------------------------------------------------


def tokenizer_of(path: str) -> Tokenizer:
    return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))


def limited_vocab(path: str) -> dict[str, int]:
    """The model's token -> id for ids below config.json's vocab_size."""
    limit = json.loads(open(os.path.join(path, "config.json")).read())["vocab_size"]
    return {t: i for t, i in tokenizer_of(path).get_vocab(with_added_tokens=True).items()
            if i < limit}  # fmt: skip


def added_of(path: str) -> list[tuple[int, str]]:
    limit = json.loads(open(os.path.join(path, "config.json")).read())["vocab_size"]
    data = json.loads(open(os.path.join(path, "tokenizer.json")).read())
    return [(e["id"], e["content"]) for e in data["added_tokens"] if e["id"] < limit]


def slow_union(paths: list[str], extra: list[str]) -> list[str]:
    """mergekit's union in a fixed order, written as plainly as possible: the first model's
    tokens by id; each other model's ordinary tokens by id that are new and nobody's added
    token; every model's added tokens by id that are new; then `extra`."""
    vocabs = [limited_vocab(p) for p in paths]
    added = [added_of(p) for p in paths]
    out: list[str] = []
    for token, _ in sorted(vocabs[0].items(), key=lambda item: item[1]):
        out.append(token)
    everyone_added = [content for listed in added for _, content in listed]
    for vocab in vocabs[1:]:
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            if token not in out and token not in everyone_added:
                out.append(token)
    for listed in added:
        for _, content in sorted(listed):
            if content not in out:
                out.append(content)
    for token in extra:
        if token not in out:
            out.append(token)
    return out


def permuted_rows(paths, name, tokens, rows, base, overrides=None, source_rows=None):
    """Each model's rows of tensor `name` in the output's token order, as mergekit's
    PermutedEmbeddings fills them, one token at a time: the model's own row if it has the
    token (below its vocab_size and its rows) unless an override forces another; else the
    override's row; else the one model that has it, zero if none, the base's row, or the
    mean of those that have it. Pad rows: the mean of the model's rows."""
    overrides = overrides or {}
    tensors = [load_model(p)[name] for p in paths]
    vocabs = [limited_vocab(p) for p in paths]
    full = [tokenizer_of(p).get_vocab(with_added_tokens=True) for p in paths]

    def own(m, token):
        i = vocabs[m].get(token)
        return None if i is None or i >= tensors[m].shape[0] else tensors[m][i]

    out = []
    for m in range(len(paths)):
        t = torch.zeros((rows, tensors[m].shape[1]), dtype=tensors[m].dtype)
        for r, token in enumerate(tokens):
            o = overrides.get(token)
            mine = own(m, token)
            if mine is not None and not (o and o.get("force")):
                t[r] = mine
                continue
            if o is not None:
                kind, model, other = o["source"]
                if kind == "zero":
                    value = torch.zeros(tensors[m].shape[1])
                elif kind == "model":
                    value = own(model, token)
                else:
                    value = tensors[model][full[model][other]]
            else:
                having = [k for k in range(len(paths)) if own(k, token) is not None]
                if len(having) == 1:
                    value = own(having[0], token)
                elif not having:
                    value = torch.zeros(tensors[m].shape[1])
                elif base is not None and own(base, token) is not None:
                    value = own(base, token)
                else:
                    total = torch.zeros(tensors[m].shape[1], dtype=torch.float64)
                    for k in having:
                        total += own(k, token).double()
                    value = total / len(having)
            t[r] = value.to(t.dtype)
        if rows > len(tokens):
            t[len(tokens) :] = t[: len(tokens)].double().mean(dim=0).to(t.dtype)
        out.append(t)
    return out


def merge(spec, out, **options):
    return run_merge(spec, str(out), RunOptions(progress=False, workers=2, **options),
                     log=lambda _: None)  # fmt: skip


# --- the union vocabulary --------------------------------------------------------------------


def test_union_order_matches_a_slow_reference_on_random_tokenizers():
    rng = random.Random(5)
    pool = [f"t{i}" for i in range(60)]
    for _ in range(200):
        tokenizers, plain_lists = [], []
        for _ in range(rng.randint(1, 4)):
            words = rng.sample(pool, rng.randint(1, 30))
            added = [(len(words) + k, c) for k, c in enumerate(rng.sample(pool, rng.randint(0, 4)))
                     if c not in words]  # fmt: skip
            ids = {w: i for i, w in enumerate(words)} | {c: i for i, c in added}
            tokenizers.append((ids, added))
            plain_lists.append((words, added))
        extra = rng.sample(pool + ["new1", "new2"], rng.randint(0, 3))
        want = [w for w in plain_lists[0][0]] + [c for _, c in plain_lists[0][1]]
        everyone = [c for _, added in plain_lists for _, c in added]
        for words, _ in plain_lists[1:]:
            want += [w for w in words if w not in want and w not in everyone]
        for _, added in plain_lists:
            want += [c for _, c in added if c not in want]
        want += [t for t in extra if t not in want]
        want = list(dict.fromkeys(want))
        assert union_order(tokenizers, extra) == want
        assert union_order(tokenizers, extra, union=False) == list(
            dict.fromkeys(
                [w for w in plain_lists[0][0]] + [c for _, c in plain_lists[0][1]] + extra
            )
        )


def union_body(three, method="linear", **extra):
    body = {
        "merge_method": method,
        "models": [
            {"model": three["base"], "parameters": {"weight": 0.5}},
            {"model": three["a"], "parameters": {"weight": 0.3}},
            {"model": three["b"], "parameters": {"weight": 0.2}},
        ],
        "tokenizer_source": "union",
        "dtype": "float32",
        "raymerge": {"shard_size": 60_000, "part_size": 20_000},
    }
    body.update(extra)
    return body


def test_the_fixture_union_is_the_expected_list(three):
    spec = parse_spec(union_body(three), "c", ".")
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    w = [f"w{i}" for i in range(40)]
    expected = (
        SPECIALS
        + w
        + ["<|base_extra|>"]
        + [f"a{i}" for i in range(10)]
        + [f"b{i}" for i in range(8)]
        + ["<|im_start|>", "<|im_end|>", "shared_tok"]
    )
    assert list(plan.vocabulary.tokens) == expected
    assert expected == slow_union([three["base"], three["a"], three["b"]], [])
    assert plan.vocabulary.rows == len(expected) == 65
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["lm_head.weight"].shape == (65, 64)
    base_source = by_name["lm_head.weight"].sources[0]
    assert base_source.runs == ((0, 0, 44),) and base_source.fills[0].out_start == 44
    a_source = by_name["lm_head.weight"].sources[1]
    assert (3, 32, 1) in a_source.runs and (44, 33, 10) in a_source.runs  # w0 at a's 32


# --- merges through the CLI -----------------------------------------------------------------


def run_cli(config, out, *flags):
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--no-progress",
                                       "--workers", "2", *map(str, flags)])  # fmt: skip
    assert "Traceback" not in result.output
    return result


def check_tokenizer_files(out, tokens, rows):
    """The written tokenizer.json loads and gives token i the id i (row i); config.json says
    the row count."""
    written = Tokenizer.from_str((out / "tokenizer.json").read_text())
    vocab = written.get_vocab(with_added_tokens=True)
    assert vocab == {t: i for i, t in enumerate(tokens)}
    assert written.encode("w3 a5 <|im_start|> b2").ids == [
        vocab[t] for t in ("w3", "a5", "<|im_start|>", "b2")
    ]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    return vocab


def test_linear_union_rows_follow_tokens(ray_local, three, tmp_path):
    config = write_config(tmp_path / "c.yaml", union_body(three))
    result = run_cli(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    paths = [three["base"], three["a"], three["b"]]
    tokens = slow_union(paths, [])
    vocab = check_tokenizer_files(out, tokens, len(tokens))
    merged = load_model(str(out))
    weights = [0.5, 0.3, 0.2]
    for name in VOCAB_TENSORS:
        rows = permuted_rows(paths, name, tokens, len(tokens), base=None)  # linear: no base
        want = reference.linear(rows, weights).float()
        assert merged[name].shape == (len(tokens), 64)
        for token, row in vocab.items():  # each token's row where the tokenizer says
            expected = want[tokens.index(token)]
            torch.testing.assert_close(merged[name][row], expected, rtol=1e-6, atol=1e-7)
        # the method itself on those rows: the same bytes
        got = MergeInputs(name, rows, None, {"normalize": True},
                          [{"weight": x} for x in weights])  # fmt: skip
        assert torch.equal(merged[name], REGISTRY["linear"].merge(got).float())
    inputs = [load_model(p) for p in paths]
    for name in merged:
        if layer_of(name) is not None:  # everything else merges as always
            want = reference.linear([m[name] for m in inputs], weights).float()
            torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-7)
    config_out = json.loads((out / "tokenizer_config.json").read_text())
    assert config_out["chat_template"] == "{{ messages }}" and config_out["bos_token"] == "<s>"
    decoder = config_out["added_tokens_decoder"]
    assert decoder[str(vocab["<|im_start|>"])]["special"] is True
    assert decoder[str(vocab["shared_tok"])]["special"] is False
    assert (out / "special_tokens_map.json").read_text() == '{"bos_token": "<s>"}\n'
    assert not (out / "tokenizer.model").exists()
    # raymerge_config.yml reads back to the same merge
    assert load_spec(str(out / "raymerge_config.yml")).to_json() == load_spec(config).to_json()


OVERRIDES = {
    "<|im_end|>": {"source": {"kind": "zero"}},  # a keeps its own row, the others zero
    "w15": {"source": "B", "force": True},  # everyone takes b's row of w15
    "<|new|>": {"source": {"kind": "model_token", "model": "A", "token": "a0"}},
    "<|new_id|>": {"source": {"kind": "model_token", "model": "B", "token_id": 5}},
}


def ties_block(three, pad=16):
    tokens = {}
    for token, entry in OVERRIDES.items():
        entry = json.loads(json.dumps(entry).replace('"A"', json.dumps(three["a"]))
                           .replace('"B"', json.dumps(three["b"])))  # fmt: skip
        tokens[token] = entry
    body = union_body(three, "ties", base_model=three["base"], tokenizer={
        "source": "union", "tokens": tokens, "pad_to_multiple_of": pad})  # fmt: skip
    del body["tokenizer_source"]
    body["models"] = [
        {"model": three["a"], "parameters": {"weight": 1.0, "density": 0.6}},
        {"model": three["b"], "parameters": {"weight": 0.7, "density": 0.4}},
    ]
    return body


def reference_overrides(three) -> dict:
    full_b = tokenizer_of(three["b"]).get_vocab(with_added_tokens=True)
    inverse_b = {i: t for t, i in full_b.items()}
    return {
        "<|im_end|>": {"source": ("zero", None, None)},
        "w15": {"source": ("model", 1, None), "force": True},  # positions: a, b, base
        "<|new|>": {"source": ("model_token", 0, "a0")},
        "<|new_id|>": {"source": ("model_token", 1, inverse_b[5])},
    }


def planned_tensor(config, name):
    spec = load_spec(config)
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    return next(t for t in plan.tensors if t.name == name)


def test_ties_union_with_overrides_and_padding(ray_local, three, tmp_path):
    config = write_config(tmp_path / "c.yaml", ties_block(three))
    result = run_cli(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    paths = [three["a"], three["b"], three["base"]]  # the base is added last, as configured
    tokens = slow_union([three["base"], three["a"], three["b"]], list(OVERRIDES))
    assert tokens[-2:] == ["<|new|>", "<|new_id|>"]
    rows = -(-len(tokens) // 16) * 16
    assert rows > len(tokens)
    vocab = check_tokenizer_files(out, tokens, rows)
    merged = load_model(str(out))
    for name in VOCAB_TENSORS:
        a, b, base = permuted_rows(paths, name, tokens, rows, base=2,
                                   overrides=reference_overrides(three))  # fmt: skip
        assert torch.equal(a[vocab["<|im_end|>"]], load_model(three["a"])[name][44])
        assert not b[vocab["<|im_end|>"]].any() and not base[vocab["<|im_end|>"]].any()
        b_w15 = load_model(three["b"])[name][limited_vocab(three["b"])["w15"]]
        assert all(torch.equal(m[vocab["w15"]], b_w15) for m in (a, b, base))
        want = reference.task_family(base, [a, b], [1.0, 0.7], [0.6, 0.4], trim=True,
                                     elect=True, normalize=True).float()  # fmt: skip
        assert merged[name].shape == (rows, 64)
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6)
        planned = planned_tensor(config, name)
        inputs = MergeInputs(name, [a, b, base], planned.base, planned.shared,
                             list(planned.per_input))  # fmt: skip
        assert torch.equal(merged[name], REGISTRY["ties"].merge(inputs).float())  # the bytes


# --- split rows, digests, sources that keep today's behaviour -------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, str]:
    """Vocabularies of ~33,000 tokens (64 wide: three row blocks), so a small
    --worker-memory splits the vocab tensors."""
    root = tmp_path_factory.mktemp("wide-union")
    t = [f"t{i}" for i in range(33_000)]
    chunks = [t[i : i + 1000] for i in range(0, 30_000, 1000)][::-1]  # other ids, in runs
    a_words = SPECIALS + [x for chunk in chunks for x in chunk] + [f"x{i}" for i in range(900)]
    b_words = SPECIALS + t[5000:] + [f"y{i}" for i in range(400)]
    paths = {}
    for name, words, added, seed in (
        ("base", SPECIALS + t, [("<|e|>", True)], 1),
        ("a", a_words, [("<|a|>", True)], 2),
        ("b", b_words, [("<|a|>", True)], 3),
    ):
        tokenizer = make_tokenizer(words, added)
        rows = len(Tokenizer.from_str(tokenizer).get_vocab(with_added_tokens=True))
        paths[name] = make_model(root, name, rows, seed, tokenizer)
    return paths


def wide_spec(wide, method, tmp_path):
    body = {
        "merge_method": method,
        "base_model": wide["base"],
        "models": [
            {"model": wide["a"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": wide["b"], "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 64,
                      "tokens": {"<|z|>": {"source": {"kind": "zero"}}}},
    }  # fmt: skip
    if method == "linear":  # the base is an input too (weighted), and prefered as a donor
        body["models"] = [{"model": m["model"]} for m in body["models"]]
        body["parameters"] = {"weight": 0.5}
    return parse_spec(body, "c", str(tmp_path))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_split_vocab_rows_give_the_unsplit_bytes(ray_local, wide, tmp_path, method):
    spec = wide_spec(wide, method, tmp_path)
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    whole = make_plan(spec, checkpoints)
    tensor = next(t for t in whole.tensors if t.name == "lm_head.weight")
    assert tensor.extra_input > 0 and any(s.assembled for s in tensor.sources)
    memory = tensor.memory_per_row() * (tensor.rows // 2) + 3 * tensor.extra_input
    split = make_plan(spec, checkpoints, memory)
    assert {split.tensors[i].name for i in split.split_tensors()} >= set(VOCAB_TENSORS)
    assert split.digest == whole.digest
    merge(spec, tmp_path / "whole", worker_memory=1 << 40)
    merge(spec, tmp_path / "split", worker_memory=memory)
    names = sorted(n for n in os.listdir(tmp_path / "whole") if n.endswith(".safetensors"))
    assert len(names) >= 1
    for name in names + ["tensors.parquet", "tokenizer.json", "config.json"]:
        assert filecmp.cmp(tmp_path / "whole" / name, tmp_path / "split" / name,
                           shallow=False), name  # fmt: skip
    if method == "linear":  # every row against the per-token reference
        merged = load_model(str(tmp_path / "split"))["lm_head.weight"]
        vocab = Tokenizer.from_file(str(tmp_path / "split" / "tokenizer.json")).get_vocab(True)
        tokens = sorted(vocab, key=vocab.__getitem__)
        paths = [wide["a"], wide["b"], wide["base"]]
        overrides = {"<|z|>": {"source": ("zero", None, None)}}
        rows = permuted_rows(paths, "lm_head.weight", tokens, merged.shape[0], 2, overrides)
        inputs = MergeInputs("lm_head.weight", rows, None, {"normalize": True},
                             [{"weight": 0.5}] * 3)  # fmt: skip
        assert torch.equal(merged, REGISTRY["linear"].merge(inputs).to(merged.dtype))
        want = reference.linear(rows, [0.5] * 3).to(merged.dtype)
        torch.testing.assert_close(merged.float(), want.float(), rtol=8e-3, atol=1e-6)


def test_a_changed_tokenizer_changes_the_digest(three, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(three["a"], copy)
    body = union_body(three)
    body["models"][1]["model"] = str(copy)
    spec = parse_spec(body, "c", str(tmp_path))
    digest = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs]).digest
    data = json.loads((copy / "tokenizer.json").read_text())
    data["added_tokens"][-1]["special"] = True  # same tokens, other settings
    (copy / "tokenizer.json").write_text(json.dumps(data))
    again = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs]).digest
    assert again != digest


def test_base_and_model_sources_keep_matching_by_position(three, tmp_path):
    for source in ("base", three["a"]):
        for body in ({"tokenizer_source": source}, {"tokenizer": {"source": source}}):
            config = union_body(three, base_model=three["base"])
            del config["tokenizer_source"]
            config.update(body)
            spec = parse_spec(config, "c", str(tmp_path))
            assert spec.vocab is None and "tokenizer" not in spec.to_json()
    spec = parse_spec(union_body(three, tokenizer={"source": "base", "pad_to_multiple_of": 8},
                                 base_model=three["base"]) | {"tokenizer_source": None},
                      "c", str(tmp_path))  # fmt: skip
    assert spec.vocab is not None and spec.vocab.source == "base"
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    assert len(plan.vocabulary.tokens) == 44 and plan.vocabulary.rows == 48


def test_the_normalized_config_round_trips(three, tmp_path):
    spec = parse_spec(ties_block(three), "c", str(tmp_path))
    path = tmp_path / "r.yml"
    path.write_text(config_yaml(spec))
    assert load_spec(str(path)).to_json() == spec.to_json()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("problem, code, message", [
    ("missing", 2, "has no tokenizer.json"),
    ("malformed", 1, "tokenizer.json: not valid JSON"),
    ("not a tokenizer", 1, "not a tokenizers tokenizer.json"),
    ("unloadable", 1, "the tokenizers library cannot load it"),
])  # fmt: skip
def test_bad_tokenizer_files_exit_with_one_line(three, tmp_path, problem, code, message):
    copy = tmp_path / "bad"
    shutil.copytree(three["b"], copy)
    target = copy / "tokenizer.json"
    if problem == "missing":
        target.unlink()
    elif problem == "malformed":
        target.write_text('{"model": {"type": "WordLevel", ')
    elif problem == "not a tokenizer":
        target.write_text("[1, 2]")
    else:
        target.write_text('{"model": {"type": "Nonsense"}}')
    body = union_body(three)
    body["models"][2]["model"] = str(copy)
    config = write_config(tmp_path / "c.yaml", body)
    result = run_cli(config, tmp_path / "out")
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(copy) in lines[0], result.output
    assert not (tmp_path / "out" / "COMPLETE").exists()


@pytest.mark.parametrize("tokens, message", [
    ({"x": {"source": "ELSEWHERE"}}, "is not one of the merge's models"),
    ({"x": {"source": {"kind": "model_token", "model": "ELSEWHERE", "token": "w1"}}},
     "is not one of the merge's models"),
    ({"x": {"force": True}}, "must be a model of the merge"),
    ({"x": {"source": {"kind": "model_token", "model": "A"}}}, "exactly one of `token`"),
    ({"x": {"source": {"kind": "zero"}, "weight": 1}}, "unknown key(s)"),
])  # fmt: skip
def test_bad_tokens_entries_exit_2(three, tmp_path, tokens, message):
    other = tmp_path / "elsewhere"
    shutil.copytree(three["b"], other)
    tokens = json.loads(json.dumps(tokens).replace('"ELSEWHERE"', json.dumps(str(other)))
                        .replace('"A"', json.dumps(three["a"])))  # fmt: skip
    body = union_body(three, tokenizer={"tokens": tokens})
    del body["tokenizer_source"]
    config = write_config(tmp_path / "c.yaml", body)
    result = run_cli(config, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert message in result.output and "tokenizer.tokens" in result.output, result.output


def test_an_override_from_a_model_without_the_token_is_refused(three, tmp_path):
    body = union_body(three, tokenizer={"tokens": {"w5": {"source": three["b"]}}})
    del body["tokenizer_source"]
    spec = parse_spec(body, "c", str(tmp_path))
    with pytest.raises(ConfigError, match=r"has no token 'w5'"):
        make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    body["tokenizer"]["tokens"] = {"x": {"source": {"kind": "model_token", "model": three["b"],
                                                    "token_id": 45}}}  # fmt: skip
    spec = parse_spec(body, "c", str(tmp_path))
    with pytest.raises(ConfigError, match="token id 45 is out of range"):
        make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])


def test_a_huge_tokenizer_file_is_refused(three, tmp_path, monkeypatch):
    from raymerge import tokenizer

    monkeypatch.setattr(tokenizer, "MAX_TOKENIZER_BYTES", 1000)
    spec = parse_spec(union_body(three), "c", str(tmp_path))
    with pytest.raises(CheckpointError, match="too large for a tokenizer"):
        make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])


def test_bad_tokenizer_block_values(three, tmp_path):
    for block, message in (
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ({"pad_to_multiple_of": True}, "pad_to_multiple_of"),
        ({"tokens": ["a"]}, "tokenizer.tokens: must be a mapping"),
        ({"source": "union", "extra": 1}, "unknown key(s)"),
        ("union", "tokenizer: must be a mapping"),
    ):
        body = union_body(three, tokenizer=block)
        del body["tokenizer_source"]
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_spec(body, "c", str(tmp_path))
