"""The `raymerge` command: a thin click layer, one library call per subcommand.

User errors print one line (or one list) on stderr and exit 2 (usage/config) or 1 (data or
run failure), never a traceback; RAYMERGE_DEBUG=1 shows tracebacks of unexpected errors.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from raymerge.errors import MergeFailed, RaymergeError
from raymerge.layouts import LAYOUTS as LAYOUT_NAMES
from raymerge.sizes import human


def _fail(exc: RaymergeError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn RaymergeError into a clean message and exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RaymergeError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug: say so plainly, keep the traceback one switch away
            if os.environ.get("RAYMERGE_DEBUG"):
                traceback.print_exc()
            click.echo(
                f"internal error: {type(exc).__name__}: {exc} (set RAYMERGE_DEBUG=1 for the "
                "traceback and report it)",
                err=True,
            )
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="raymerge")
def main() -> None:
    """Merge model checkpoints (mergekit configs) on a Ray cluster."""


def _overrides(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _s3_endpoint_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--s3-endpoint, applied to this process's S3 clients before the command runs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, s3_endpoint: str | None = None, **kwargs: Any) -> Any:
        from raymerge.storage import s3

        s3.configure(s3.S3Settings.resolve(s3_endpoint))
        return fn(*args, **kwargs)

    return S3_ENDPOINT(wrapper)


S3_ENDPOINT = click.option(
    "--s3-endpoint",
    help="endpoint URL of an S3-compatible store (MinIO, Ceph, R2); default: "
    "AWS_ENDPOINT_URL, else AWS S3",
)


def _hub_download_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--download: Hugging Face repo ids are fetched into the local cache before use."""

    @functools.wraps(fn)
    def wrapper(*args: Any, download: bool = False, **kwargs: Any) -> Any:
        from raymerge.storage import hub

        previous = hub.configure(download=download)
        try:
            return fn(*args, **kwargs)
        finally:
            hub.configure(download=previous)

    return click.option(
        "--download", is_flag=True,
        help="fetch Hugging Face models (org/name) into the local cache first (their "
        "safetensors, index, config and tokenizer files) instead of reading them in place",
    )(wrapper)  # fmt: skip


_MERGE_OPTIONS = (
    click.option("--address", help="Ray cluster address; default: start a local Ray on 127.0.0.1"),
    click.option(
        "--workers", type=click.IntRange(min=1),
        help="worker actors (default: one per CPU, or per GPU)",
    ),  # fmt: skip
    click.option("--cpus-per-worker", type=click.FloatRange(min=0), default=1.0,
                 show_default=True),  # fmt: skip
    click.option(
        "--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
        help="merge on GPUs: each worker actor holds this many",
    ),  # fmt: skip
    click.option("--shard-size", help="output shard size, e.g. 5GB (default) or 500MiB"),
    click.option("--part-size", help="write part size, e.g. 64MiB (default)"),
    click.option(
        "--worker-memory",
        help="bound on what one worker holds, e.g. 4GiB (default: half the node's memory over "
        "its workers); larger tensors are merged in row ranges",
    ),
    click.option("--dtype", help="output dtype (bfloat16, float16, float32); overrides the config"),
    click.option("--seed", type=click.IntRange(min=0), help="seed for random methods (default 0)"),
    click.option("--force", is_flag=True, help="overwrite raymerge's files in a non-empty OUT"),
    click.option("--fsync", is_flag=True, help="flush every shard to disk before it is committed"),
    click.option("--no-progress", is_flag=True, help="no progress bar"),
    click.option(
        "--allow-local-destination", is_flag=True,
        help="on a multi-node cluster, OUT is a local path every node shares (NFS, Lustre, ...)",
    ),  # fmt: skip
    click.option(
        "--s3-retry-mode", type=click.Choice(["standard", "adaptive"]),
        help="botocore's retry mode for S3 (default: AWS_RETRY_MODE, else standard)",
    ),  # fmt: skip
    S3_ENDPOINT,
)


