"""infra/ manifests against the upstream schemas, and deliberately broken copies that each validator rejects.

- infra/kuberay/*.yaml: KubeRay v1.7.0's CRDs (vendored in tests/infra/schemas/, see its README), strict.
- infra/aws/cluster.yaml: Ray's installed ``ray/autoscaler/ray-schema.json`` and the launcher's own
  ``prepare_config`` + ``validate_config`` (what ``ray up`` runs before it touches AWS).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from crd_validation import CrdValidator
from ray.autoscaler._private.util import prepare_config, validate_config

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"
INFRA = HERE.parents[1] / "infra"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _load(path: Path) -> dict:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def validators() -> dict[str, CrdValidator]:
    return {
        "RayCluster": CrdValidator(SCHEMAS / "ray.io_rayclusters.yaml"),
        "RayJob": CrdValidator(SCHEMAS / "ray.io_rayjobs.yaml"),
    }


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def test_vendored_schemas_are_the_noted_upstream_files():
    readme = (SCHEMAS / "README.md").read_text()
    assert "v1.7.0" in readme and "Apache" in readme and (SCHEMAS / "LICENSE-kuberay").is_file()
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        digest = hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(name)}`.*`{digest}`", readme), f"{name} differs from its noted sha256"


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_crd(validators, path):
    doc = _load(path)
    assert doc["kind"] in validators, f"{path.name}: kind {doc['kind']}"
    errors = validators[doc["kind"]].errors(doc)
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value


def _rename(doc: dict, dotted: str, new_key: str) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[new_key] = node.pop(last)


HEAD = "headGroupSpec.template.spec"
WORKER = "workerGroupSpecs.0.template.spec"


@pytest.mark.parametrize(
    ("path", "breakage", "expected"),
    [
        # A typo'd field is an unknown field: kubectl's strict validation rejects it, pruning would drop it.
        (
            RAYCLUSTER,
            lambda s: _rename(s, "workerGroupSpecs", "workerGroupSpec"),
            r"^spec: .*workerGroupSpec'",
        ),
        (RAYCLUSTER, lambda s: _rename(s, f"{WORKER}.nodeSelector", "nodeSelecter"), r"nodeSelecter"),
        (RAYJOB, lambda s: _set(s, f"{HEAD}.containers.0.imagePullPolicyy", "Always"), r"imagePullPolicyy"),
        (RAYJOB, lambda s: _rename(s, "workerGroupSpecs.0.rayStartParams", "rayStart"), r"rayStart"),
        # Wrong types, an int-or-string that is neither, a missing required field, a bad enum value.
        (RAYCLUSTER, lambda s: _set(s, "workerGroupSpecs.0.replicas", "two"), r"replicas: 'two' is not"),
        (
            RAYJOB,
            lambda s: _set(s, f"{WORKER}.containers.0.resources.limits.cpu", [8]),
            r"limits\.cpu: \[8\]",
        ),
        (RAYCLUSTER, lambda s: s["workerGroupSpecs"][0].pop("groupName"), r"'groupName' is a required"),
        (RAYCLUSTER, lambda s: _set(s, f"{WORKER}.tolerations.0.effect", 3), r"effect: 3 is not"),
    ],
    ids=[
        "spec-typo",
        "pod-spec-typo",
        "container-typo",
        "group-typo",
        "replicas-type",
        "quantity-type",
        "required",
        "toleration-type",
    ],
)
def test_broken_kuberay_manifest_fails(validators, path, breakage, expected):
    doc = copy.deepcopy(_load(path))
    breakage(_cluster_spec(doc))
    errors = validators[doc["kind"]].errors(doc)
    assert any(re.search(expected, e) for e in errors), f"expected {expected!r} among {errors}"


def test_int_or_string_quantities_accept_both(validators):
    doc = copy.deepcopy(_load(RAYCLUSTER))
    limits = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for value in (1, "1", "500m", "32Gi"):
        limits["cpu"] = value
        assert not validators["RayCluster"].errors(doc), value


def test_wrong_kind_fails(validators):
    doc = _load(RAYJOB)
    assert any("is not ray.io/v1/RayCluster" in e for e in validators["RayCluster"].errors(doc))


def test_aws_cluster_matches_rays_schema_and_validate_config():
    raw = _load(AWS_CLUSTER)
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(raw, schema)  # as written
    validate_config(prepare_config(copy.deepcopy(raw)))  # with the launcher's defaults, as `ray up` does


@pytest.mark.parametrize(
    ("breakage", "error", "expected"),
    [
        (lambda c: _rename(c, "max_workers", "max_worker"), jsonschema.ValidationError, r"max_worker'"),
        (lambda c: _set(c, "upscaling_speed", "fast"), jsonschema.ValidationError, r"'fast' is not"),
        (
            lambda c: _set(c, "available_node_types.gpu_worker.resources.GPU", "one"),
            jsonschema.ValidationError,
            r"'one' is not",
        ),
        (lambda c: _set(c, "docker.pull_before_run", "yes"), jsonschema.ValidationError, r"'yes' is not"),
        (lambda c: _set(c, "head_node_type", "gpu-head"), ValueError, r"head_node_type"),
    ],
    ids=["typo", "type", "resources", "docker", "head-type"],
)
def test_broken_aws_cluster_fails(breakage, error, expected):
    config = copy.deepcopy(_load(AWS_CLUSTER))
    breakage(config)
    with pytest.raises(error, match=expected):
        validate_config(prepare_config(config))
