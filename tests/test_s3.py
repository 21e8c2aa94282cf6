"""Merges from and to a real S3-compatible server (moto_server on 127.0.0.1): the same bytes
as local disk, through connections cut mid-transfer, after a driver killed mid-upload, and a
clear one-line error for each way the store can refuse.

The models are vocab-heavy (12,000 x 512 embeddings, three reduction blocks each); with 5 MiB
parts and tensors over two parts cut across parts, the embedding spans several upload parts,
and a small --worker-memory cuts each part into several work units.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from raymerge import plan as plan_module
from raymerge.checkpoint import open_checkpoint
from raymerge.cli import main
from raymerge.config import parse_spec
from raymerge.errors import ConfigError, MergeFailed
from raymerge.index import verify
from raymerge.plan import make_plan
from raymerge.runner import RunOptions, run_merge
from raymerge.storage import s3
from raymerge.synth import SynthOptions, synthesize
from tests.conftest import write_config

SCRIPT = os.path.join(os.path.dirname(sys.executable), "raymerge")
SIZES = {"shard_size": 30_000_000, "part_size": 5 << 20}
OUTPUT_FILES = ("model.safetensors.index.json", "config.json")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("wide")
    options = SynthOptions(models=2, with_base=True, layers=2, hidden=512, intermediate=1024,
                           vocab=12_000, shard_size=20_000_000, seed=5)  # fmt: skip
    return synthesize(str(out), options)


@pytest.fixture
def parts_cut(monkeypatch):
    """Tensors over two parts are cut across parts (instead of over 16), so the 12 MB
    embedding spans several 5 MiB upload parts."""
    monkeypatch.setattr(plan_module, "WHOLE_TENSOR_PARTS", 2)


def upload(bucket, folder: str, prefix: str) -> str:
    for name in sorted(os.listdir(folder)):
        bucket.client.upload_file(os.path.join(folder, name), bucket.bucket, f"{prefix}/{name}")
    return bucket.uri(prefix)


def ties(paths: dict[str, str]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": paths["base"],
        "models": [
            {"model": paths["model_1"], "parameters": {"weight": 0.7, "density": 0.4}},
            {"model": paths["model_2"], "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "dtype": "bfloat16",
    }


def splitting_memory(spec) -> int:
    """Room for one block of the embedding per unit: each 3-block part gets 3 units."""
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    tensor = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    return tensor.memory_per_row() * tensor.block_rows


def merge(body: dict, out: str, tmp_path, endpoint: str, **options):
    spec = parse_spec(body, "c", str(tmp_path), SIZES)
    s3.configure(s3.S3Settings(endpoint))  # for planning here; run_merge sets its own
    options.setdefault("worker_memory", splitting_memory(spec))
    run = RunOptions(progress=False, workers=2, s3_endpoint=endpoint, **options)
    return run_merge(spec, out, run, log=lambda _: None)


def local_files(folder) -> dict[str, bytes]:
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors") or n in OUTPUT_FILES]
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(names)}


def s3_files(bucket, prefix: str) -> dict[str, bytes]:
    listed = bucket.client.list_objects_v2(Bucket=bucket.bucket, Prefix=prefix + "/")
    names = [o["Key"][len(prefix) + 1:] for o in listed.get("Contents", [])]
    names = [n for n in names if n.endswith(".safetensors") or n in OUTPUT_FILES]
    return {
        n: bucket.client.get_object(Bucket=bucket.bucket, Key=f"{prefix}/{n}")["Body"].read()
        for n in sorted(names)
    }


def open_uploads(bucket) -> list:
    return bucket.client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads", [])


@pytest.fixture
def reference(ray_local, wide, tmp_path_factory, parts_cut):
    """The local -> local merge every other one must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = merge(ties(wide), str(out), out.parent, endpoint=None)
    embedding = next(t for t in summary.plan.tensors if t.name == "model.embed_tokens.weight")
    parts = [p for p in summary.plan.parts if p.shard == embedding.shard
             and p.start < embedding.end and p.end > embedding.start]  # fmt: skip
    assert len(parts) >= 2, "the embedding must span several upload parts"
    units = [u for u in summary.plan.units if u.part == parts[0].number
             and u.shard == parts[0].shard]  # fmt: skip
    assert len(units) >= 2, "a part must be filled by several work units"
    return local_files(out)