def _merge_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options `run` and `batch` share."""
    for option in reversed(_MERGE_OPTIONS):
        fn = option(fn)
    return fn


def _run_options(
    address: str | None, workers: int | None, cpus_per_worker: float, gpus_per_worker: float,
    worker_memory: str | None, force: bool, fsync: bool, no_progress: bool,
    allow_local_destination: bool, s3_retry_mode: str | None, s3_endpoint: str | None,
    **_: Any,
):  # fmt: skip
    from raymerge.runner import RunOptions
    from raymerge.sizes import parse_size

    return RunOptions(
        address=address,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        force=force,
        fsync=fsync,
        progress=not no_progress,
        worker_memory=parse_size(worker_memory, "--worker-memory") if worker_memory else None,
        s3_retry_mode=s3_retry_mode,
        s3_endpoint=s3_endpoint,
        allow_local_destination=allow_local_destination,
    )


def _spec_overrides(shard_size: str | None, part_size: str | None, dtype: str | None,
                    seed: int | None, **_: Any) -> dict[str, Any]:  # fmt: skip
    return _overrides(shard_size=shard_size, part_size=part_size, dtype=dtype, seed=seed)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out")
@_merge_options
@_guard
@_hub_download_option
def run(config: str, out: str, **flags: Any) -> None:
    """Merge the models in CONFIG into the folder (or s3://bucket/prefix) OUT."""
    from raymerge.config import load_spec
    from raymerge.runner import run_merge

    spec = load_spec(config, _spec_overrides(**flags))
    for warning in spec.warnings:
        click.echo(f"warning: {warning}", err=True)
    summary = run_merge(spec, out, _run_options(**flags),
                        log=lambda line: click.echo(line, err=True))  # fmt: skip
    for line in summary.lines():
        click.echo(line)


@main.command()
@click.argument("batch_file", metavar="BATCH", type=click.Path(dir_okay=False))
@click.argument("out_prefix", metavar="OUT_PREFIX")
@click.option("--dry-run", is_flag=True, help="list the recipes and the bytes read; merge nothing")
@_merge_options
@_hub_download_option
@_guard
def batch(batch_file: str, out_prefix: str, dry_run: bool, **flags: Any) -> None:
    """Merge every recipe in BATCH (mergekit-multi's multi-document YAML, grids,
    combinations) into OUT_PREFIX/NAME, reading each input byte once."""
    from raymerge.batch_runner import dry_run as list_batch
    from raymerge.batch_runner import run_batch

    options = _run_options(**flags)
    if dry_run:
        for line in list_batch(batch_file, out_prefix, options, _spec_overrides(**flags)):
            click.echo(line)
        return
    summary = run_batch(batch_file, out_prefix, options, _spec_overrides(**flags),
                        log=lambda line: click.echo(line, err=True))  # fmt: skip
    for line in summary.lines():
        click.echo(line)
    if summary.failed:
        _fail(MergeFailed(
            f"{len(summary.failed)} of {len(summary.runs)} recipe(s) did not finish: "
            f"{', '.join(summary.failed)}; the rest are complete; fix the failed ones and rerun "
            "the same command: it skips complete recipes and resumes the others"
        ))  # fmt: skip


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--shard-size", help="output shard size, e.g. 5GB (default)")
@click.option("--part-size", help="write part size, e.g. 64MiB (default)")
@click.option("--worker-memory", help="bound on what one worker holds, e.g. 4GiB")
@click.option("--workers", type=click.IntRange(min=1), help="workers the default memory is for")
@click.option("--dtype", help="output dtype; overrides the config")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--layout", type=click.Choice(list(LAYOUT_NAMES)),
    help="take every model of CONFIG as a virtual checkpoint of this architecture (real "
    "tensor names and shapes, no files): plan a merge of models you do not have",
)  # fmt: skip
@click.option(
    "--scale", type=click.IntRange(min=1), default=None,
    help="with --layout: divide every width by this (same tensor names and count)",
)  # fmt: skip
@_guard
@_s3_endpoint_option
@_hub_download_option
def plan(
    config: str, shard_size: str | None, part_size: str | None, worker_memory: str | None,
    workers: int | None, dtype: str | None, as_json: bool, layout: str | None,
    scale: int | None,
) -> None:  # fmt: skip
    """Show the plan for CONFIG without reading any weights."""
    from raymerge.checkpoint import open_checkpoint
    from raymerge.config import load_spec
    from raymerge.errors import ConfigError
    from raymerge.methods import REGISTRY
    from raymerge.plan import make_plan, split_problem
    from raymerge.runner import default_worker_memory
    from raymerge.sizes import parse_size

    overrides = _overrides(shard_size=shard_size, part_size=part_size, dtype=dtype)
    if layout is not None:
        spec = _virtual_spec(config, overrides, layout, scale or 1)
    elif scale is not None:
        raise ConfigError("--scale divides the widths of a --layout; give --layout NAME too")
    else:
        spec = load_spec(config, overrides)
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    memory = (
        parse_size(worker_memory, "--worker-memory")
        if worker_memory
        else default_worker_memory(workers)
    )
    the_plan = make_plan(spec, checkpoints, memory)
    method = REGISTRY[the_plan.method]
    largest = max(the_plan.units, key=lambda u: (u.io_bytes + u.scratch, u.nbytes))
    merged = [t for t in the_plan.tensors if t.op != "copy"]
    whole_only = [t for t in merged if split_problem(spec, t)]
    report = {
        "method": the_plan.method,
        "inputs": [
            {
                "model": m.given,
                "path": m.path,
                "role": "base" if i == spec.base_input else "model",
                "bytes": c.total_bytes,
            }
            for i, (m, c) in enumerate(zip(spec.inputs, checkpoints))
        ],
        "tensors": len(the_plan.tensors),
        "shards": [{"name": s.name, "bytes": s.size} for s in the_plan.shards],
        "parts": len(the_plan.parts),
        "units": len(the_plan.units),
        "split_tensors": [the_plan.tensors[i].name for i in the_plan.split_tensors()],
        "largest_unit": {
            "key": largest.key, "bytes": largest.nbytes,
            "memory": largest.io_bytes + largest.scratch,
        },
        "worker_memory": memory,
        "locality": method.locality,
        "merged_tensors": len(merged),
        "whole_only": len(whole_only),  # merged tensors the method cannot cut into rows
        "bytes_to_read": the_plan.bytes_to_read,
        "bytes_to_write": the_plan.bytes_to_write,
        "peak_worker_bytes": the_plan.peak_worker_bytes(),
        "digest": the_plan.digest,
        "stage": None if the_plan.stage is None else the_plan.stage.summary,
        # the most one worker holds for one item of the data stage (in peak_worker_bytes too)
        "stage_worker_bytes": None if the_plan.stage is None else the_plan.stage.worker_bytes,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for warning in spec.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(format_plan(report))


def _virtual_spec(config: str, overrides: dict[str, Any], layout: str, scale: int):
    """CONFIG with every model reference read as virtual://LAYOUT/<reference>?scale=N."""
    from raymerge.config import _load_yaml, parse_spec
    from raymerge.layouts import virtual_config

    data = virtual_config(_load_yaml(config), layout, scale)
    return parse_spec(data, config, os.path.dirname(os.path.abspath(config)), overrides)


def _whole_only(report: dict[str, Any]) -> str:
    """What the plan says of tensors the method cannot split."""
    count, merged = report["whole_only"], report["merged_tensors"]
    if not count:
        return ""
    if count == merged:
        return " (cannot split a tensor: each must fit whole)"
    return f" ({count} of {merged} merged tensors cannot be split: each must fit whole)"


def format_plan(report: dict[str, Any]) -> str:
    lines = [f"method: {report['method']}", "inputs:"]
    for item in report["inputs"]:
        lines.append(f"  {item['role']:5} {item['model']}  ({human(item['bytes'])})")
    lines.append(f"tensors: {report['tensors']}")
    lines.append(f"shards: {len(report['shards'])}")
    for shard in report["shards"]:
        lines.append(f"  {shard['name']}  {human(shard['bytes'])}")
    largest = report["largest_unit"]
    split = report["split_tensors"]
    lines += [
        f"write parts: {report['parts']}",
        f"work units: {report['units']} (largest: {human(largest['bytes'])} of output, "
        f"{human(largest['memory'])} while merging)",
        f"method locality: {report['locality']}" + _whole_only(report),
        f"tensors split into row ranges: {len(split)}"
        + (f" ({', '.join(split[:4])}{', ...' if len(split) > 4 else ''})" if split else ""),
        f"bytes to read: {human(report['bytes_to_read'])}",
        f"bytes to write: {human(report['bytes_to_write'])}",
        f"memory per worker: at most {human(report['peak_worker_bytes'])} of data (bound "
        f"--worker-memory {human(report['worker_memory'])}) plus the fixed overhead of a "
        "worker process (about 0.5 GiB)",
    ]
    if report.get("stage"):
        lines.append(report["stage"])
    return "\n".join(lines)


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_guard
@_s3_endpoint_option
def inspect(checkpoint: str, as_json: bool) -> None:
    """List the tensors of CHECKPOINT (folder, .safetensors file or s3:// prefix) from its
    headers."""
    from raymerge.checkpoint import open_checkpoint
    from raymerge.mapping import natural_key

    ckpt = open_checkpoint(checkpoint)
    rows = [ckpt.tensors[n] for n in sorted(ckpt.tensors, key=natural_key)]
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": t.name,
                        "file": t.file,
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "bytes": t.nbytes,
                    }
                    for t in rows
                ],
                indent=2,
            )
        )
        return
    width = max(len(t.name) for t in rows)
    for t in rows:
        click.echo(
            f"{t.name:<{width}}  {t.dtype:<5} {str(list(t.shape)):<18} "
            f"{human(t.nbytes):>11}  {t.file}"
        )
    dtypes = sorted({t.dtype for t in rows})
    click.echo(
        f"{len(rows)} tensors in {len(ckpt.files)} file(s), {human(ckpt.total_bytes)}, "
        f"dtypes: {', '.join(dtypes)}"
    )


