"""LoRA inputs (`model: MODEL+ADAPTER`): the adapter applied to the base's rows as workers
read them, W + s * B @ A in fp32 rounded once, against an in-memory reference; byte ranges
of every shape; the adapters raymerge refuses; the digest follows the adapter."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from raymerge.card import CONFIG_FILE, config_yaml, model_card
from raymerge.checkpoint import open_checkpoint
from raymerge.cli import main
from raymerge.config import load_spec, parse_spec
from raymerge.errors import ConfigError
from raymerge.index import verify
from raymerge.mapping import layer_of
from raymerge.methods.base import MergeInputs
from raymerge.plan import make_plan
from raymerge.runner import RunOptions, run_merge
from raymerge.storage import open_source
from raymerge.storage.lora import LoraSource, config_ref, lora_uri, parse_uri
from raymerge.synth import SynthOptions, synthesize
from tests import reference
from tests.conftest import write_config

PREFIX = "base_model.model."
ATTN = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
MLP = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj"]
TARGETS = ATTN + MLP
SIZES = ["--shard-size", "50000", "--part-size", "8000"]


def small_models(folder, dtype, seed):
    return synthesize(str(folder), SynthOptions(
        models=2, with_base=True, layers=2, hidden=64, intermediate=96, vocab=128,
        shard_size=40_000, seed=seed, dtype=dtype,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return small_models(tmp_path_factory.mktemp("lora_bf16"), torch.bfloat16, 11)


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    return small_models(tmp_path_factory.mktemp("lora_f32"), torch.float32, 12)


def load_model(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in open_checkpoint(path).files:
        tensors.update(load_file(os.path.join(path, file)))
    return tensors


def pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key, as the test understands it: a key matches the module name or
    a dotted suffix of it; the first that matches wins."""
    import re

    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_adapter(folder, base: dict, modules=TARGETS, *, r=4, alpha=8, rslora=False,
                  rank_pattern=None, alpha_pattern=None, fan_in_fan_out=False,
                  dtype=torch.float32, seed=0, extra=None, config=None) -> str:  # fmt: skip
    """A PEFT-format adapter: adapter_config.json and adapter_model.safetensors with random
    A [r, in] and B [out, r] for `modules` (PEFT's names and key layout)."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        out, inner = base[f"{module}.weight"].shape
        if fan_in_fan_out:  # W is read as [in, out]
            out, inner = inner, out
        rank = pattern_value(rank_pattern or {}, module, r)
        a = 0.2 * torch.randn(rank, inner, generator=generator)
        b = 0.2 * torch.randn(out, rank, generator=generator)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.to(dtype)
    tensors.update(extra or {})
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), {"format": "pt"})
    body = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "base",
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
        "use_dora": False, "modules_to_save": None, "bias": "none", "lora_dropout": 0.05,
        "init_lora_weights": True,
    }  # fmt: skip
    body.update(config or {})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(body, f, indent=2)
    return folder


def scale_of(config: dict, module: str) -> float:
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapted(base: dict, adapter: str) -> dict[str, torch.Tensor]:
    """The base's tensors with the adapter applied, whole tensors in memory: B @ A summed over
    the rank in order, times s, plus W, in fp32, rounded once to W's dtype; full tensors in
    the adapter replace the base's (cast to its dtype)."""
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    out = dict(base)
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            if "lora_" not in key:
                name = key[len(PREFIX) :].replace(".modules_to_save.default.", ".")
                out[name] = a.to(base[name].dtype)
            continue
        module = key[len(PREFIX) : -len(".lora_A.weight")]
        a = a.float()
        b = weights[key.replace(".lora_A.", ".lora_B.")].float()
        acc = b[:, 0:1] * a[0:1]
        for k in range(1, a.shape[0]):
            acc = acc + b[:, k : k + 1] * a[k : k + 1]
        delta = acc * scale_of(config, module)
        if config.get("fan_in_fan_out"):
            delta = delta.T
        w = base[f"{module}.weight"]
        out[f"{module}.weight"] = (w.float() + delta).to(w.dtype)
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def read_tensor(checkpoint, name: str) -> torch.Tensor:
    entry = checkpoint.tensors[name]
    raw = bytearray(checkpoint.source.read_range(entry.file, entry.start, entry.nbytes))
    dtype = {"BF16": torch.bfloat16, "F32": torch.float32}[entry.dtype]
    return torch.frombuffer(raw, dtype=dtype).reshape(entry.shape)


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


