"""Validate Kubernetes custom resources against a CRD's OpenAPI v3 schema with ``jsonschema``.

A CRD schema is OpenAPI v3 with Kubernetes extensions, not plain JSON Schema; ``to_json_schema`` translates
what matters for validation:

- ``x-kubernetes-int-or-string: true`` (resource quantities, ports): an integer or a string;
- ``nullable: true``: ``null`` is allowed as well;
- strict about unknown fields, as ``kubectl apply`` (server-side field validation ``Strict``) is: an object
  schema with ``properties`` gets ``additionalProperties: false`` unless it sets
  ``x-kubernetes-preserve-unknown-fields: true`` or its own ``additionalProperties`` (a map).

CEL rules (``x-kubernetes-validations``) are left out: only the API server evaluates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def to_json_schema(node: Any) -> Any:
    """A JSON Schema (draft 4) equivalent of one OpenAPI v3 CRD schema node, recursively."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {name: to_json_schema(sub) for name, sub in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = to_json_schema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    for key in (*_SUBSCHEMA_LISTS, "not"):
        if key in node:
            out[key] = [to_json_schema(s) for s in node[key]] if key != "not" else to_json_schema(node[key])
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and not preserve and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def load_crd(path: Path) -> dict:
    """The CustomResourceDefinition document in ``path`` (C YAML loader: the KubeRay CRDs are ~1 MB)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)


class CrdValidator:
    """Validates documents of one CRD's kind and version; ``errors(doc)`` lists every problem."""

    def __init__(self, crd_path: Path, version: str = "v1") -> None:
        crd = load_crd(crd_path)
        spec = crd["spec"]
        versions = {v["name"]: v for v in spec["versions"]}
        if version not in versions:
            raise ValueError(f"{crd_path.name} has no version {version!r} (it has {sorted(versions)})")
        self.kind = spec["names"]["kind"]
        self.api_version = f"{spec['group']}/{version}"
        schema = to_json_schema(versions[version]["schema"]["openAPIV3Schema"])
        jsonschema.Draft4Validator.check_schema(schema)
        self._validator = jsonschema.Draft4Validator(schema)

    def errors(self, doc: dict) -> list[str]:
        """One line per violation, ``<path>: <message>``, sorted by path."""
        found = []
        if doc.get("apiVersion") != self.api_version or doc.get("kind") != self.kind:
            found.append(
                f"<root>: apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')} "
                f"is not {self.api_version}/{self.kind}"
            )
        for error in self._validator.iter_errors(doc):
            path = ".".join(str(p) for p in error.absolute_path) or "<root>"
            found.append(f"{path}: {error.message}")
        return sorted(found)