@main.command()
@click.argument("out")
@_guard
@_s3_endpoint_option
def verify(out: str) -> None:
    """Recheck every tensor of a merge output in OUT (folder or s3:// prefix) against its
    tensors.parquet."""
    from raymerge.errors import CheckpointError
    from raymerge.index import verify as verify_output

    report = verify_output(out)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    if report.problems:
        raise CheckpointError(f"{out}: {len(report.problems)} problem(s) found")
    click.echo(
        f"ok: {report.tensors} tensors in {report.shards} shard(s), "
        f"{human(report.bytes_checked)} checked"
    )


@main.command()
@click.argument("out")
@click.option("--models", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--with-base", is_flag=True, help="also write the shared base as OUT/base")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--intermediate", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--vocab", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--shard-size", default="500MB", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@_guard
def synth(
    out: str,
    models: int,
    with_base: bool,
    layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    shard_size: str,
    dtype: str,
    seed: int,
) -> None:
    """Write synthetic Llama-layout checkpoints (a base plus per-model deltas) under OUT."""
    from raymerge.dtypes import parse_config_dtype, torch_dtype
    from raymerge.sizes import parse_size
    from raymerge.synth import SynthOptions, synthesize

    options = SynthOptions(
        models=models,
        with_base=with_base,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        vocab=vocab,
        shard_size=parse_size(shard_size, "--shard-size"),
        seed=seed,
        dtype=torch_dtype(parse_config_dtype(dtype, "--dtype")),
    )
    dirs = synthesize(out, options)
    for role, path in dirs.items():
        click.echo(f"{role}: {path}")


def entry() -> None:
    """The console script: run the command, flush, and leave at once (run_and_exit)."""
    run_and_exit(main)


def run_and_exit(command: Callable[[], Any]) -> None:
    """Run a console script's click command, flush, and leave at once. A local Ray started
    for the run ends with this process (its processes are tied to the driver), so the
    shutdown costs nothing on the way out; os._exit also skips interpreter teardown, where
    Arrow's thread pools can abort (apache/arrow#34314)."""
    from raymerge import ray_cluster

    ray_cluster.exit_after = True
    code: int = 0
    try:
        command()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    ray_cluster.end_local_ray()
    os._exit(code)


if __name__ == "__main__":
    entry()