@pytest.mark.ray
@pytest.mark.slow
def test_local_s3_and_back_give_identical_bytes(reference, wide, s3_bucket, tmp_path):
    remote = {name: upload(s3_bucket, path, f"in/{name}") for name, path in wide.items()}
    merge(ties(wide), s3_bucket.uri("local-to-s3"), tmp_path, s3_bucket.endpoint)
    merge(ties(remote), str(tmp_path / "s3-to-local"), tmp_path, s3_bucket.endpoint)
    mixed = dict(remote, model_2=wide["model_2"])  # some inputs local, some in S3
    merge(ties(mixed), s3_bucket.uri("s3-to-s3"), tmp_path, s3_bucket.endpoint)
    assert s3_files(s3_bucket, "local-to-s3") == reference
    assert local_files(tmp_path / "s3-to-local") == reference
    assert s3_files(s3_bucket, "s3-to-s3") == reference
    assert open_uploads(s3_bucket) == []
    shard = next(n for n in reference if n.endswith(".safetensors"))
    head = s3_bucket.client.head_object(Bucket=s3_bucket.bucket, Key=f"s3-to-s3/{shard}",
                                        PartNumber=1)  # fmt: skip
    assert head["PartsCount"] >= 3  # one multipart upload per shard, several parts
    s3.configure(s3.S3Settings(s3_bucket.endpoint))
    assert verify(s3_bucket.uri("s3-to-s3")).problems == []
    listed = invoke("inspect", remote["base"], "--s3-endpoint", s3_bucket.endpoint)
    assert listed.exit_code == 0 and "model.embed_tokens.weight" in listed.output, listed.output
    checked = invoke("verify", s3_bucket.uri("local-to-s3"), "--s3-endpoint", s3_bucket.endpoint)
    assert checked.exit_code == 0 and checked.output.startswith("ok: "), checked.output


@pytest.mark.ray
def test_open_fetches_one_tensor_with_one_ranged_get(ray_local, wide, s3_bucket, tmp_path):
    import raymerge

    merge(ties(wide), s3_bucket.uri("out"), tmp_path, s3_bucket.endpoint, worker_memory=None)
    merge(ties(wide), str(tmp_path / "local"), tmp_path, s3_bucket.endpoint, worker_memory=None)
    s3.configure(s3.S3Settings(s3_bucket.endpoint))
    remote = raymerge.open(s3_bucket.uri("out"))
    gets = []

    def count(request, **_) -> None:
        gets.append(request.headers.get("Range"))

    events = s3.client().meta.events
    events.register("before-send.s3.GetObject", count)
    name = "model.layers.0.mlp.up_proj.weight"
    try:
        tensor = remote[name]
    finally:
        events.unregister("before-send.s3.GetObject", count)
    assert len(gets) == 1 and gets[0] is not None, gets  # one ranged GET
    assert tensor.shape == (1024, 512)
    assert bool((raymerge.open(str(tmp_path / "local"))[name] == tensor).all())
    assert len(remote) == len(reference_names(tmp_path / "local"))


def reference_names(folder) -> list[str]:
    from raymerge.reader import MergedModel

    return list(MergedModel(str(folder)))


@pytest.mark.ray
@pytest.mark.slow
def test_connections_cut_mid_transfer(reference, wide, s3_bucket, cutting_proxy, tmp_path):
    remote = {name: upload(s3_bucket, path, f"in/{name}") for name, path in wide.items()}
    proxy = cutting_proxy(cut_every=4, after_bytes=1 << 20)  # every 4th request over 1 MiB
    merge(ties(remote), s3_bucket.uri("out"), tmp_path, proxy.endpoint)
    assert proxy.cuts >= 3, proxy.cuts
    assert s3_files(s3_bucket, "out") == reference
    assert open_uploads(s3_bucket) == []


