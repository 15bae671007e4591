"""Multi-node training as a PyTorchJob (kubeflow.org/v1), launched and awaited by the training stage.

With ``--nodes M`` the ``train_grpo`` step does not train: it shares the base model on the PVC and has this
module render and run a PyTorchJob of M pods (one Master, M-1 Workers, each with ``--gpus`` GPUs) that run

    torchrun --nnodes M --nproc_per_node N ... -m flowgrpo_core.cli train --preset P --set ... --out DIR --resume

(``flowgrpo_core.train_command``) and waits for it. The policy, checkpoints and metric history come back
through the shared volume (``flowgrpo_core.stages.train`` collects them). A retried step finds its job: a
running one is awaited, a failed one is replaced by a new one that resumes from the last checkpoint
(``--resume``), a succeeded one is reused. Only Kubernetes here: the job's manifest and its life cycle.
"""

from __future__ import annotations

import logging
import time

from flowgrpo_core.cluster import names, pods
from flowgrpo_core.cluster.kube import Kube, is_status
from flowgrpo_core.cluster.options import ClusterOptions
from flowgrpo_core.cluster.validation import validate

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
# how often the training step reads the job's status (training runs for hours)
POLL_S = 30.0
# the operator finds the rendezvous port on the container port of this name (and defaults it to 23456)
PORT_NAME, MASTER_PORT = "pytorchjob-port", 23456


def render_pytorchjob(
    run_id: str, namespace: str, cluster: ClusterOptions, image: str, command: list[str]
) -> dict:
    """A PyTorchJob of ``cluster.nodes`` pods with ``cluster.gpus`` GPUs each, the shared volume mounted."""
    labels = names.run_labels(run_id, "train")
    procs = max(cluster.gpus, 1)
    container = {
        "name": "pytorch",
        "image": image,
        "command": command,
        "ports": [{"name": PORT_NAME, "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "env": pods.env(cluster, {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}),
        "resources": pods.resources(cluster, cluster.worker_cpu, cluster.worker_memory, cluster.gpus),
        # NCCL and DataLoader workers share tensors through /dev/shm, which is 64 MiB in a default pod
        "volumeMounts": [*pods.volume_mounts(cluster), {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": pods.container_security(),
    }
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory"}}

    def replica(count: int) -> dict:
        # Never + backoffLimit 0: a failed node fails the job at once, and the pipeline's retry of the
        # training step (TRAIN_RETRY) starts a new job that resumes from the last checkpoint; restarting
        # single pods would leave the others blocked in a collective until NCCL's timeout
        return {
            "replicas": count,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"labels": {**labels, **dict(cluster.pod_labels)}},
                "spec": pods.pod_spec(cluster, [container], gpu=cluster.gpus > 0, volumes=[shm]),
            },
        }

    specs = {"Master": replica(1)}
    if cluster.nodes > 1:
        specs["Worker"] = replica(cluster.nodes - 1)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {
            "name": names.object_name("train", run_id),
            "namespace": namespace,
            "labels": labels,
            "annotations": {names.RUN_ID_ANNOTATION: run_id},
        },
        "spec": {
            "nprocPerNode": str(procs),
            # finished pods stay (their logs explain a failure) until the exit handler deletes the job
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
            "pytorchReplicaSpecs": specs,
        },
    }


def job_state(job: dict) -> tuple[str | None, str]:
    """(``Succeeded`` | ``Failed`` | None while running, the reason and message of that condition)."""
    for condition in reversed(job.get("status", {}).get("conditions") or []):
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition["type"], f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(
                ": "
            )
    return None, ""


def run_job(kube: Kube, job: dict, poll_s: float = POLL_S, timeout_s: float | None = None) -> dict:
    """Create ``job`` (or find the one a previous attempt created) and wait until it succeeds; raises
    RuntimeError naming the failure and where its logs are."""
    validate(job)
    custom = kube.custom()
    ns, name = kube.namespace, job["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job, field_validation="Strict")
        log.info("created PyTorchJob %s/%s", ns, name)
    except Exception as error:
        if not is_status(error, 409):
            raise
        state, _ = job_state(custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))
        if state == "Failed":  # a retried step: replace the failed job, which resumes from the checkpoint
            log.info("PyTorchJob %s failed in an earlier attempt: replacing it", name)
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground"
            )
            _wait_gone(custom, ns, name, poll_s)
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job, field_validation="Strict")
        else:
            log.info("PyTorchJob %s exists (%s): waiting for it", name, state or "running")
    started = time.monotonic()
    logs = f"kubectl logs -n {ns} {name}-master-0"
    while True:
        current = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        state, why = job_state(current)
        if state == "Succeeded":
            return current
        if state == "Failed":
            raise RuntimeError(f"PyTorchJob {ns}/{name} failed ({why}); logs: {logs}")
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"PyTorchJob {ns}/{name} still running after {timeout_s:g} s; logs: {logs}")
        time.sleep(poll_s)


def _wait_gone(custom, ns: str, name: str, poll_s: float, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except Exception as error:
            if is_status(error, 404):
                return
            raise
        time.sleep(poll_s)
    raise TimeoutError(f"PyTorchJob {ns}/{name} was not deleted within {timeout_s:g} s")
