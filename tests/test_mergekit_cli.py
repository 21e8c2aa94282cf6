"""`raymerge-yaml CONFIG OUT [mergekit-yaml's flags]`: mergekit users' command line, run by
raymerge."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from raymerge.card import CARD_FILE, CONFIG_FILE
from raymerge.errors import ConfigError
from raymerge.index import verify
from raymerge.mergekit_cli import DEFAULTS, NOTES, main, map_flags, parse_shard_size
from tests.conftest import ties_config, write_config

SCRIPT = os.path.join(os.path.dirname(sys.executable), "raymerge-yaml")

# mergekit 0.1.5's `mergekit-yaml` flags (mergekit/options.py, add_merge_options), as typed
MERGEKIT_FLAGS = [
    "--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings",
    "--no-unsafe-truncate-embeddings", "--transformers-cache=/tmp/cache",
    "--lora-merge-cache=/tmp/lora", "--lora-merge-dtype=bfloat16", "--cuda", "--no-cuda",
    "--device=auto", "--low-cpu-memory", "--no-low-cpu-memory", "--out-shard-size=1B",
    "--copy-tokenizer", "--no-copy-tokenizer", "--clone-tensors", "--no-clone-tensors",
    "--trust-remote-code", "--no-trust-remote-code", "--random-seed=3", "--lazy-unpickle",
    "--no-lazy-unpickle", "--write-model-card", "--no-write-model-card",
    "--safe-serialization", "--no-safe-serialization", "-v", "-vv", "--quiet", "--no-quiet",
    "--read-to-gpu", "--no-read-to-gpu", "--multi-gpu", "--no-multi-gpu", "--num-threads=4",
    "-j", "4", "--gpu-rich", "--async-write", "--no-async-write", "--write-threads=2",
]  # fmt: skip


@pytest.mark.parametrize(
    "value, size",
    [("5B", 5 * 10**9), ("500M", 5 * 10**8), ("64k", 64_000), ("123456", 123_456),
     (50_000, 50_000), ("2GiB", 2 * 2**30), ("1.5GB", 15 * 10**8)],
)  # fmt: skip
def test_out_shard_size_reads_as_mergekit_does(value, size):
    """mergekit's parse_kmb: "5B" is 5 * 10^9 (bytes, in its writer), not raymerge's 5 bytes."""
    assert parse_shard_size(value) == size
    assert map_flags({"out_shard_size": value}).overrides == {"shard_size": size}


@pytest.mark.parametrize("value", ["0", "five", "-3", "5X", "1e999GB"])
def test_bad_out_shard_size(value):
    with pytest.raises(ConfigError, match="--out-shard-size"):
        parse_shard_size(value)


def test_flags_that_map_to_raymerge_options():
    mapped = map_flags({"random_seed": 42, "quiet": True, "copy_tokenizer": True})
    assert mapped.overrides == {"seed": 42}
    assert mapped.options == {"progress": False, "copy_tokenizer": True} and not mapped.notes
    mapped = map_flags({"cuda": True})
    assert mapped.options == {"gpus_per_worker": 1.0} and mapped.gpu_flag == "--cuda"
    assert not mapped.notes
    for flags in ({"device": "cuda"}, {"device": "cuda:1"}, {"multi_gpu": True},
                  {"gpu_rich": True}):  # fmt: skip
        assert map_flags(flags).options == {"gpus_per_worker": 1.0}, flags
    assert map_flags({"cuda": False, "device": "cpu"}).options == {}
    mapped = map_flags({"copy_tokenizer": False})
    assert mapped.options == {"copy_tokenizer": False}
    assert len(mapped.notes) == 1 and mapped.notes[0].startswith("--no-copy-tokenizer: ")


def test_contradicting_or_unknown_devices_are_usage_errors():
    with pytest.raises(ConfigError, match="--cuda and --device cpu contradict"):
        map_flags({"device": "cpu", "cuda": True})
    with pytest.raises(ConfigError, match="--device xpu: raymerge merges on CPUs or CUDA"):
        map_flags({"device": "xpu"})


@pytest.mark.parametrize("name", sorted(NOTES))
def test_every_other_flag_gets_a_one_line_note(name):
    value = {"verbosity": 2, "num_threads": 4, "write_threads": 2, "write_model_card": False,
             "safe_serialization": False}.get(name, True)  # fmt: skip
    if name in ("transformers_cache", "lora_merge_cache", "lora_merge_dtype"):
        value = "x"
    mapped = map_flags({name: value})
    assert mapped.overrides == {} and mapped.options == {}
    (note,) = mapped.notes
    assert "\n" not in note and len(note) < 200
    assert note.startswith("-v: " if name == "verbosity" else flag(name, value))
    default = DEFAULTS[name]
    assert map_flags({name: default}).notes == []  # `--no-allow-crimes` asks for nothing


def flag(name: str, value) -> str:
    return f"--{'no-' if value is False else ''}{name.replace('_', '-')}"


def test_every_mergekit_flag_is_accepted(tmp_path):
    """All of mergekit-yaml's flags parse; the notes come before the config is read."""
    missing = str(tmp_path / "absent.yaml")
    result = CliRunner().invoke(main, [missing, str(tmp_path / "out"), *MERGEKIT_FLAGS])
    assert result.exit_code == 2, result.output
    assert "absent.yaml" in result.stderr and "does not exist" in result.stderr
    noted = {line.split(":")[1].strip() for line in result.stderr.splitlines()
             if line.startswith("note: ")}  # fmt: skip
    assert noted == {
        "--transformers-cache",
        "--lora-merge-cache",
        "--lora-merge-dtype",
        "--device auto",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--no-safe-serialization",
        "-v",
        "--num-threads",
        "--multi-gpu/--gpu-rich",
        "--write-threads",
    }  # the last of --x / --no-x wins; a flag left at mergekit's default gets no note


