"""Talking to the Kubernetes API from a pipeline step (or from a laptop with a kubeconfig).

Inside a pod the service account's token and namespace are used; elsewhere ``$KUBECONFIG`` (or
``~/.kube/config``) and its current context. Each call builds its own client configuration instead of
touching the kubernetes package's process-wide default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass
class Kube:
    """An API client and the namespace its objects go to."""

    api: Any  # kubernetes.client.ApiClient
    namespace: str

    def apps(self):
        from kubernetes import client

        return client.AppsV1Api(self.api)

    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api)


def connect(namespace: str = "") -> Kube:
    """A client for this pod's cluster (in a pod) or the kubeconfig's; ``namespace`` empty: the pod's own
    namespace, or the kubeconfig context's, or ``default``."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
        own = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.is_file() else ""
    else:
        # the client reads $KUBECONFIG once, at import: read it now, so a changed one is honoured
        path = os.environ.get("KUBECONFIG") or None
        config.load_kube_config(config_file=path, client_configuration=configuration)
        _, context = config.list_kube_config_contexts(config_file=path)
        own = (context or {}).get("context", {}).get("namespace", "")
    return Kube(client.ApiClient(configuration), namespace or own or "default")


def is_status(error: BaseException, *codes: int) -> bool:
    """Whether ``error`` is an API error with one of these HTTP status codes."""
    from kubernetes.client.exceptions import ApiException

    return isinstance(error, ApiException) and error.status in codes
