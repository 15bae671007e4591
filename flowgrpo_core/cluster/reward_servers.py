"""Reward servers on Kubernetes: a Deployment + Service per reward, created by the launch stage and deleted
by the exit handler.

KFP has no sidecars, and a child process of the launch step would die with its pod, so on a cluster each
reward server is its own Deployment (image of its family, ``/health`` probes, GPU if it runs a network)
behind a ClusterIP Service; the stages reach it at ``http://<service>.<namespace>.svc.cluster.local:8000``.
Every object carries the run's labels (names.py), so stopping is one label-selector delete that also finds
objects of a launch that failed halfway, or of a retried attempt.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flowgrpo_core.cluster import images, names, pods
from flowgrpo_core.cluster.kube import Kube, is_status
from flowgrpo_core.cluster.options import ClusterOptions
from flowgrpo_core.cluster.validation import validate

log = logging.getLogger(__name__)

SERVER_PORT = 8000
JUDGE_PORT = 17140
CLUSTER_DOMAIN = "cluster.local"
# container states that will not heal by waiting: fail the launch at once, naming the reason
FATAL_WAITING = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
}


@dataclass(frozen=True)
class ServerSpec:
    """How one reward is served: image family, and whether it runs a neural network (then it gets
    ``serving.gpus_per_server`` GPUs and the GPU placement)."""

    recipe: str
    gpu: bool
    cpu: str
    memory: str


_LIGHT = ServerSpec(images.REWARD_OCR, False, "1", "1Gi")
_CLIP = ServerSpec(images.REWARD_CLIP, True, "4", "16Gi")
REWARD_SERVERS: dict[str, ServerSpec] = {
    "jpeg_compressibility": _LIGHT,
    "jpeg_incompressibility": _LIGHT,
    "brightness": _LIGHT,
    # PP-OCR on onnxruntime's CPU provider: CPUs, not a GPU
    "ocr": ServerSpec(images.REWARD_OCR, False, "4", "4Gi"),
    # the client of the judge below; it only sends HTTP requests
    "unifiedreward": ServerSpec(images.REWARD_OCR, False, "1", "2Gi"),
    "clipscore": _CLIP,
    "pickscore": _CLIP,
    "aesthetic": _CLIP,
    "hpsv2": _CLIP,
    "imagereward": _CLIP,
    "geneval": ServerSpec(images.REWARD_GENEVAL, True, "4", "16Gi"),
    "shapes_geneval": ServerSpec(images.REWARD_GENEVAL, False, "2", "4Gi"),
}
# the UnifiedReward judge: a 7B VLM on sglang (images/unifiedreward-sglang.sh), ~24 GB of GPU memory
JUDGE = ServerSpec(images.UNIFIEDREWARD_JUDGE, True, "8", "64Gi")
JUDGE_NAME = "unifiedreward-judge"


@dataclass(frozen=True)
class RenderedServer:
    name: str  # the reward, or JUDGE_NAME
    deployment: dict
    service: dict
    url: str  # what clients use (the judge's is its OpenAI-compatible base URL)

    @property
    def is_reward(self) -> bool:
        return self.name != JUDGE_NAME


def image_for(spec: ServerSpec, serving) -> str:
    """``serving.images[family]`` if set, else the family's image in ``serving.image_registry``."""
    return serving.images.get(spec.recipe) or images.image_ref(
        spec.recipe, serving.image_registry, serving.image_tag
    )


def _http_probe(port: str, period_s: int, failures: int, timeout_s: int = 5) -> dict:
    return {
        "httpGet": {"path": "/health", "port": port},
        "periodSeconds": period_s,
        "failureThreshold": failures,
        "timeoutSeconds": timeout_s,
    }


@dataclass(frozen=True)
class _Target:
    """Where and for whom the servers are rendered."""

    run_id: str
    namespace: str
    serving: object  # the config's ServingConfig
    cluster: ClusterOptions