# --- reads through LoraSource ---------------------------------------------------------------

VARIANTS = {
    # name: (write_adapter options, hand-computed scale per module)
    "plain": ({}, dict.fromkeys(TARGETS, 8 / 4)),
    "rslora": ({"rslora": True, "alpha": 16}, dict.fromkeys(TARGETS, 16 / 2)),
    "patterns": (
        {
            "rank_pattern": {"v_proj": 2, "model.layers.1.mlp.gate_proj": 6},
            "alpha_pattern": {"q_proj": 3, r"layers\.0\.mlp\..*": 12},
        },
        {
            **{m: (3 / 4 if "q_proj" in m else 8 / 2) for m in ATTN},
            "model.layers.0.mlp.down_proj": 12 / 4,
            "model.layers.1.mlp.gate_proj": 8 / 6,
        },
    ),  # fmt: skip
    "fan_in_fan_out": ({"fan_in_fan_out": True}, dict.fromkeys(TARGETS, 2.0)),
    "bf16_factors": ({"dtype": torch.bfloat16, "alpha": 4}, dict.fromkeys(TARGETS, 1.0)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("models_name", ["bf16", "f32"])
def test_adapted_tensors_equal_the_reference(request, models_name, variant, tmp_path):
    models = request.getfixturevalue(models_name)
    options, scales = VARIANTS[variant]
    base = load_model(models["base"])
    adapter = write_adapter(tmp_path / "adapter", base, seed=len(variant), **options)
    checkpoint = open_checkpoint(lora_uri(models["base"], adapter))
    assert isinstance(checkpoint.source, LoraSource)
    assert checkpoint.files == open_checkpoint(models["base"]).files
    want = adapted(base, adapter)
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    for name, w in base.items():
        got = read_tensor(checkpoint, name)
        assert got.dtype == w.dtype
        assert torch.equal(got, want[name]), name  # the same arithmetic: the same bytes
        module = name.removesuffix(".weight")
        if module not in scales:
            assert tensor_bytes(got) == tensor_bytes(w), name  # untouched, byte for byte
            continue
        assert not torch.equal(got, w), name
        # PEFT's formula (matmul, scale worked out by hand): equal up to rounding
        a = weights[f"{PREFIX}{module}.lora_A.weight"].float()
        b = weights[f"{PREFIX}{module}.lora_B.weight"].float()
        delta = (b @ a) * scales[module]
        if options.get("fan_in_fan_out"):
            delta = delta.T
        peft = (w.float() + delta).to(w.dtype).float()
        tol = 2**-7 if w.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.float(), peft, rtol=tol, atol=1e-5)


def test_byte_ranges_of_any_shape(bf16, tmp_path):
    """Unaligned starts and ends, ranges across tensors, the header, whole files, into a
    buffer at an odd address: always the adapted file's bytes."""
    base = load_model(bf16["base"])
    adapter = write_adapter(tmp_path / "adapter", base, seed=3)
    checkpoint = open_checkpoint(lora_uri(bf16["base"], adapter))
    source = checkpoint.source
    want = adapted(base, adapter)
    rng = random.Random(5)
    spanning = 0
    for file in checkpoint.files:
        with open(os.path.join(bf16["base"], file), "rb") as f:
            expected = bytearray(f.read())
        entries = sorted((e for e in checkpoint.tensors.values() if e.file == file),
                         key=lambda e: e.start)  # fmt: skip
        for entry in entries:
            expected[entry.start : entry.end] = tensor_bytes(want[entry.name])
        size = len(expected)
        assert source.size(file) == size
        ranges = [(0, size), (0, 8), (0, entries[0].start), (0, entries[0].start + 7)]
        for before, after in zip(entries, entries[1:]):  # across each tensor boundary
            ranges.append((before.end - 5, after.start + 3))
            ranges.append((before.start + 1, after.end - 1))
            spanning += 1
        ranges += [
            (s, rng.randrange(s, size + 1)) for s in (rng.randrange(size) for _ in range(60))
        ]
        for start, end in ranges:
            assert source.read_range(file, start, end - start) == bytes(expected[start:end])
            holder = bytearray(end - start + 3)
            source.readinto(file, start, memoryview(holder)[3:])  # an odd address
            assert holder[3:] == expected[start:end], (file, start, end)
    assert spanning > 5
    again = pickle.loads(pickle.dumps(source))  # as Ray ships it to a worker
    rebuilt = open_source(source.root)  # as a worker rebuilds it from the plan's roots
    assert isinstance(rebuilt, LoraSource) and again.root == source.root
    entry = checkpoint.tensors["model.layers.1.self_attn.q_proj.weight"]
    for other in (again, rebuilt):
        got = other.read_range(entry.file, entry.start + 128, 256)
        assert got == tensor_bytes(want[entry.name])[128:384]
    assert (
        source.read_range("config.json", 0, source.size("config.json"))
        == open(os.path.join(bf16["base"], "config.json"), "rb").read()
    )


def test_full_tensors_in_the_adapter_replace_the_base_tensors(bf16, tmp_path):
    base = load_model(bf16["base"])
    generator = torch.Generator().manual_seed(9)
    head = torch.randn(base["lm_head.weight"].shape, generator=generator)  # f32 on a bf16 base
    norm = torch.randn(base["model.norm.weight"].shape, generator=generator).to(torch.bfloat16)
    extra = {f"{PREFIX}lm_head.weight": head,
             f"{PREFIX}model.norm.modules_to_save.default.weight": norm}  # fmt: skip
    adapter = write_adapter(tmp_path / "adapter", base, ATTN[:1], extra=extra)
    checkpoint = open_checkpoint(lora_uri(bf16["base"], adapter))
    assert torch.equal(read_tensor(checkpoint, "lm_head.weight"), head.to(torch.bfloat16))
    assert torch.equal(read_tensor(checkpoint, "model.norm.weight"), norm)
    name = ATTN[0] + ".weight"
    assert torch.equal(read_tensor(checkpoint, name), adapted(base, adapter)[name])


def test_the_driver_reads_the_adapter_without_torch(bf16, tmp_path):
    base = load_model(bf16["base"])
    adapter = write_adapter(tmp_path / "adapter", base)
    code = f"""
import sys
from raymerge.checkpoint import open_checkpoint
c = open_checkpoint({lora_uri(bf16["base"], adapter)!r})
print(len(c.tensors), type(c.source).__name__, "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(base)), "LoraSource", "False"]


# --- merges ---------------------------------------------------------------------------------


def reference_merge(spec, states: list[dict]) -> dict[str, torch.Tensor]:
    """The merge in memory, tensor by tensor, with the method's own kernel (as
    tests/test_run.py does), on the given input state dicts."""
    sources = spec.slices[0].sources
    inputs = [states[s.input] for s in sources]
    out = {}
    for name in inputs[0]:
        layer = layer_of(name)
        t = 0.0 if layer is None else layer / 1  # two layers: t = layer / (L - 1)
        shared, per_input = spec.resolve(0, name, [name] * len(inputs), t)
        merged = spec.method.merge(MergeInputs(
            name, [m[name] for m in inputs], spec.slices[0].base, shared, per_input, spec.seed
        ))  # fmt: skip
        out[name] = merged.to(torch.bfloat16)
    return out


def input_states(spec) -> list[dict]:
    states = []
    for model in spec.inputs:
        if model.path.startswith("lora://"):
            base, adapter = parse_uri(model.path)
            states.append(adapted(load_model(base), adapter))
        else:
            states.append(load_model(model.path))
    return states


@pytest.mark.ray
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_merge_with_a_lora_input_equals_the_reference(ray_local, bf16, tmp_path, method):
    base = load_model(bf16["base"])
    adapter = write_adapter(tmp_path / "adapter", base, rank_pattern={"v_proj": 2}, seed=4)
    lora = f"{bf16['model_1']}+{adapter}"
    if method == "linear":
        body = {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": lora, "parameters": {"weight": 0.7}},
            {"model": bf16["model_2"], "parameters": {"weight": 0.3}}]}  # fmt: skip
    else:
        body = {"merge_method": "ties", "base_model": bf16["base"], "dtype": "bfloat16",
                "models": [{"model": lora, "parameters": {"weight": 1.0, "density": 0.5}},
                           {"model": bf16["model_2"],
                            "parameters": {"weight": 0.6, "density": 0.7}}]}  # fmt: skip
    config = write_config(tmp_path / "c.yaml", body)
    out = tmp_path / "out"
    result = invoke("run", config, out, "--no-progress", "--workers", "2", *SIZES)
    assert result.exit_code == 0, result.output
    assert (out / "COMPLETE").exists() and verify(str(out)).problems == []
    spec = load_spec(config)
    paths = [m.path for m in spec.inputs]
    lora_input = paths.index(lora_uri(bf16["model_1"], adapter))
    states = input_states(spec)
    merged = load_model(str(out))
    want = reference_merge(spec, states)
    assert merged.keys() == want.keys()
    for name in want:
        assert torch.equal(merged[name], want[name]), name
    unadapted = list(states)
    unadapted[lora_input] = load_model(bf16["model_1"])
    plain = reference_merge(spec, unadapted)
    changed = [n for n in want if not torch.equal(plain[n], want[n])]
    assert sorted(changed) == sorted(f"{m}.weight" for m in TARGETS)  # the adapter counted
    # the slow references agree (float64, element by element) up to the output rounding
    ordered = [states[s.input] for s in spec.slices[0].sources]  # lora, model_2 (, base)
    for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.gate_proj.weight"):
        if method == "linear":
            slow = reference.linear([ordered[0][name], ordered[1][name]], [0.7, 0.3])
        else:
            slow = reference.task_family(
                ordered[2][name],
                [ordered[0][name], ordered[1][name]],
                [1.0, 0.6],
                [0.5, 0.7],
                trim=True,
                elect=True,
                normalize=True,
            )
        torch.testing.assert_close(merged[name].double(), slow, rtol=2**-7, atol=1e-4)
    # the card names both parts; the normalized config reads back to the same inputs
    card = (out / "README.md").read_text()
    assert f"`{bf16['model_1']}` + `{adapter}`" in card
    saved = (out / CONFIG_FILE).read_text()
    assert f"model: {bf16['model_1']}+{adapter}\n" in saved
    assert [m.path for m in load_spec(str(out / CONFIG_FILE)).inputs] == [
        m.path for m in spec.inputs
    ]


@pytest.mark.ray
def test_a_split_tensor_of_a_lora_input_equals_the_reference(ray_local, tmp_path):
    """lm_head (40,000 rows) is merged in row ranges: each range's adapted rows are the
    whole tensor's."""
    models = synthesize(str(tmp_path / "m"), SynthOptions(
        models=2, with_base=False, layers=1, hidden=64, intermediate=96, vocab=40_000, seed=3,
    ))  # fmt: skip
    base = load_model(models["model_1"])
    adapter = write_adapter(tmp_path / "adapter", base, ["lm_head", ATTN[0]], r=3, seed=8)
    body = {"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": f"{models['model_1']}+{adapter}", "parameters": {"weight": 0.5}},
        {"model": models["model_2"], "parameters": {"weight": 0.5}}]}  # fmt: skip
    spec = parse_spec(body, "c", str(tmp_path))
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    plan = make_plan(spec, checkpoints, worker_memory=32 << 20)
    assert "lm_head.weight" in [plan.tensors[i].name for i in plan.split_tensors()]
    options = RunOptions(progress=False, workers=2, worker_memory=32 << 20)
    run_merge(spec, str(tmp_path / "out"), options, log=lambda _: None)
    merged = load_model(str(tmp_path / "out"))
    states = input_states(spec)
    sources = spec.slices[0].sources
    for name in ("lm_head.weight", ATTN[0] + ".weight", "model.embed_tokens.weight"):
        shared, per_input = spec.resolve(0, name, [name, name], 0.0)
        want = spec.method.merge(MergeInputs(
            name, [states[s.input][name] for s in sources], None, shared, per_input, 0
        )).to(torch.bfloat16)  # fmt: skip
        assert torch.equal(merged[name], want), name


