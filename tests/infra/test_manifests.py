"""The deployment files in infra/ agree with each other and with the real CLI.

Static checks only (no docker, no Kubernetes) of our own intent: one image everywhere, one GPU per GPU worker,
credentials only from secrets, and a RayJob entrypoint that ``hqlabel``'s own parser accepts. Whether the
manifests are well-formed at all is checked against the upstream schemas in test_schemas.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from hqlabel import __version__
from hqlabel.jobs.cli import build_parser

INFRA = Path(__file__).resolve().parents[2] / "infra"
DOCKERFILE = INFRA / "Dockerfile"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
MANIFESTS = [RAYCLUSTER, RAYJOB, AWS_CLUSTER]

GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e)\.")
# An AWS access key id, or a 40-character secret access key given as a value.
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
AWS_SECRET_VALUE = re.compile(r"(?i)aws_secret_access_key\W{0,3}[:=]\s*['\"]?[A-Za-z0-9/+]{40}")


def _load(path: Path) -> dict:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _cluster_spec(path: Path) -> dict:
    doc = _load(path)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _dockerfile_image() -> str:
    match = re.search(r'io\.hqlabel\.image="([^"]+)"', DOCKERFILE.read_text())
    assert match, "infra/Dockerfile must carry LABEL io.hqlabel.image=<the image it builds>"
    return match.group(1)


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"infra/Dockerfile has no ARG {name}=..."
    return match.group(1)


def _env_vars(node) -> list[dict]:
    """Every entry of every ``env:`` list anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        found = (
            [e for e in node.get("env", []) if isinstance(e, dict)]
            if isinstance(node.get("env"), list)
            else []
        )
        return found + [e for key, value in node.items() if key != "env" for e in _env_vars(value)]
    if isinstance(node, list):
        return [e for value in node for e in _env_vars(value)]
    return []


def test_one_image_everywhere():
    image = _dockerfile_image()
    assert image.endswith(f":{__version__}"), f"the tag of {image} is not the package version {__version__}"
    assert f"-t {image} " in DOCKERFILE.read_text(), "the Dockerfile's build command tags another image"
    for path in (RAYCLUSTER, RAYJOB):
        images = {c["image"] for c in _containers(_cluster_spec(path))}
        assert images == {image}, f"{path.name}: {images} != {image}"
    assert _load(AWS_CLUSTER)["docker"]["image"] == image


def test_ray_version_matches_the_image():
    ray_version = _dockerfile_arg("RAY_VERSION")
    for path in (RAYCLUSTER, RAYJOB):
        assert _cluster_spec(path)["rayVersion"] == ray_version, path.name


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_gpu_workers_one_gpu_each(path):
    spec = _cluster_spec(path)
    assert "num-gpus" not in spec["headGroupSpec"]["rayStartParams"]
    for container in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}), "GPU on the head"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{path.name} has no worker group"
    for group in groups:
        assert group["rayStartParams"]["num-gpus"] == "1", group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, group["groupName"]


def test_aws_gpu_worker_type():
    config = _load(AWS_CLUSTER)
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in node_types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "cluster.yaml has no node type with resources.GPU >= 1"
    for name, node_type in gpu_types.items():
        assert GPU_INSTANCE.match(node_type["node_config"]["InstanceType"]), name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name


def test_aws_container_overrides_the_hqlabel_entrypoint():
    # The launcher runs `docker run ... IMAGE bash`: with ENTRYPOINT ["hqlabel"] that is `hqlabel bash`.
    run_options = " ".join(_load(AWS_CLUSTER)["docker"]["run_options"])
    assert '--entrypoint ""' in run_options
    assert "--gpus all" in " ".join(_load(AWS_CLUSTER)["docker"]["worker_run_options"])


def test_rayjob_entrypoint_is_a_valid_label_command():
    job = _load(RAYJOB)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] >= 0
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["hqlabel", "label"], argv
    args = build_parser().parse_args(argv[1:])  # argparse exits (SystemExit) on an invalid command
    assert args.command == "label"
    assert args.input.startswith("s3://") and args.out.startswith("s3://")
    assert [c.strip() for c in args.classes.split(",")] == ["person", "car"]
    assert args.address == "auto", "the job must join the RayJob's cluster, not start a local Ray"


@pytest.mark.parametrize("path", [*MANIFESTS, DOCKERFILE], ids=lambda p: p.name)
def test_no_aws_secret_literal(path):
    text = path.read_text()
    assert not AWS_KEY_ID.search(text), f"{path.name} contains an AWS access key id"
    assert not AWS_SECRET_VALUE.search(text), f"{path.name} contains an AWS secret access key"
    if path.suffix == ".yaml":
        for var in _env_vars(_load(path)):
            if var["name"].startswith("AWS_") and ("KEY" in var["name"] or "TOKEN" in var["name"]):
                assert "value" not in var, f"{path.name}: {var['name']} is inline, use valueFrom.secretKeyRef"


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_credentials_come_from_a_secret(path):
    for container in _containers(_cluster_spec(path)):
        env = {e["name"]: e for e in container.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert name in env, f"{path.name}: {container['name']} has no {name}"
            assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{path.name}: {name} not from a secret"


def test_dockerfile_installs_the_project_and_runs_hqlabel():
    text = DOCKERFILE.read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")]
    entrypoints = [rest for keyword, *rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == ['["hqlabel"]'], entrypoints
    assert re.search(r'pip install "\.\[s3,export\]"', text), "the image does not install the project"
    assert re.search(r"^COPY .*hqlabel ", text, re.MULTILINE), "the image does not copy the package"
    users = [rest for keyword, *rest in instructions if keyword == "USER"]
    assert users and users[-1] != ["root"], "the image must run as a non-root user"
    assert "HF_HOME=" in text and re.search(r"^VOLUME .*huggingface", text, re.MULTILINE)