def _server(
    name: str,
    component: str,
    spec: ServerSpec,
    command: list[str],
    port: int,
    target: _Target,
    env: dict[str, str] | None = None,
    shm: bool = False,
) -> tuple[dict, dict, str]:
    run_id, namespace, serving, cluster = target.run_id, target.namespace, target.serving, target.cluster
    object_name = names.object_name(component, run_id)
    labels = {**names.run_labels(run_id, component), names.REWARD_LABEL: names.dns_label(name)}
    metadata = {
        "name": object_name,
        "namespace": namespace,
        "labels": labels,
        "annotations": {names.RUN_ID_ANNOTATION: run_id},
    }
    gpus = serving.gpus_per_server if spec.gpu else 0
    container = {
        "name": "server",
        "image": image_for(spec, serving),
        "command": command,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": pods.env(cluster, env or {}),
        "resources": pods.resources(cluster, spec.cpu, spec.memory, gpus),
        # loading weights can take minutes: the startup probe allows serving.startup_timeout_s for it, so
        # the liveness probe never kills a server that is still loading
        "startupProbe": _http_probe("http", 10, max(1, math.ceil(serving.startup_timeout_s / 10))),
        "readinessProbe": _http_probe("http", 10, 3),
        "livenessProbe": _http_probe("http", 30, 3),
        "securityContext": pods.container_security(),
        "volumeMounts": pods.volume_mounts(cluster),
    }
    volumes = []
    if shm:  # sglang's worker processes share tensors through /dev/shm (64 MiB in a default pod)
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    pod_labels = {**labels, **dict(cluster.pod_labels)}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": pods.pod_spec(cluster, [container], gpu=gpus > 0, volumes=volumes),
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": copy.deepcopy(metadata),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(labels),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    url = f"http://{object_name}.{namespace}.svc.{CLUSTER_DOMAIN}:{port}"
    return deployment, service, url


def render_reward_servers(
    rewards: Sequence[str], run_id: str, namespace: str, serving, cluster: ClusterOptions
) -> list[RenderedServer]:
    """The Deployments and Services of ``rewards`` (``serving`` is the config's ServingConfig). A
    ``unifiedreward`` without its own ``url`` option also gets the sglang judge it talks to."""
    target = _Target(run_id, namespace, serving, cluster)
    out: list[RenderedServer] = []
    for name in rewards:
        if name not in REWARD_SERVERS:
            raise ValueError(f"reward {name!r} has no server spec in flowgrpo_core.cluster.reward_servers")
        extra = list(serving.server_args.get(name, []))
        if name == "unifiedreward" and not any(str(a).startswith("url=") for a in extra):
            judge_command = ["/usr/local/bin/unifiedreward-sglang"]
            judge_env = {"UNIFIEDREWARD_PORT": str(JUDGE_PORT)}
            deployment, service, url = _server(
                JUDGE_NAME, "judge", JUDGE, judge_command, JUDGE_PORT, target, judge_env, shm=True
            )
            out.append(RenderedServer(JUDGE_NAME, deployment, service, f"{url}/v1"))
            extra += ["--option", f"url={url}/v1"]
        command = [
            "python",
            "-m",
            "flowgrpo_core.serving",
            "serve-reward",
            name,
            "--host",
            "0.0.0.0",
            "--port",
            str(SERVER_PORT),
            *extra,
        ]
        spec = REWARD_SERVERS[name]
        deployment, service, url = _server(name, f"reward-{name}", spec, command, SERVER_PORT, target)
        out.append(RenderedServer(name, deployment, service, url))
    return out


class KubernetesRewardServers:
    """Create the rendered servers, wait until every Deployment is ready, or delete them and explain."""

    def __init__(
        self,
        kube: Kube,
        servers: Sequence[RenderedServer],
        run_id: str,
        startup_timeout_s: float,
        poll_s: float = 2.0,
    ) -> None:
        self.kube = kube
        self.servers = list(servers)
        self.run_id = run_id
        self.startup_timeout_s = startup_timeout_s
        self.poll_s = poll_s

    def start(self) -> dict[str, str]:
        """``{reward: in-cluster URL}`` once all are ready; on any failure deletes what it created."""
        for server in self.servers:  # all of them before creating any: no half-created set
            validate(server.deployment)
            validate(server.service)
        try:
            for server in self.servers:
                self._create(self.kube.apps().create_namespaced_deployment, server.deployment)
                self._create(self.kube.core().create_namespaced_service, server.service)
            self._wait_ready()
        except BaseException:
            delete_run_objects(self.kube, self.run_id)
            raise
        return {s.name: s.url for s in self.servers if s.is_reward}

    def _create(self, create, manifest: dict) -> None:
        try:
            # Strict: a field the API server does not know is an error there too, never silently dropped
            create(self.kube.namespace, manifest, field_validation="Strict")
        except Exception as error:
            if not is_status(error, 409):
                raise
            # a retried launch of the same run: the object is already there, with the same spec
            log.info("%s %s already exists", manifest["kind"], manifest["metadata"]["name"])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = {s.deployment["metadata"]["name"]: s for s in self.servers}
        while pending:
            for name in list(pending):
                deployment = self.kube.apps().read_namespaced_deployment(name, self.kube.namespace)
                wanted = deployment.spec.replicas or 1
                if (deployment.status.ready_replicas or 0) >= wanted:
                    log.info("reward server %s is ready", pending.pop(name).name)
            if not pending:
                return
            problems = pod_problems(self.kube, names.run_selector(self.run_id), fatal_only=True)
            if problems:
                raise RuntimeError("reward server pods cannot start:\n  " + "\n  ".join(problems))
            if time.monotonic() > deadline:
                detail = pod_problems(self.kube, names.run_selector(self.run_id), fatal_only=False)
                raise TimeoutError(
                    f"reward server(s) {sorted(s.name for s in pending.values())} not ready after "
                    f"{self.startup_timeout_s:g} s (serving.startup_timeout_s)"
                    + "".join(f"\n  {p}" for p in detail)
                )
            time.sleep(self.poll_s)