# --- what is refused ------------------------------------------------------------------------


def _dora_config(folder, base):
    write_adapter(folder, base, config={"use_dora": True})


def _dora_tensor(folder, base):
    magnitude = torch.ones(64)
    write_adapter(folder, base, extra={
        f"{PREFIX}{ATTN[0]}.lora_magnitude_vector": magnitude})  # fmt: skip


def _embedding(folder, base):
    write_adapter(folder, base, extra={
        f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.zeros(4, 128),
        f"{PREFIX}model.embed_tokens.lora_embedding_B": torch.zeros(64, 4)})  # fmt: skip


def _wrong_shape(folder, base):
    write_adapter(folder, base, ATTN[1:])
    extra = {f"{PREFIX}{ATTN[0]}.lora_A.weight": torch.zeros(4, 32),
             f"{PREFIX}{ATTN[0]}.lora_B.weight": torch.zeros(64, 4)}  # fmt: skip
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    save_file({**tensors, **extra}, os.path.join(folder, "adapter_model.safetensors"))


def _missing_tensor(folder, base):
    write_adapter(folder, base, extra={
        f"{PREFIX}model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
        f"{PREFIX}model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)})  # fmt: skip


def _replacement_shape(folder, base):
    write_adapter(folder, base, extra={f"{PREFIX}lm_head.weight": torch.zeros(130, 64)})


def _bin_only(folder, base):
    write_adapter(folder, base)
    os.rename(os.path.join(folder, "adapter_model.safetensors"),
              os.path.join(folder, "adapter_model.bin"))  # fmt: skip


def _bad_json(folder, base):
    write_adapter(folder, base)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write('{"r": 4, "lora_alpha": ')


def _ranks_disagree(folder, base):
    write_adapter(folder, base, config={"r": 8})  # the tensors have rank 4


def _pissa(folder, base):
    write_adapter(folder, base, config={"init_lora_weights": "pissa_niter_4"})


def _no_config(folder, base):
    write_adapter(folder, base)
    os.remove(os.path.join(folder, "adapter_config.json"))


REFUSED = [
    (_dora_config, 2, "DoRA (use_dora: true) adapters are not supported"),
    (_dora_tensor, 2, "DoRA adapters are not supported"),
    (_embedding, 2, "LoRA on an embedding (lora_embedding_A/B) is not supported"),
    (_wrong_shape, 2, "is [64, 64] in the base model"),
    (_missing_tensor, 2, "which the base model"),
    (_replacement_shape, 2, "replaces it with a [130, 64] tensor"),
    (_bin_only, 2, "pickle weights (adapter_model.bin), which raymerge does not load: convert"),
    (_bad_json, 1, "adapter_config.json: not valid JSON"),
    (_ranks_disagree, 1, "do not have rank 8"),
    (_pissa, 2, "PEFT rewrites the base weights when it loads this adapter"),
    (_no_config, 2, "a folder without adapter_config.json"),
]


def lora_config(tmp_path, models, ref: str) -> str:
    body = {"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": ref, "parameters": {"weight": 0.5}},
        {"model": models["model_2"], "parameters": {"weight": 0.5}}]}  # fmt: skip
    return write_config(tmp_path / "c.yaml", body)


