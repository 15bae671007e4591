"""The parts every pod a step creates shares: secrets as environment, the shared volume, GPU placement,
a non-root security context. Reward Deployments and PyTorchJob nodes are built from these, so they land
on the same nodes with the same credentials as the pipeline's own steps (which kfp-kubernetes configures
from the same ClusterOptions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flowgrpo_core.cluster.options import ClusterOptions

# The images run as this user (images/*.Dockerfile); fsGroup makes the shared volume writable for it.
RUN_AS = 65532
VOLUME_NAME = "flowgrpo-work"


def env(cluster: ClusterOptions, values: Mapping[str, str] | None = None) -> list[dict]:
    out = [{"name": k, "value": v} for k, v in {**cluster.cache_env(), **(values or {})}.items()]
    out += [
        {
            "name": b.env,
            "valueFrom": {"secretKeyRef": {"name": b.secret, "key": b.key, "optional": b.optional}},
        }
        for b in cluster.secret_bindings()
    ]
    return out


def resources(cluster: ClusterOptions, cpu: str, memory: str, gpus: int) -> dict:
    # memory limit = request: a reward server or trainer that outgrows it should be killed and reported,
    # not squeeze its neighbours; no CPU limit, which would only throttle
    requests, limits = {"cpu": cpu, "memory": memory}, {"memory": memory}
    if gpus:
        requests[cluster.accelerator] = limits[cluster.accelerator] = str(gpus)
    return {"requests": requests, "limits": limits}


def volume_mounts(cluster: ClusterOptions) -> list[dict]:
    return [{"name": VOLUME_NAME, "mountPath": cluster.mount_path}] if cluster.pvc else []


def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def pod_spec(
    cluster: ClusterOptions,
    containers: list[dict],
    gpu: bool,
    volumes: Sequence[dict] = (),
    restart_policy: str | None = None,
) -> dict:
    """A pod spec; GPU pods get the node selector and tolerations of the GPU stages."""
    spec: dict = {
        "containers": containers,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    all_volumes = list(volumes)
    if cluster.pvc:
        all_volumes.append({"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": cluster.pvc}})
    if all_volumes:
        spec["volumes"] = all_volumes
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if gpu and cluster.node_selector:
        spec["nodeSelector"] = dict(cluster.node_selector)
    if gpu and cluster.tolerations:
        spec["tolerations"] = [t.to_k8s() for t in cluster.tolerations]
    if cluster.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in cluster.image_pull_secrets]
    return spec