def test_an_unknown_flag_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["c.yaml", "out", "--out-shard-sise", "1B"])
    assert result.exit_code == 2
    assert "No such option" in result.stderr and "--out-shard-sise" in result.stderr
    assert "Did you mean" in result.stderr and "--out-shard-size" in result.stderr


@pytest.mark.ray
def test_cuda_without_gpus_says_so(ray_local, models, tmp_path):
    import ray

    if ray.cluster_resources().get("GPU"):
        pytest.skip("this machine's Ray has GPUs")
    config = write_config(tmp_path / "c.yaml", ties_config(models))
    result = CliRunner().invoke(main, [config, str(tmp_path / "out"), "--cuda", "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: --cuda (--gpus-per-worker 1): the Ray cluster has 0 GPUs; run without --cuda "
        "to merge on CPUs"
    )


@pytest.mark.ray
@pytest.mark.slow
def test_the_console_script_runs_a_mergekit_command_line(models, tmp_path):
    """`raymerge-yaml` as a mergekit user types it, in its own process with its own local Ray."""
    base = tmp_path / "base"
    shutil.copytree(models["base"], base)
    (base / "tokenizer.json").write_text("{}\n")
    (base / "README.md").write_text("# the base's own card\n")
    body = ties_config(models)
    body["base_model"] = str(base)
    config = write_config(tmp_path / "c.yaml", body)
    out = tmp_path / "merged"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [SCRIPT, config, str(out), "--out-shard-size", "50k", "--random-seed", "3",
         "--lazy-unpickle", "--allow-crimes", "--no-copy-tokenizer", "--quiet", "--workers",
         "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    flags = sorted(n.split(":")[1].strip() for n in notes)
    assert flags == ["--allow-crimes", "--lazy-unpickle", "--no-copy-tokenizer"], notes
    assert "merged" in done.stdout and "shard(s)" in done.stdout
    report = verify(str(out))
    assert report.problems == [] and report.shards > 1  # 50k-byte shards
    written = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert written["raymerge"]["seed"] == 3 and written["raymerge"]["shard_size"] == 50_000
    assert not (out / "tokenizer.json").exists()
    assert "the base's own card" not in (out / CARD_FILE).read_text()