@pytest.mark.parametrize("make, code, match", REFUSED, ids=[r[0].__name__ for r in REFUSED])
def test_a_refused_adapter_is_one_clear_line(bf16, tmp_path, make, code, match):
    folder = tmp_path / "adapter"
    make(str(folder), load_model(bf16["base"]))
    config = lora_config(tmp_path, bf16, f"{bf16['model_1']}+{folder}")
    result = invoke("plan", config)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    message = result.output.strip()
    assert "\n" not in message and message.startswith("error: ")
    assert match in message, message
    assert len(message) < 700


@pytest.mark.ray
def test_a_refused_run_writes_nothing(ray_local, bf16, tmp_path):
    folder = tmp_path / "adapter"
    _dora_config(str(folder), load_model(bf16["base"]))
    config = lora_config(tmp_path, bf16, f"{bf16['model_1']}+{folder}")
    out = tmp_path / "out"
    result = invoke("run", config, out, "--no-progress")
    assert result.exit_code == 2 and "DoRA" in result.output, result.output
    assert not (out / "COMPLETE").exists() and not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("adapter, match", [
    ("missing", "(the LoRA adapter after '+'): "),
    ("model", "a folder without adapter_config.json"),
    ("file", "is a file; give a PEFT LoRA adapter folder"),
])  # fmt: skip
def test_the_part_after_plus_must_be_an_adapter_folder(bf16, tmp_path, adapter, match):
    ref = {"missing": str(tmp_path / "nowhere"), "model": bf16["model_2"],
           "file": os.path.join(bf16["model_2"], "config.json")}[adapter]  # fmt: skip
    result = invoke("plan", lora_config(tmp_path, bf16, f"{bf16['model_1']}+{ref}"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert match in result.output and result.output.count("\n") == 1, result.output


# --- the digest follows the adapter ---------------------------------------------------------


def plan_digest(config: str) -> str:
    result = invoke("plan", config, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["digest"]


def rewrite_later(path: str, data: bytes) -> None:
    """New content, and a modification time surely past the old one."""
    before = os.stat(path).st_mtime_ns
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(before, before + 10**9))


def other_weights(adapter: str) -> bytes:
    """The adapter's weights with every lora_B negated: same names, shapes and size."""
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    from safetensors.torch import save

    return save({k: -v if ".lora_B." in k else v for k, v in weights.items()}, {"format": "pt"})


def test_changing_the_adapter_changes_the_digest(bf16, tmp_path):
    base = load_model(bf16["base"])
    adapter = write_adapter(tmp_path / "adapter", base, seed=1)
    config = lora_config(tmp_path, bf16, f"{bf16['model_1']}+{adapter}")
    first = plan_digest(config)
    assert plan_digest(config) == first
    (tmp_path / "plain").mkdir()
    assert plan_digest(lora_config(tmp_path / "plain", bf16, bf16["model_1"])) != first
    weights = os.path.join(adapter, "adapter_model.safetensors")
    size = os.path.getsize(weights)
    rewrite_later(weights, other_weights(adapter))
    assert os.path.getsize(weights) == size
    second = plan_digest(config)
    assert second != first
    settings_file = os.path.join(adapter, "adapter_config.json")
    with open(settings_file) as f:
        settings = json.load(f)
    settings["lora_alpha"] = 16
    rewrite_later(settings_file, json.dumps(settings).encode())
    assert plan_digest(config) not in (first, second)


@pytest.mark.ray
def test_a_changed_adapter_is_never_resumed_into(ray_local, bf16, tmp_path):
    base = load_model(bf16["base"])
    adapter = write_adapter(tmp_path / "adapter", base, ATTN[:1], seed=1)
    body = {"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": f"{bf16['model_1']}+{adapter}", "parameters": {"weight": 1.0}}]}  # fmt: skip
    spec = parse_spec(body, "c", str(tmp_path))
    out = str(tmp_path / "out")
    run_merge(spec, out, RunOptions(progress=False, workers=1), log=lambda _: None)
    name = ATTN[0] + ".weight"
    before = load_model(out)[name]
    rewrite_later(os.path.join(adapter, "adapter_model.safetensors"), other_weights(adapter))
    with pytest.raises(ConfigError, match="holds a different merge"):
        run_merge(spec, out, RunOptions(progress=False, workers=1), log=lambda _: None)
    run_merge(spec, out, RunOptions(progress=False, workers=1, force=True), log=lambda _: None)
    after = load_model(out)[name]
    assert not torch.equal(before, after)
    assert torch.equal(after, adapted(load_model(bf16["model_1"]), adapter)[name])