def pod_problems(kube: Kube, selector: str, fatal_only: bool) -> list[str]:
    """Why the selected pods are not running: unschedulable, image pull errors, missing secrets, crashes."""
    problems = []
    for pod in kube.core().list_namespaced_pod(kube.namespace, label_selector=selector).items:
        name = pod.metadata.name
        for status in (pod.status.container_statuses or []) if pod.status else []:
            waiting = status.state.waiting if status.state else None
            if waiting and (not fatal_only or waiting.reason in FATAL_WAITING):
                problems.append(f"pod {name}: {waiting.reason}: {waiting.message or ''}".rstrip(": "))
        if not fatal_only and pod.status:
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False":
                    problems.append(f"pod {name}: not scheduled: {condition.message or condition.reason}")
    return problems


def delete_run_objects(kube: Kube, run_id: str) -> list[str]:
    """Delete every Deployment, Service and PyTorchJob of ``run_id``; returns ``kind/name`` of each."""
    from flowgrpo_core.cluster.trainjob import GROUP, PLURAL, VERSION

    selector = names.run_selector(run_id)
    ns = kube.namespace
    apps, core, custom = kube.apps(), kube.core(), kube.custom()
    deleted = [
        f"deployment/{d.metadata.name}"
        for d in apps.list_namespaced_deployment(ns, label_selector=selector).items
    ]
    deleted += [
        f"service/{s.metadata.name}" for s in core.list_namespaced_service(ns, label_selector=selector).items
    ]
    apps.delete_collection_namespaced_deployment(ns, label_selector=selector)
    core.delete_collection_namespaced_service(ns, label_selector=selector)
    try:
        jobs = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, label_selector=selector)
        deleted += [f"pytorchjob/{j['metadata']['name']}" for j in jobs.get("items", [])]
        if jobs.get("items"):
            custom.delete_collection_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, label_selector=selector
            )
    except Exception as error:
        if not is_status(error, 404):  # no training operator installed: there are no PyTorchJobs to delete
            raise
    return deleted


def serving_backend(mode: str, cluster: ClusterOptions | None) -> str:
    """Where reward servers run: ``process`` means a Deployment in a pipeline compiled for a cluster, since
    a child process would be killed with the launch step's pod."""
    return "kubernetes" if mode == "process" and cluster is not None else mode


def launch(
    run_id: str,
    rewards: Sequence[str],
    serving,
    cluster: ClusterOptions | None,
    kube: Kube | None = None,
    poll_s: float = 2.0,
) -> dict[str, str]:
    """Create and await the servers of ``rewards``; ``{reward: URL}``."""
    from flowgrpo_core.cluster.kube import connect

    kube = kube or connect(serving.namespace)
    servers = render_reward_servers(rewards, run_id, kube.namespace, serving, cluster or ClusterOptions())
    return KubernetesRewardServers(kube, servers, run_id, serving.startup_timeout_s, poll_s).start()


def stop(run_id: str, serving_namespace: str) -> list[str]:
    """Delete the run's objects in the reward servers' namespace and in the step's own (PyTorchJobs)."""
    from flowgrpo_core.cluster.kube import connect

    own = connect()
    deleted = delete_run_objects(own, run_id)
    if serving_namespace and serving_namespace != own.namespace:
        deleted += delete_run_objects(connect(serving_namespace), run_id)
    return deleted
