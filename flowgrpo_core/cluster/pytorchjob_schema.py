"""JSON schema of the PyTorchJob (kubeflow.org/v1) fields this project renders.

Trimmed by hand from the training operator's CRD (``kubeflow.org_pytorchjobs.yaml``, openAPIV3Schema of
v1), with two deliberate differences: every object level says ``additionalProperties: false`` (the CRD
relies on the API server's structural pruning, which drops an unknown field with at most a warning, so a
typo would silently vanish), and ``pytorchReplicaSpecs`` only admits the two replica types the operator
knows. The pod ``template`` is left open here: it is checked field by field against the Kubernetes
PodTemplateSpec model (validation.py), which is stricter than any JSON schema we could hand-copy.
Kept in Python rather than a .json file so it ships with the package without package-data.
"""

_REPLICA_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["replicas", "template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 1},
        "restartPolicy": {"type": "string", "enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": {"type": "object"},
    },
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "PyTorchJob (kubeflow.org/v1), the subset flowgrpo renders",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["pytorchReplicaSpecs"],
            "properties": {
                "nprocPerNode": {"type": "string"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"type": "string", "enum": ["All", "Running", "None"]},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    },
                },
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["Master"],
                    "properties": {"Master": _REPLICA_SPEC, "Worker": _REPLICA_SPEC},
                },
            },
        },
    },
}
