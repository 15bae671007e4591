"""Rendered manifests checked before they are sent: unknown fields, wrong types, missing required fields.

Built-in kinds are checked against the kubernetes client's OpenAPI models (``openapi_types`` and
``attribute_map`` of ``V1Deployment`` etc., generated from the API server's own OpenAPI spec): every key
must be a field of its model, every value of the field's type, recursively; then the manifest is
deserialised into the model, which raises on a missing required field. The client alone would not do:
deserialisation silently drops unknown keys (a typo'd ``readinesProbe`` would vanish) and coerces types.
The PyTorchJob, a custom resource with no model in the client, is checked with ``pytorchjob_schema`` and
its pod templates with the PodTemplateSpec model.
"""

from __future__ import annotations

import json
import re
from typing import Any

_LIST = re.compile(r"list\[(.+)\]")
_DICT = re.compile(r"dict\(str, (.+)\)")


class ManifestError(ValueError):
    """A manifest that the API server would reject or silently alter; ``problems`` lists each one."""

    def __init__(self, kind: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid {kind} manifest:\n  " + "\n  ".join(problems))


def model_problems(data: Any, type_name: str, path: str = "") -> list[str]:
    """Unknown fields and type mismatches of ``data`` against the client model ``type_name``."""
    from kubernetes.client import models

    where = path or "<root>"
    if type_name in ("str", "datetime", "date"):
        return [] if isinstance(data, str) else [f"{where}: expected a string, got {data!r}"]
    if type_name == "int":
        ok = isinstance(data, int) and not isinstance(data, bool)
        return [] if ok else [f"{where}: expected an integer, got {data!r}"]
    if type_name == "float":
        ok = isinstance(data, (int, float)) and not isinstance(data, bool)
        return [] if ok else [f"{where}: expected a number, got {data!r}"]
    if type_name == "bool":
        return [] if isinstance(data, bool) else [f"{where}: expected true/false, got {data!r}"]
    if type_name == "object":  # IntOrString, free-form: the API server checks these
        return []
    if match := _LIST.fullmatch(type_name):
        if not isinstance(data, list):
            return [f"{where}: expected a list, got {type(data).__name__}"]
        return [
            p for i, item in enumerate(data) for p in model_problems(item, match.group(1), f"{path}[{i}]")
        ]
    if match := _DICT.fullmatch(type_name):
        if not isinstance(data, dict):
            return [f"{where}: expected a mapping, got {type(data).__name__}"]
        return [p for k, v in data.items() for p in model_problems(v, match.group(1), f"{path}.{k}")]
    model = getattr(models, type_name, None)
    if model is None:
        return [f"{where}: no model {type_name} in the kubernetes client"]
    if not isinstance(data, dict):
        return [f"{where}: expected a {type_name} mapping, got {type(data).__name__}"]
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    problems = []
    for key, value in data.items():
        attr = by_json.get(key)
        if attr is None:
            close = [k for k in by_json if _similar(k, key)]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}.{key}: unknown field of {type_name}{hint}".lstrip("."))
        elif value is not None:
            problems += model_problems(value, model.openapi_types[attr], f"{path}.{key}".lstrip("."))
    return problems


def _similar(a: str, b: str) -> bool:
    from difflib import SequenceMatcher

    return SequenceMatcher(None, a.lower(), b.lower()).ratio() > 0.8


def _required_problems(data: dict, type_name: str) -> list[str]:
    """Deserialising into the model raises on the first missing required field (client-side validation)."""
    from kubernetes.client import ApiClient

    class _Response:  # what ApiClient.deserialize reads: the body as text
        def __init__(self, body: dict) -> None:
            self.data = json.dumps(body)

    try:
        ApiClient().deserialize(_Response(data), type_name)
    except (ValueError, TypeError) as error:
        return [f"{type_name}: {error}"]
    return []


def model_name(api_version: str, kind: str) -> str:
    """``apps/v1`` + ``Deployment`` -> ``V1Deployment`` (the client's naming of built-in kinds)."""
    version = api_version.rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + kind


def validate(manifest: dict) -> dict:
    """Raise ManifestError unless ``manifest`` is a valid object of its kind; returns it unchanged."""
    kind = manifest.get("kind", "?")
    if manifest.get("apiVersion") == "kubeflow.org/v1" and kind == "PyTorchJob":
        return validate_pytorchjob(manifest)
    type_name = model_name(str(manifest.get("apiVersion", "")), str(kind))
    problems = model_problems(manifest, type_name)
    if not problems:
        problems = _required_problems(manifest, type_name) + _semantic_problems(manifest)
    if problems:
        raise ManifestError(kind, problems)
    return manifest


def _semantic_problems(manifest: dict) -> list[str]:
    """Rules the API server enforces beyond the schema, for the kinds we render."""
    problems = []
    if manifest.get("kind") == "Deployment":
        spec = manifest["spec"]
        selector = spec.get("selector", {}).get("matchLabels", {})
        labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(
                "spec.selector.matchLabels must be non-empty and match spec.template.metadata.labels"
            )
    for pod_path, pod in _pod_specs(manifest):
        names = [c.get("name") for c in pod.get("containers", [])]
        if len(set(names)) != len(names):
            problems.append(f"{pod_path}.containers: duplicate container names {names}")
    return problems


def _pod_specs(manifest: dict) -> list[tuple[str, dict]]:
    spec = manifest.get("spec", {})
    if "template" in spec:
        return [("spec.template.spec", spec["template"].get("spec", {}))]
    replicas = spec.get("pytorchReplicaSpecs", {})
    return [
        (f"spec.pytorchReplicaSpecs.{r}.template.spec", s["template"].get("spec", {}))
        for r, s in replicas.items()
    ]


def validate_pytorchjob(manifest: dict) -> dict:
    import jsonschema

    from flowgrpo_core.cluster.pytorchjob_schema import SCHEMA

    validator = jsonschema.Draft202012Validator(SCHEMA)
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    ]
    if not problems:
        for replica, spec in manifest["spec"]["pytorchReplicaSpecs"].items():
            path = f"spec.pytorchReplicaSpecs.{replica}.template"
            found = model_problems(spec["template"], "V1PodTemplateSpec", path)
            problems += found or _required_problems(spec["template"], "V1PodTemplateSpec")
            containers = spec["template"].get("spec", {}).get("containers", [])
            # the operator injects MASTER_ADDR etc. into, and finds its port on, the container named pytorch
            if not any(c.get("name") == "pytorch" for c in containers):
                problems.append(f"{path}.spec.containers: the training container must be named 'pytorch'")
        if manifest["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] != 1:
            problems.append("spec.pytorchReplicaSpecs.Master.replicas: must be 1")
        problems += _semantic_problems(manifest)
    if problems:
        raise ManifestError("PyTorchJob", problems)
    return manifest