# --- references in configs ------------------------------------------------------------------


def resolved(tmp_path, ref: str, config_dir=None) -> str:
    body = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
    return parse_spec(body, "c", str(config_dir or tmp_path)).inputs[0].path


def test_references_with_plus(bf16, tmp_path):
    base = load_model(bf16["base"])
    adapter = write_adapter(tmp_path / "adapter", base)
    # relative halves, found beside the config
    shutil.copytree(bf16["model_1"], tmp_path / "m1")
    uri = resolved(tmp_path, "m1+adapter", config_dir=tmp_path)
    assert uri == lora_uri(str(tmp_path / "m1"), str(tmp_path / "adapter"))
    # a path that exists is a path, '+' or not
    shutil.copytree(bf16["model_1"], tmp_path / "with+plus")
    assert resolved(tmp_path, str(tmp_path / "with+plus")) == str(tmp_path / "with+plus")
    # several '+': the one cut whose halves both exist; the URI escapes the other
    uri = resolved(tmp_path, f"{tmp_path / 'with+plus'}+{adapter}")
    assert uri == lora_uri(str(tmp_path / "with+plus"), adapter)
    assert "with%2Bplus" in uri and parse_uri(uri) == (str(tmp_path / "with+plus"), adapter)
    assert config_ref(uri) == uri  # MODEL+ADAPTER would not read back: the URI is kept
    assert resolved(tmp_path, uri) == uri  # ... and the URI itself is a reference
    # object-store halves are taken as they are (checked when opened)
    assert resolved(tmp_path, "s3://b/base+s3://b/adapter/") == "lora://s3://b/base+s3://b/adapter"
    assert resolved(tmp_path, f"s3://b/base+{adapter}") == lora_uri("s3://b/base", adapter)
    assert resolved(tmp_path, "s3://b/model+v2") == "s3://b/model+v2"  # a key with a '+'


