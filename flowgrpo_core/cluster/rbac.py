"""The Role a pipeline's service account needs for the objects its steps create, and its RoleBinding.

Kubeflow's multi-user profiles run steps as ``default-editor``, whose aggregated edit role usually covers
all of this already; standalone Kubeflow Pipelines runs them as ``pipeline-runner``, which needs it:

    python -m flowgrpo_core.cluster.rbac --namespace kubeflow --service-account pipeline-runner | kubectl apply -f -
"""

from __future__ import annotations

import argparse

import yaml

NAME = "flowgrpo-step"

RULES = [
    # reward servers (launch stage) and their cleanup (exit handler)
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["create", "get", "list", "watch", "delete", "deletecollection"],
    },
    {
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": ["create", "get", "list", "delete", "deletecollection"],
    },
    # why a reward server or training node does not start (image pull, missing secret, unschedulable)
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    # multi-node training (training stage) and its cleanup
    {
        "apiGroups": ["kubeflow.org"],
        "resources": ["pytorchjobs"],
        "verbs": ["create", "get", "list", "watch", "delete", "deletecollection"],
    },
]


def render_rbac(namespace: str, service_account: str) -> list[dict]:
    metadata = {"name": NAME, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "flowgrpo"}}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata,
        "rules": RULES,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": dict(metadata),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }
    return [role, binding]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowgrpo_core.cluster.rbac",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--namespace", required=True, help="namespace the pipeline's steps run in")
    parser.add_argument("--service-account", default="pipeline-runner", help="service account of the steps")
    args = parser.parse_args(argv)
    print(yaml.safe_dump_all(render_rbac(args.namespace, args.service_account), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
