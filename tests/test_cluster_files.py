"""cluster/ agrees with the Makefile's pins and with raymerge's CLI: the Dockerfile, the `ray up`
config, the KubeRay RayJob and the runtime_env are parsed and their fields that matter checked."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from raymerge.cli import main
from raymerge.config import load_spec
from raymerge.ray_cluster import WORKER_ENV

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
MAKEFILE = (ROOT / "Makefile").read_text()
CLUSTER_FILES = sorted(p for p in CLUSTER.iterdir() if p.is_file())
RUN = main.commands["run"]
RUN_OPTIONS = {opt for param in RUN.params for opt in param.opts + param.secondary_opts}
# EC2 instance families with NVIDIA GPUs
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en|p6-\w+)\.\w+$")


def makefile_pin(name: str) -> str:
    versions = set(re.findall(rf"(?<![\w.-]){name}==([0-9][^\s'\"]*)", MAKEFILE))
    assert len(versions) == 1, f"Makefile pins {name} {sorted(versions) or 'nowhere'}"
    return versions.pop()


RAY = makefile_pin("ray")
TORCH = makefile_pin("torch")


def text(name: str) -> str:
    return (CLUSTER / name).read_text()


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    instructions: list[str] = []
    pending = ""
    for line in text("Dockerfile").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
        else:
            instructions.append(" ".join(pending.split()))
            pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def ray_cluster() -> dict[str, Any]:
    return yaml.safe_load(text("ray-cluster.yaml"))


def rayjob_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text("rayjob.yaml")) if doc is not None]


def rayjob() -> dict[str, Any]:
    jobs = [doc for doc in rayjob_documents() if doc.get("kind") == "RayJob"]
    assert len(jobs) == 1, "cluster/rayjob.yaml must hold one RayJob"
    return jobs[0]


def runtime_env() -> dict[str, Any]:
    return yaml.safe_load(text("runtime_env.yaml"))


def pod_specs(job: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = job["spec"]["rayClusterSpec"]
    specs = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    specs += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return specs


def walk(node: Any):
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def parse_run(args: list[str], where: str) -> dict[str, Any]:
    """Check `raymerge run ARGS` against the real command: every option exists, and click
    parses the whole line (types, arguments) without running it."""
    unknown = sorted({a.split("=", 1)[0] for a in args if a.startswith("-")} - RUN_OPTIONS)
    assert not unknown, f"{where}: `raymerge run` has no option {unknown}"
    ctx = RUN.make_context("run", list(args))
    return ctx.params


def test_the_makefile_pins_are_versions():
    assert re.fullmatch(r"\d+\.\d+\.\d+", RAY), RAY
    assert re.fullmatch(r"\d+\.\d+\.\d+", TORCH), TORCH


def test_every_version_named_in_cluster_files_is_the_makefiles():
    for path in CLUSTER_FILES:
        body = path.read_text()
        for name, pin in (("ray", RAY), ("torch", TORCH)):
            named = re.findall(rf"(?<![\w.-]){name}==([0-9][^\s'\"]*)", body)
            named += re.findall(
                rf"(?<![\w.]){name}\.__version__(?:\.split\([^)]*\)\[0\])? == '([^']+)'", body
            )
            if name == "ray":  # image tags (rayproject/ray:X-..., raymerge:...-rayX-...)
                named += re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", body)
                named += re.findall(r"-ray(\d+\.\d+\.\d+)", body)
                named += re.findall(r"rayVersion: ['\"]?([^'\"\s]+)", body)
            wrong = sorted(set(named) - {pin})
            assert not wrong, f"{path.name} names {name} {wrong}; the Makefile pins {pin}"
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == RAY


def test_dockerfile_is_the_official_ray_gpu_image_at_the_pin():
    froms = [i for i in dockerfile() if i.upper().startswith("FROM ")]
    assert len(froms) == 1, froms
    match = re.fullmatch(r"FROM rayproject/ray:(\S+)", froms[0])
    assert match, f"{froms[0]!r}: not the official rayproject/ray image"
    # Ray publishes {version}-py3XX-{gpu|cuXYZ}
    assert re.fullmatch(rf"{re.escape(RAY)}-py3\d+-(gpu|cu\d+)", match.group(1)), match.group(1)


def test_dockerfile_installs_torch_first_then_raymerge_with_the_s3_extra_only():
    runs = [i for i in dockerfile() if i.startswith("RUN ") and "pip install" in i]
    torch_at = [n for n, i in enumerate(runs) if f"torch=={TORCH}" in i]
    raymerge_at = [n for n, i in enumerate(runs) if re.search(r"raymerge\[", i)]
    assert torch_at and raymerge_at, runs
    assert torch_at[0] < raymerge_at[0], "torch must be installed (pinned) before raymerge"
    assert not re.search(r"raymerge\[", runs[torch_at[0]]), "torch first, on its own"
    for instruction in runs:
        extras = re.findall(r"raymerge\[([^\]]*)\]", instruction)
        assert all(e.replace(" ", "") == "s3" for e in extras), f"extras {extras}: s3 only"
        assert " -e " not in instruction and "--editable" not in instruction
    copied = set()  # the sources of COPY: what the build has of the tree
    for instruction in dockerfile():
        if instruction.startswith("COPY "):
            copied.update(a for a in instruction.split()[1:-1] if not a.startswith("--"))
    missing = {"pyproject.toml", "README.md", "raymerge"} - copied
    assert not missing, f"the Dockerfile does not copy {sorted(missing)}, which the build needs"
    assert f"ENV MALLOC_ARENA_MAX={WORKER_ENV['MALLOC_ARENA_MAX']}" in dockerfile()


def test_ray_cluster_and_rayjob_run_the_dockerfiles_image():
    config = ray_cluster()
    docker = config["docker"]
    images = {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    for node_type in config["available_node_types"].values():
        if "worker_image" in node_type.get("docker", {}):
            images.add(node_type["docker"]["worker_image"])
    job_images = {
        container["image"] for _, spec in pod_specs(rayjob()) for container in spec["containers"]
    }
    assert len(images) == 1 and images == job_images, (images, job_images)
    image = images.pop()
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag and RAY in tag, f"{image}: the tag must name Ray {RAY}"
    built = re.search(r"docker build .*-t (\S+)", text("Dockerfile"))
    assert built and built.group(1) == image, "the Dockerfile's build command names another image"


def test_ray_cluster_config_passes_rays_own_checks():
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(ray_cluster())  # what `ray up` does first, offline
    util.validate_config(config)
    assert config["provider"]["type"] == "aws"


def test_ray_cluster_has_a_cpu_head_and_gpu_workers_kept_up():
    config = ray_cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head runs the driver, not GPU workers"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        instance = node_type["node_config"]["InstanceType"]
        assert GPU_INSTANCE.match(instance), f"{name}: {instance} has no GPU"
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name}: resources lack GPU"
        assert node_type["max_workers"] >= node_type.get("min_workers", 0)
    # raymerge counts GPUs when a run starts and does not wait for the autoscaler
    assert sum(t.get("min_workers", 0) for t in workers.values()) >= 1
    for name, node_type in types.items():  # S3 through an instance role, not keys
        assert node_type["node_config"]["IamInstanceProfile"], name
    # the cluster's commands must not install other versions over the image's
    for command in config.get("setup_commands", []) + config.get("head_setup_commands", []):
        assert "pip install" not in command or f"torch=={TORCH}" in command, command


def test_rayjob_runs_raymerge_on_the_cluster_it_made():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["raymerge", "run"], args
    params = parse_run(args[2:], "the RayJob entrypoint")
    # the entrypoint runs on the head: without --address raymerge would start its own Ray
    assert params["address"] == "auto"
    assert params["out"].startswith("s3://")
    assert params["gpus_per_worker"] > 0, "the workers are GPU pods: merge on the GPUs"


def test_rayjob_config_comes_from_its_configmap_and_parses(tmp_path):
    job = rayjob()
    config_path = shlex.split(job["spec"]["entrypoint"])[2]
    _, head = pod_specs(job)[0]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounts = [m for c in head["containers"] for m in c.get("volumeMounts", [])]
    mount = next(m for m in mounts if config_path.startswith(m["mountPath"].rstrip("/") + "/"))
    configmap = volumes[mount["name"]]["configMap"]["name"]
    maps = {
        doc["metadata"]["name"]: doc for doc in rayjob_documents() if doc["kind"] == "ConfigMap"
    }
    key = config_path[len(mount["mountPath"].rstrip("/")) + 1 :]
    local = tmp_path / key
    local.write_text(maps[configmap]["data"][key])
    spec = load_spec(str(local))
    assert spec.inputs


def test_rayjob_worker_groups_request_gpus():
    for name, spec in pod_specs(rayjob())[1:]:
        for container in spec["containers"]:
            resources = container["resources"]
            gpus = int(resources["limits"]["nvidia.com/gpu"])
            assert gpus >= 1, f"worker group {name} asks for no GPU"
            requested = resources.get("requests", {}).get("nvidia.com/gpu")
            assert requested is None or int(requested) == gpus, name


def test_every_raymerge_run_shown_in_cluster_files_parses():
    shown = 0
    for path in CLUSTER_FILES:
        for line in path.read_text().splitlines():
            match = re.search(r"\b(?:raymerge|python -m raymerge\.cli) run (.*)$", line)
            if match:
                parse_run(shlex.split(match.group(1)), f"{path.name}: {line.strip()}")
                shown += 1
    assert shown >= 3


def test_no_literal_aws_credentials():
    credential = re.compile(r"(?i)(secret|access_key|session_token|password)")
    for path in CLUSTER_FILES:
        body = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", body), f"{path.name}: an AWS key id"
        assert not re.search(
            r"(?i)aws_(secret_access_key|access_key_id|session_token)[ \t]*[=:][ \t]*['\"]?\w",
            body,
        ), f"{path.name}: a literal AWS credential"
        if path.suffix != ".yaml":
            continue
        for doc in yaml.safe_load_all(body):
            for mapping in walk(doc):
                name = mapping.get("name")
                if isinstance(name, str) and credential.search(name):  # a container's env
                    assert "value" not in mapping, f"{path.name}: {name} has a literal value"
                for key, value in mapping.items():
                    if credential.search(str(key)) and key != "secretKeyRef":
                        assert not isinstance(value, str | int), f"{path.name}: {key}: {value}"


def test_runtime_env_installs_raymerges_dependencies_with_the_torch_pin():
    env = runtime_env()
    pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    requirements = {Requirement(line).name.lower(): Requirement(line) for line in pip}
    assert str(requirements["torch"].specifier) == f"=={TORCH}"
    assert "ray" not in requirements, "the runtime_env must not replace the cluster's Ray"
    needed = set()
    for line in importlib.metadata.requires("raymerge") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": "s3"}):
            needed.add(req.name.lower())
    missing = sorted(needed - {"ray"} - set(requirements))
    assert not missing, f"runtime_env.yaml does not install {missing}"
    for key, value in WORKER_ENV.items():
        assert env["env_vars"].get(key) == value, key


def test_runtime_env_passes_rays_own_checks():
    runtime_env_module = pytest.importorskip("ray.runtime_env")
    runtime_env_module.RuntimeEnv(**runtime_env())