def test_references_that_cannot_be_split(bf16, tmp_path):
    with pytest.raises(ConfigError, match="cannot tell where the model ends"):
        resolved(tmp_path, "a+b+c")
    with pytest.raises(ConfigError, match=r"the model before '\+'\): 'nothing' not found"):
        resolved(tmp_path, f"nothing+{tmp_path}")
    with pytest.raises(ConfigError, match="one LoRA adapter per model"):
        resolved(tmp_path, f"lora://{bf16['model_1']}+lora://x%2By")  # an adapter's adapter


def test_the_card_and_config_name_model_and_adapter(bf16, tmp_path):
    base = load_model(bf16["base"])
    adapter = write_adapter(tmp_path / "adapter", base)
    config = lora_config(tmp_path, bf16, f"{bf16['model_1']}+{adapter}")
    spec = load_spec(config)
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    plan = make_plan(spec, checkpoints, 1 << 30)
    card = model_card(spec, plan, checkpoints, "lora-merge")
    line = next(x for x in card.splitlines() if x.startswith(f"* `{bf16['model_1']}`"))
    assert line.startswith(f"* `{bf16['model_1']}` + `{adapter}`: local files")
    assert "; adapter: local files" in line
    assert f"model: {bf16['model_1']}+{adapter}" in config_yaml(spec)


@pytest.mark.parametrize("inside", ["base", "adapter"])
def test_output_inside_either_half_of_a_lora_input_is_refused(tmp_path, inside):
    from raymerge.ledger import check_not_an_input
    from raymerge.storage.lora import lora_uri

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    with pytest.raises(ConfigError, match="never writes into its inputs"):
        check_not_an_input(str(tmp_path / inside / "out"), [lora_uri(str(base), str(adapter))])
    check_not_an_input(str(tmp_path / "elsewhere"), [lora_uri(str(base), str(adapter))])
