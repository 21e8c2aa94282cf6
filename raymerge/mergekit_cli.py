"""`raymerge-yaml CONFIG OUT [mergekit-yaml's flags]`: mergekit's command, run by raymerge.

Every flag of mergekit 0.1.5's `mergekit-yaml` (mergekit/options.py, MergeOptions) is
accepted. The ones that mean something here become raymerge's options (`map_flags`); the
rest are accepted with a one-line note on stderr saying what raymerge does instead. A flag
neither knows is a usage error (exit 2). A few of `raymerge run`'s own options (--address,
--workers, --worker-memory, --force) are accepted too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import click
from click.core import ParameterSource

from raymerge.cli import _guard, run_and_exit
from raymerge.errors import ConfigError
from raymerge.sizes import parse_size

# mergekit 0.1.5's MergeOptions, in its order: (field, kind, default). Booleans are
# `--x/--no-x` pairs, as mergekit declares them.
MERGEKIT_OPTIONS: tuple[tuple[str, str, Any], ...] = (
    ("allow_crimes", "bool", False),
    ("unsafe_truncate_embeddings", "bool", False),
    ("transformers_cache", "str", None),
    ("lora_merge_cache", "str", None),
    ("lora_merge_dtype", "str", None),
    ("cuda", "bool", False),
    ("device", "str", None),
    ("low_cpu_memory", "bool", False),
    ("out_shard_size", "size", None),
    ("copy_tokenizer", "bool", True),
    ("clone_tensors", "bool", False),
    ("trust_remote_code", "bool", False),
    ("random_seed", "int", None),
    ("lazy_unpickle", "bool", False),
    ("write_model_card", "bool", True),
    ("safe_serialization", "bool", True),
    ("verbosity", "count", 0),
    ("quiet", "bool", False),
    ("read_to_gpu", "bool", False),
    ("multi_gpu", "bool", False),
    ("num_threads", "int", None),
    ("gpu_rich", "flag", False),
    ("async_write", "bool", False),
    ("write_threads", "int", 1),
)

# What raymerge does instead, for the flags that change nothing here (shown when given).
NOTES: dict[str, str] = {
    "allow_crimes": "raymerge has no architecture-name check to relax: inputs merge when "
    "their tensor names and shapes match, and the plan refuses what does not",
    "unsafe_truncate_embeddings": "raymerge never truncates embeddings: `tokenizer_source: "
    "base` cuts or pads vocabulary rows to the base's; other size mismatches are refused",
    "transformers_cache": "ignored: Hugging Face models are found in HF_HUB_CACHE (or "
    "HF_HOME), else read in place from the Hub (docs/hub.md)",
    "lora_merge_cache": "ignored: a LoRA input (model+lora) is applied to the rows as workers "
    "read them; no merged copy is written",
    "lora_merge_dtype": "ignored: a LoRA delta is computed in fp32 and rounded once to each "
    "base tensor's stored dtype",
    "low_cpu_memory": "ignored: each worker holds at most --worker-memory (default: half the "
    "node's memory over its workers); larger tensors are merged in row ranges",
    "clone_tensors": "ignored: every output tensor is written once, by its own work unit",
    "trust_remote_code": "ignored: raymerge runs no model code (it reads safetensors headers "
    "and JSON only)",
    "lazy_unpickle": "ignored: raymerge reads safetensors only, by ranged reads of the rows "
    "each worker needs",
    "write_model_card": "raymerge always writes README.md (the model card) and "
    "raymerge_config.yml beside the weights",
    "safe_serialization": "raymerge always writes safetensors (never pickled .bin files)",
    "verbosity": "ignored: raymerge prints the plan summary, a progress bar and a run summary "
    "(RAYMERGE_DEBUG=1 shows tracebacks of internal errors)",
    "read_to_gpu": "with --cuda, workers read into pinned buffers and copy them to their GPU",
    "num_threads": "ignored: raymerge runs one worker per CPU (set --workers or use `raymerge "
    "run --cpus-per-worker`)",
    "async_write": "ignored: workers always overlap reading, merging and writing",
    "write_threads": "ignored: every worker writes its own units",
}
DEFAULTS = {name: default for name, _, default in MERGEKIT_OPTIONS}
GPU_FLAGS = ("cuda", "multi_gpu", "gpu_rich")  # any of them: one worker per GPU
HELP = {
    "cuda": "merge on GPUs: one worker per GPU (raymerge run --gpus-per-worker 1)",
    "device": "cpu, cuda[:N] (as --cuda) or auto (CPUs); other devices are refused",
    "out_shard_size": "output shard size in bytes as mergekit reads it (5B = 5*10^9 bytes, "
    "500M), or a raymerge size (2GiB)  [default: 5B]",
    "copy_tokenizer": "copy tokenizer_source's tokenizer files",
    "random_seed": "seed of the random methods (raymerge run --seed; default 0)",
    "quiet": "no progress bar",
    "multi_gpu": "as --cuda",
    "gpu_rich": "as --cuda",
}


@dataclass
class Mapped:
    """What raymerge runs for a mergekit command line."""

    overrides: dict[str, Any] = field(default_factory=dict)  # load_spec overrides
    options: dict[str, Any] = field(default_factory=dict)  # RunOptions fields
    notes: list[str] = field(default_factory=list)  # one line per flag that changes nothing
    gpu_flag: str | None = None  # the flag that asked for GPUs, for error messages


def flag_name(name: str, value: Any = True) -> str:
    if name == "verbosity":
        return "-v"
    if name == "num_threads":
        return "--num-threads"
    return f"--{'' if value is not False else 'no-'}{name.replace('_', '-')}"


def parse_shard_size(value: Any) -> int:
    """--out-shard-size as mergekit reads it (common.parse_kmb: a count with an optional
    decimal k/m/b suffix; the shard's bytes, whatever its help says: "5B" is 5 * 10^9 bytes),
    else as a raymerge size ("500MiB")."""
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]+)([kKmMbB]?)", text)
    if match:
        size = (
            int(match.group(1))
            * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()]
        )
        if size > 0:
            return size
    try:
        return parse_size(text, "--out-shard-size")
    except (ConfigError, OverflowError, ValueError):  # "1e999GB" overflows
        raise ConfigError(
            f"--out-shard-size: {value!r} is not a size; write e.g. 5B (5 * 10^9 bytes, as "
            "mergekit reads it), 500M or 2GiB"
        ) from None


def map_flags(given: dict[str, Any]) -> Mapped:
    """raymerge's options for the mergekit flags a user gave (field name -> value, only the
    flags on the command line)."""
    mapped = Mapped()
    gpu_flags: list[str] = []
    cpu_flag: str | None = None
    for name, value in given.items():
        if name == "out_shard_size":
            mapped.overrides["shard_size"] = parse_shard_size(value)
        elif name == "random_seed":
            if value < 0:
                raise ConfigError(f"--random-seed: {value} must be a non-negative integer")
            mapped.overrides["seed"] = value
        elif name in GPU_FLAGS:
            if value:
                gpu_flags.append(flag_name(name))
        elif name == "device":
            kind = str(value).strip().lower().split(":", 1)[0]
            if kind == "cpu":
                cpu_flag = f"--device {value}"
            elif kind == "cuda":
                gpu_flags.append(f"--device {value}")
                if ":" in str(value):
                    mapped.notes.append(
                        f"--device {value}: one worker per GPU; Ray chooses each worker's GPU "
                        "(CUDA_VISIBLE_DEVICES limits which)"
                    )
            elif kind == "auto":
                mapped.notes.append(
                    "--device auto: raymerge merges on CPUs unless asked for GPUs (--cuda)"
                )
            else:
                raise ConfigError(
                    f"--device {value}: raymerge merges on CPUs or CUDA GPUs; use --device "
                    "cpu, --device cuda or --cuda"
                )
        elif name == "copy_tokenizer":
            mapped.options["copy_tokenizer"] = bool(value)
            if not value:
                mapped.notes.append(
                    "--no-copy-tokenizer: no tokenizer files are copied; tokenizer_source still "
                    "decides the embedding rows (`base`), and config.json is copied as always "
                    "(a tokenizer raymerge builds, `union`, is written, as mergekit does)"
                )
        elif name == "quiet":
            mapped.options["progress"] = not value
        elif name in NOTES:
            if value != DEFAULTS[name]:  # `--no-allow-crimes` asks for nothing: no note
                mapped.notes.append(f"{flag_name(name, value)}: {NOTES[name]}")
        else:
            raise AssertionError(f"mergekit option {name} has no mapping")
    if gpu_flags and cpu_flag:
        raise ConfigError(f"{gpu_flags[0]} and {cpu_flag} contradict each other; give one")
    if gpu_flags:
        mapped.options["gpus_per_worker"] = 1.0
        mapped.gpu_flag = gpu_flags[0]
        if any(f in ("--multi-gpu", "--gpu-rich") for f in gpu_flags):
            mapped.notes.append(
                "--multi-gpu/--gpu-rich: merging on every GPU of the Ray cluster, one worker "
                "per GPU (as `raymerge run --gpus-per-worker 1`)"
            )
    return mapped


def _mergekit_options(fn):
    """Declare mergekit-yaml's flags, as mergekit's add_merge_options does."""
    for name, kind, default in reversed(MERGEKIT_OPTIONS):
        dashed = name.replace("_", "-")
        text = HELP.get(name, "accepted; changes nothing here (a note says why)")
        if kind == "bool":
            option = click.option(f"--{dashed}/--no-{dashed}", name, default=default,
                                  show_default=True, help=text)  # fmt: skip
        elif kind == "flag":
            option = click.option(f"--{dashed}", name, is_flag=True, default=False, help=text)
        elif kind == "count":
            option = click.option("-v", name, count=True, help=text)
        elif kind == "int":
            decls = ["--num-threads", "-j"] if name == "num_threads" else [f"--{dashed}"]
            option = click.option(*decls, name, type=int, default=default, help=text)
        else:
            metavar = "SIZE" if kind == "size" else None
            option = click.option(f"--{dashed}", name, type=str, default=default, help=text,
                                  metavar=metavar)  # fmt: skip
        fn = option(fn)
    return fn


@click.command("raymerge-yaml", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out")
@_mergekit_options
@click.option("--address", help="Ray cluster address; default: start a local Ray on 127.0.0.1")
@click.option("--workers", type=click.IntRange(min=1), help="worker actors (default: one per "
              "CPU, or per GPU)")  # fmt: skip
@click.option("--worker-memory", help="bound on what one worker holds, e.g. 4GiB")
@click.option("--force", is_flag=True, help="overwrite raymerge's files in a non-empty OUT")
@click.version_option(package_name="raymerge")
@_guard
def main(config: str, out: str, address: str | None, workers: int | None,
         worker_memory: str | None, force: bool, **flags: Any) -> None:  # fmt: skip
    """Run mergekit-yaml's CONFIG into OUT (a folder or s3://bucket/prefix) with raymerge.

    Takes mergekit-yaml's flags: --out-shard-size (mergekit's reading: 5B is 5*10^9 bytes),
    --cuda / --device cuda / --multi-gpu / --gpu-rich (one worker per GPU), --random-seed,
    --copy-tokenizer/--no-copy-tokenizer, --quiet (no progress bar); the others are accepted
    with a note saying what raymerge does instead. `raymerge run` has all of raymerge's
    options."""
    from raymerge.config import load_spec
    from raymerge.runner import RunOptions, run_merge

    context = click.get_current_context()
    given = {
        name: value for name, value in flags.items()
        if context.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                  ParameterSource.ENVIRONMENT)
    }  # fmt: skip
    mapped = map_flags(given)
    for note in mapped.notes:
        click.echo(f"note: {note}", err=True)
    spec = load_spec(config, mapped.overrides)
    for warning in spec.warnings:
        click.echo(f"warning: {warning}", err=True)
    options = RunOptions(
        address=address, workers=workers, force=force,
        worker_memory=parse_size(worker_memory, "--worker-memory") if worker_memory else None,
        **mapped.options,
    )  # fmt: skip
    try:
        summary = run_merge(spec, out, options, log=lambda line: click.echo(line, err=True))
    except ConfigError as exc:
        if mapped.gpu_flag is None or not str(exc).startswith("--gpus-per-worker"):
            raise
        flag = mapped.gpu_flag
        text = str(exc).replace("--gpus-per-worker 1:", f"{flag} (--gpus-per-worker 1):", 1)
        raise ConfigError(text.replace("without --gpus-per-worker", f"without {flag}")) from None
    for line in summary.lines():
        click.echo(line)


def entry() -> None:
    """The console script; leaves as `raymerge` does (raymerge.cli.run_and_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    entry()