def start_driver(config: str, out: str, endpoint: str, fault: str | None, marker_dir):
    """`raymerge run` in its own process group (its local Ray's processes go with it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if fault:
        env["RAYMERGE_FAULT"] = f"{fault}:{marker_dir}"
    return subprocess.Popen(
        [SCRIPT, "run", config, out, "--workers", "1", "--no-progress", "--s3-endpoint",
         endpoint, "--shard-size", "30MB", "--part-size", "5MiB"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow
def test_driver_killed_mid_upload_resumes(wide, s3_bucket, tmp_path):
    config = write_config(tmp_path / "c.yaml", ties(wide))
    spec = parse_spec(ties(wide), "c", str(tmp_path), SIZES)
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs], 1 << 40)
    jobs = plan.part_jobs()
    last = min(jobs, key=lambda j: (j.nbytes, j.key))  # the lone worker starts it last
    out = s3_bucket.uri("out")
    driver = start_driver(config, out, s3_bucket.endpoint, f"hang:{last.key}", tmp_path)
    deadline = time.monotonic() + 180
    while not (tmp_path / f"fault-{last.key}").exists():
        assert time.monotonic() < deadline and driver.poll() is None, driver.communicate()
        time.sleep(0.1)
    time.sleep(1.0)  # let the parts in flight land
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    uploads = open_uploads(s3_bucket)
    assert uploads, "the killed run leaves its uploads for the rerun"
    uploaded = {}
    for upload in uploads:
        parts = s3_bucket.client.list_parts(Bucket=s3_bucket.bucket, Key=upload["Key"],
                                            UploadId=upload["UploadId"]).get("Parts", [])
        uploaded[upload["Key"].rsplit("/", 1)[1]] = {p["PartNumber"] for p in parts}
    names = [s.name for s in plan.shards]
    kept = [u for u in plan.units if u.part in uploaded.get(names[u.shard], set())]
    assert kept, "some parts were uploaded before the kill"
    rerun = subprocess.run(
        [SCRIPT, "run", config, out, "--workers", "2", "--no-progress", "--s3-endpoint",
         s3_bucket.endpoint, "--shard-size", "30MB", "--part-size", "5MiB"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    line = next(x for x in rerun.stdout.splitlines() if x.startswith("work units:"))
    merged, resumed = (int(w) for w in line.replace(",", "").split()[2:5:2])
    # every unit of an uploaded part was resumed, so no finished part was sent again
    assert resumed >= len(kept) and merged + resumed == len(plan.units), (line, len(kept))
    assert open_uploads(s3_bucket) == []
    clean = str(tmp_path / "clean")
    subprocess.run([SCRIPT, "run", config, clean, "--workers", "2", "--no-progress",
                    "--shard-size", "30MB", "--part-size", "5MiB"], check=True,
                   capture_output=True)  # fmt: skip
    assert s3_files(s3_bucket, "out") == local_files(clean)


# --- errors: one line, the right exit code, nothing that looks complete --------------------


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails(result, code: int, *fragments: str) -> str:
    output = result.output.strip()
    assert isinstance(result.exception, SystemExit), (result.exception, output)
    assert result.exit_code == code, output
    assert len(output.splitlines()) == 1 and output.startswith("error: "), output
    assert "Traceback" not in output and "internal error" not in output, output
    for fragment in fragments:
        assert fragment in output, output
    return output


def test_missing_bucket(wide, s3_bucket, tmp_path):
    config = write_config(tmp_path / "c.yaml", ties(wide))
    fails(invoke("run", config, "s3://no-such-bucket/out", "--s3-endpoint", s3_bucket.endpoint),
          2, "no-such-bucket", "does not exist")  # fmt: skip
    remote = dict(wide, model_1="s3://no-such-bucket/m1")
    config = write_config(tmp_path / "r.yaml", ties(remote))
    fails(invoke("plan", config, "--s3-endpoint", s3_bucket.endpoint), 2, "bucket does not exist")
    fails(invoke("inspect", "s3://no-such-bucket/m", "--s3-endpoint", s3_bucket.endpoint), 2,
          "bucket does not exist")  # fmt: skip


def test_wrong_credentials(wide, s3_auth_server, tmp_path):
    """The test keys are unknown to a server that checks them: access denied, exit 2."""
    bucket = s3_auth_server.new_bucket()
    config = write_config(tmp_path / "c.yaml", ties(wide))
    output = fails(invoke("run", config, bucket.uri("out"), "--s3-endpoint", bucket.endpoint),
                   2, "access denied", "credentials")  # fmt: skip
    assert "testing" not in output  # credentials are never printed
    fails(invoke("inspect", bucket.uri("m"), "--s3-endpoint", bucket.endpoint), 2,
          "access denied", "InvalidAccessKeyId")  # fmt: skip


def test_endpoint_that_does_not_answer(wide, tmp_path, monkeypatch):
    from tests.s3_support import free_port

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    endpoint = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "c.yaml", ties(wide))
    fails(invoke("run", config, "s3://bkt/out", "--s3-endpoint", endpoint), 1,
          "does not answer", endpoint)  # fmt: skip
    fails(invoke("inspect", "s3://bkt/m", "--s3-endpoint", endpoint), 1, "does not answer")


def test_prefix_with_no_checkpoint(wide, s3_bucket, tmp_path):
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key="junk/readme.txt", Body=b"hi")
    for prefix, why in (("empty", "nothing is stored"), ("junk", "no *.safetensors")):
        remote = dict(wide, model_1=s3_bucket.uri(prefix))
        config = write_config(tmp_path / "c.yaml", ties(remote))
        fails(invoke("plan", config, "--s3-endpoint", s3_bucket.endpoint), 2, why)


def test_part_below_s3_minimum(wide, s3_bucket, tmp_path):
    config = write_config(tmp_path / "c.yaml", ties(wide))
    fails(invoke("run", config, s3_bucket.uri("out"), "--s3-endpoint", s3_bucket.endpoint,
                 "--part-size", "1MiB"), 2, "5.00 MiB minimum")  # fmt: skip


@pytest.mark.ray
def test_store_that_rejects_a_part(ray_local, wide, s3_bucket, tmp_path):
    """A bucket policy refuses the shards' parts (not the ledger's files): one line, no
    COMPLETE, and no upload left open."""
    s3_bucket.deny(("s3:PutObject",), key_pattern="out/model-*")
    with pytest.raises((ConfigError, MergeFailed), match="uploading part") as raised:
        merge(ties(wide), s3_bucket.uri("out"), tmp_path, s3_bucket.endpoint, worker_memory=None)
    assert len(str(raised.value).splitlines()) == 1
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.bucket, Prefix="out/")
    keys = {o["Key"] for o in listed.get("Contents", [])}
    assert "out/COMPLETE" not in keys and not any(k.endswith(".safetensors") for k in keys)
    assert open_uploads(s3_bucket) == []
    s3_bucket.clear_policy()
    merge(ties(wide), s3_bucket.uri("out"), tmp_path, s3_bucket.endpoint, worker_memory=None)
    assert "out/COMPLETE" in {
        o["Key"] for o in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.bucket)["Contents"]
    }


@pytest.mark.ray
def test_force_aborts_recorded_uploads(ray_local, wide, s3_bucket, tmp_path):
    """An unfinished upload the ledger names is aborted by --force, and a stray one for a
    shard's key (a run killed before its ledger named it) by the next run."""
    out = s3_bucket.uri("out")
    merge(ties(wide), out, tmp_path, s3_bucket.endpoint, worker_memory=None)
    shard = next(n for n in local_files_names(s3_bucket, "out") if n.endswith(".safetensors"))
    stray = s3_bucket.client.create_multipart_upload(Bucket=s3_bucket.bucket, Key=f"out/{shard}")
    s3_bucket.client.delete_object(Bucket=s3_bucket.bucket, Key="out/COMPLETE")
    merge(ties(wide), out, tmp_path, s3_bucket.endpoint, worker_memory=None, force=True)
    assert open_uploads(s3_bucket) == [], stray["UploadId"]


def local_files_names(bucket, prefix: str) -> list[str]:
    listed = bucket.client.list_objects_v2(Bucket=bucket.bucket, Prefix=prefix + "/")
    return [o["Key"][len(prefix) + 1:] for o in listed.get("Contents", [])]
