"""The cluster half of the pipeline: compiled Kubernetes settings, rendered manifests, and the stages that
create reward Deployments and PyTorchJobs, run against a small Kubernetes API server on 127.0.0.1.

No cluster exists here. `FakeKubeAPI` is a real HTTP peer that speaks the few endpoints the stages call
(create/read/list/delete-collection of Deployments, Services, Pods and PyTorchJobs, with label selectors,
409 on a duplicate, 404 on a missing object) through the real `kubernetes` client and a real kubeconfig.
What it cannot do is schedule pods: reward Deployments become ready when the test says so, and a
PyTorchJob's pods are run by `LocalOperator` as local processes with the environment the training
operator would give them, so the rendered torchrun command itself is what trains.
"""

import copy
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from flowgrpo_core import train_command
from flowgrpo_core.cli import build_parser, main
from flowgrpo_core.cluster import names, trainjob
from flowgrpo_core.cluster.kube import Kube, connect
from flowgrpo_core.cluster.options import CLUSTER_ENV, ClusterOptions, ClusterOptionsError, Toleration
from flowgrpo_core.cluster.reward_servers import (
    JUDGE_NAME,
    REWARD_SERVERS,
    KubernetesRewardServers,
    render_reward_servers,
)
from flowgrpo_core.cluster.validation import ManifestError, validate
from flowgrpo_core.config import load_config

NAMESPACE = "flowgrpo-test"
RUN_ID = "0f5b7a1c-3d2e-4c8a-9b7e-2f1d6c5a4b3e"


# ---------------------------------------------------------------- a Kubernetes API server on 127.0.0.1

_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?$"
)
_LIST_KIND = {
    "deployments": ("apps/v1", "DeploymentList"),
    "services": ("v1", "ServiceList"),
    "pods": ("v1", "PodList"),
    "pytorchjobs": ("kubeflow.org/v1", "PyTorchJobList"),
}


def _selected(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels", {})
    return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",") if term))


class FakeKubeAPI:
    """Objects by (plural, namespace, name); every request is recorded as (method, path, query, body)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.requests: list[tuple[str, str, dict, dict | None]] = []
        self.ready = True  # Deployments report their replicas ready when read
        self.pods: list[dict] = []  # what a pod listing returns
        self.crd_installed = True  # False: the PyTorchJob CRD is absent (404)
        self.on_pytorchjob = None  # called with each created PyTorchJob
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with fake.lock:
                    fake.requests.append((self.command, url.path, query, body))
                    code, answer = fake.answer(self.command, url.path, query, body)
                self._send(code, answer)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def answer(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        match = _PATH.match(path)
        if match is None:
            return 404, _status(404, f"no route {path}")
        ns, plural, name = match["ns"], match["plural"], match["name"]
        if plural == "pytorchjobs" and not self.crd_installed:
            return 404, _status(404, "the server could not find the requested resource")
        key = (plural, ns, name)
        if method == "POST":
            key = (plural, ns, body["metadata"]["name"])
            if key in self.objects:
                return 409, _status(409, f'{plural} "{key[2]}" already exists', "AlreadyExists")
            self.objects[key] = copy.deepcopy(body)
            if plural == "pytorchjobs" and self.on_pytorchjob is not None:
                self.on_pytorchjob(self.objects[key])
            return 201, body
        if method == "GET" and name:
            if key not in self.objects:
                return 404, _status(404, f'{plural} "{name}" not found', "NotFound")
            obj = self.objects[key]
            if plural == "deployments":
                replicas = obj["spec"]["replicas"]
                obj["status"] = {"replicas": replicas, "readyReplicas": replicas if self.ready else 0}
            return 200, obj
        if method == "DELETE" and name:
            if self.objects.pop(key, None) is None:
                return 404, _status(404, f'{plural} "{name}" not found', "NotFound")
            return 200, _status(200, "deleted")
        items = (
            self.pods
            if plural == "pods"
            else [o for (p, n, _), o in self.objects.items() if p == plural and n == ns]
        )
        items = [o for o in items if _selected(o, query.get("labelSelector", ""))]
        if method == "DELETE":
            for obj in items:
                self.objects.pop((plural, ns, obj["metadata"]["name"]), None)
            return 200, _status(200, "deleted")
        api_version, kind = _LIST_KIND[plural]
        return 200, {"apiVersion": api_version, "kind": kind, "metadata": {}, "items": items}

    def sent(self, method: str, plural: str) -> list[tuple[str, dict, dict | None]]:
        return [
            (p, q, b) for m, p, q, b in self.requests if m == method and _PATH.match(p)["plural"] == plural
        ]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(code: int, message: str, reason: str = "") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Success" if code < 300 else "Failure",
        "code": code,
        "message": message,
        "reason": reason,
    }


@pytest.fixture
def kube_api(tmp_path, monkeypatch):
    """The fake API server, reached through a real kubeconfig, as `connect()` would from a laptop."""
    fake = FakeKubeAPI()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": fake.url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [
            {"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    fake.stop()


FULL = ClusterOptions(
    gpus=2,
    pvc="flowgrpo-work",
    s3_secret="s3-creds",
    mlflow_secret="mlflow-creds",
    hf_secret="hf-token",
    reward_token_secret="reward-token",
    node_selector=(("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"),),
    tolerations=(Toleration("nvidia.com/gpu"),),
    trainer_image="registry.example/flowgrpo-trainer:dev",
    image_pull_secrets=("regcred",),
)


# ---------------------------------------------------------------- compiled pipeline

CLUSTER_FLAGS = [
    "--gpus",
    "8",
    "--nodes",
    "2",
    "--pvc",
    "flowgrpo-work",
    "--s3-secret",
    "s3-creds",
    "--mlflow-secret",
    "mlflow-creds",
    "--hf-secret",
    "hf-token",
    "--reward-token-secret",
    "reward-token",
    "--node-selector",
    "cloud.google.com/gke-accelerator=nvidia-h100-80gb",
    "--toleration",
    "nvidia.com/gpu:NoSchedule",
    "--toleration",
    "dedicated=gpu:NoExecute",
    "--image",
    "registry.example/flowgrpo-trainer:dev",
    "--image-pull-secret",
    "regcred",
]
GPU_STAGES = ("calibrate-rewards", "evaluate")
ALL_STAGES = (
    "download-model",
    "launch-reward-servers",
    "calibrate-rewards",
    "train-grpo",
    "evaluate",
    "register-model",
    "stop-reward-servers",
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "flowgrpo.yaml"
    assert main(["compile", "--preset", "sd3-ocr", "-o", str(out), *CLUSTER_FLAGS]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _env(spec: dict, stage: str) -> dict[str, str]:
    container = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_compiled_yaml_requests_gpus_and_places_gpu_stages(compiled):
    spec, k8s = compiled
    executors = spec["deploymentSpec"]["executors"]
    for stage in GPU_STAGES:
        accelerator = executors[f"exec-{stage}"]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "8"
        assert k8s[f"exec-{stage}"]["nodeSelector"]["labels"] == {
            "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"
        }
        assert k8s[f"exec-{stage}"]["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute"},
        ]
    # with --nodes 2 the training step only launches the PyTorchJob: no GPU, no GPU node
    assert "accelerator" not in executors["exec-train-grpo"]["container"]["resources"]
    assert "nodeSelector" not in k8s["exec-train-grpo"] and "tolerations" not in k8s["exec-train-grpo"]
    for stage in ("download-model", "register-model", "stop-reward-servers"):
        assert "accelerator" not in executors[f"exec-{stage}"]["container"].get("resources", {})
        assert "nodeSelector" not in k8s[f"exec-{stage}"]


def test_compiled_yaml_mounts_the_pvc_and_passes_secrets_as_env(compiled):
    spec, k8s = compiled
    for stage in ALL_STAGES:
        executor = k8s[f"exec-{stage}"]
        assert executor["pvcMount"] == [
            {
                "constant": "flowgrpo-work",
                "mountPath": "/mnt/flowgrpo",
                "pvcNameParameter": {"runtimeValue": {"constant": "flowgrpo-work"}},
            }
        ]
        secrets = {
            (s["secretName"], k["secretKey"], k["envVar"], s["optional"])
            for s in executor["secretAsEnv"]
            for k in s["keyToEnv"]
        }
        assert {
            ("s3-creds", "AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID", False),
            ("s3-creds", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", False),
            ("s3-creds", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", True),
            ("mlflow-creds", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD", True),
            ("hf-token", "HF_TOKEN", "HF_TOKEN", False),
            ("reward-token", "FLOWGRPO_REWARD_TOKEN", "FLOWGRPO_REWARD_TOKEN", False),
            ("reward-token", "FLOWGRPO_REWARD_TOKEN", "UNIFIEDREWARD_API_KEY", False),
        } <= secrets
        assert executor["imagePullSecret"][0]["secretName"] == "regcred"
        assert (
            spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]["image"]
            == "registry.example/flowgrpo-trainer:dev"
        )
        env = _env(spec, stage)
        assert env["HF_HOME"] == "/mnt/flowgrpo/cache/huggingface"
        # the steps get the same options to build the objects they create themselves
        options = ClusterOptions.from_json(env[CLUSTER_ENV])
        assert options.nodes == 2 and options.gpus == 8 and options.pvc == "flowgrpo-work"
        assert options.trainer_image == "registry.example/flowgrpo-trainer:dev"
    # the work folder (checkpoints, the shared policy) moved onto the volume
    assert spec["root"]["inputDefinitions"]["parameters"]["workdir"]["defaultValue"] == "/mnt/flowgrpo/work"


def test_the_local_pipeline_carries_no_cluster_settings(tmp_path):
    from kfp import compiler

    from pipelines.flowgrpo_pipeline import flowgrpo_pipeline

    compiler.Compiler().compile(flowgrpo_pipeline, str(tmp_path / "local.yaml"))
    docs = list(yaml.safe_load_all((tmp_path / "local.yaml").read_text()))
    assert len(docs) == 1  # no platforms.kubernetes document
    assert all(CLUSTER_ENV not in _env(docs[0], stage) for stage in ALL_STAGES)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "2"], "give its PersistentVolumeClaim with --pvc"),
        (["--toleration", "nvidia.com/gpu:NoShedule"], "toleration effect 'NoShedule'"),
        (["--node-selector", "gpu"], "--node-selector 'gpu': expected KEY=VALUE"),
        (["--pvc", "Work_Volume"], "pvc: 'Work_Volume' is not a valid Kubernetes object name"),
        (
            ["--nodes", "2", "--pvc", "w", "--workdir", "/elsewhere"],
            "must be on the PVC (under /mnt/flowgrpo)",
        ),
    ],
)
def test_invalid_cluster_options_fail_compile_with_a_message(tmp_path, capsys, flags, message):
    assert main(["compile", "-o", str(tmp_path / "x.yaml"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_cluster_options_round_trip_through_the_environment_variable():
    assert ClusterOptions.from_json(FULL.to_json()) == FULL
    with pytest.raises(ClusterOptionsError, match="unknown options"):
        ClusterOptions.from_json(json.dumps({**json.loads(FULL.to_json()), "gpu": 1}))


# ---------------------------------------------------------------- rendered manifests


def _serving(*overrides: str):
    return load_config("tiny", overrides=list(overrides)).serving


def test_every_reward_has_a_server_spec():
    from flowgrpo_core.rewards import REWARD_NAMES

    assert set(REWARD_SERVERS) == set(REWARD_NAMES)


def test_rendered_reward_servers_validate_and_are_wired_together():
    servers = render_reward_servers(sorted(REWARD_SERVERS), RUN_ID, NAMESPACE, _serving(), FULL)
    assert sorted(s.name for s in servers) == sorted([*REWARD_SERVERS, JUDGE_NAME])
    for server in servers:
        validate(server.deployment)
        validate(server.service)
        pod = server.deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        # the Service reaches exactly this Deployment's pods, on the port the probes check
        assert server.service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert server.service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"] == "http"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
        name = server.deployment["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 52
        assert (
            server.url
            == f"http://{name}.{NAMESPACE}.svc.cluster.local:{container['ports'][0]['containerPort']}"
            + ("/v1" if server.name == JUDGE_NAME else "")
        )
        assert names.run_selector(RUN_ID).split(",")[1] in [
            f"{k}={v}" for k, v in pod["metadata"]["labels"].items()
        ]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert {"name": "flowgrpo-work", "persistentVolumeClaim": {"claimName": "flowgrpo-work"}} in pod[
            "spec"
        ]["volumes"]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
            "name": "s3-creds",
            "key": "AWS_ACCESS_KEY_ID",
            "optional": False,
        }
        gpu = REWARD_SERVERS[server.name].gpu if server.is_reward else True
        limits = container["resources"]["limits"]
        assert (limits.get("nvidia.com/gpu") == "1") is gpu, server.name
        assert ("nodeSelector" in pod["spec"]) is gpu and ("tolerations" in pod["spec"]) is gpu
    by_name = {s.name: s for s in servers}
    judge = by_name[JUDGE_NAME]
    assert (
        judge.deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        == "ghcr.io/flowgrpo/flowgrpo-unifiedreward-sglang:0.1.0"
    )
    client_command = by_name["unifiedreward"].deployment["spec"]["template"]["spec"]["containers"][0][
        "command"
    ]
    assert client_command[-2:] == ["--option", f"url={judge.url}"]


def test_reward_server_commands_parse_with_the_real_serve_reward_command():
    import argparse

    from flowgrpo_core.serving.commands import add_serve_reward_parser

    parser = argparse.ArgumentParser()
    add_serve_reward_parser(parser.add_subparsers(dest="command"))
    serving = _serving("serving.server_args={pickscore: [--dtype, float16, --max-batch, '8']}")
    for server in render_reward_servers(sorted(REWARD_SERVERS), RUN_ID, NAMESPACE, serving, FULL):
        if not server.is_reward:
            continue
        command = server.deployment["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["python", "-m", "flowgrpo_core.serving"]
        args = parser.parse_args(command[3:])  # exits (fails the test) on a bad argument
        assert args.name == server.name and args.host == "0.0.0.0" and args.port == 8000
        if server.name == "pickscore":
            assert args.dtype == "float16" and args.max_batch == 8


def test_reward_images_follow_the_serving_config():
    serving = _serving(
        "serving.image_registry=registry.example/ml",
        "serving.image_tag=rc1",
        "serving.images={reward-clip: registry.example/clip:7}",
        "serving.gpus_per_server=0",
    )
    servers = {
        s.name: s for s in render_reward_servers(["ocr", "pickscore"], RUN_ID, NAMESPACE, serving, FULL)
    }
    images = {
        n: s.deployment["spec"]["template"]["spec"]["containers"][0]["image"] for n, s in servers.items()
    }
    assert images == {
        "ocr": "registry.example/ml/flowgrpo-reward-ocr:rc1",
        "pickscore": "registry.example/clip:7",
    }
    pickscore = servers["pickscore"].deployment["spec"]["template"]["spec"]
    assert (
        "nvidia.com/gpu" not in pickscore["containers"][0]["resources"]["limits"]
        and "nodeSelector" not in pickscore
    )


def _deployment() -> dict:
    return render_reward_servers(["ocr"], RUN_ID, NAMESPACE, _serving(), FULL)[0].deployment


def test_a_typo_or_a_wrong_type_fails_validation():
    bad = _deployment()
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    container["ports"][0]["containerPort"] = "8000"
    with pytest.raises(ManifestError) as error:
        validate(bad)
    assert error.value.problems == [
        "spec.template.spec.containers[0].ports[0].containerPort: expected an integer, got '8000'",
        "spec.template.spec.containers[0].readinesProbe: unknown field of V1Container (did you mean 'readinessProbe'?)",
    ]
    missing = _deployment()
    del missing["spec"]["template"]["spec"]["containers"][0]["image"]
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ManifestError, match="Invalid value for `name`, must not be `None`"):
        validate(missing)
    mismatched = _deployment()
    mismatched["spec"]["selector"]["matchLabels"][names.RUN_LABEL] = "another-run"
    with pytest.raises(ManifestError, match=r"must be non-empty and match spec\.template\.metadata\.labels"):
        validate(mismatched)


def _job(**changes) -> dict:
    cluster = ClusterOptions(
        nodes=3,
        gpus=8,
        pvc="flowgrpo-work",
        s3_secret="s3-creds",
        trainer_image="img:1",
        tolerations=(Toleration("nvidia.com/gpu"),),
        **changes,
    )
    command = train_command.torchrun_command(
        3, 8, "sd3-ocr", ["train.beta=0.02"], "/mnt/flowgrpo/work/r/train"
    )
    return trainjob.render_pytorchjob(RUN_ID, NAMESPACE, cluster, "img:1", command)


def test_the_pytorchjob_validates_and_asks_for_the_nodes_and_gpus():
    job = validate(_job())
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "8"
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        container = pod["containers"][0]
        assert container["name"] == "pytorch" and container["ports"][0]["name"] == "pytorchjob-port"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"name": "flowgrpo-work", "mountPath": "/mnt/flowgrpo"} in container["volumeMounts"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert container["command"][:6] == [
            "torchrun",
            "--nnodes=3",
            "--nproc_per_node=8",
            "--node_rank=$(RANK)",
            "--master_addr=$(MASTER_ADDR)",
            "--master_port=$(MASTER_PORT)",
        ]


def test_a_pytorchjob_typo_fails_validation():
    typo = _job()
    typo["spec"]["runpolicy"] = typo["spec"].pop("runPolicy")
    with pytest.raises(
        ManifestError, match=r"spec: Additional properties are not allowed \('runpolicy' was unexpected\)"
    ):
        validate(typo)
    in_pod = _job()
    container = in_pod["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    with pytest.raises(
        ManifestError, match=r"Worker\.template\.spec\.containers\[0\]\.volumeMount: unknown field"
    ):
        validate(in_pod)
    two_masters = _job()
    two_masters["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    with pytest.raises(ManifestError, match=r"Master\.replicas: must be 1"):
        validate(two_masters)


def test_the_training_command_parses_with_the_real_cli_and_escapes_substitution():
    command = train_command.torchrun_command(
        2, 4, "sd3-ocr", ["train.beta=0.02", "prompts.train=/data/$(x).txt"], "/w/r/train"
    )
    assert command[command.index("-m") + 1] == "flowgrpo_core.cli"
    args = build_parser().parse_args(command[command.index("-m") + 2 :])
    assert args.command == "train" and args.preset == "sd3-ocr" and args.resume and args.out == "/w/r/train"
    # Kubernetes would substitute $(x) from the environment; $$( is its escape for a literal $(
    assert args.overrides == ["train.beta=0.02", "prompts.train=/data/$$(x).txt"]


def test_a_command_line_the_cli_refuses_fails_before_any_job_is_created():
    with pytest.raises(ValueError, match="unrecognized arguments: --bogus"):
        train_command.check_command(
            [*train_command.torchrun_command(2, 1, "tiny", [], "/w/train"), "--bogus", "1"]
        )


def test_the_training_command_with_reward_servers_is_accepted_by_the_cli():
    # multi-node training that scores through the reward servers hands their URLs to `flowgrpo train`
    train_command.check_command(
        train_command.torchrun_command(2, 4, "sd3-ocr", [], "/w/train", endpoints_file="/w/e.json")
    )


def test_names_are_valid_and_distinct_per_run():
    weird = "Run/With Spaces_and_a_very_long_identifier_that_goes_on_and_on_and_on_for_more_than_63"
    for run_id in (RUN_ID, weird):
        name = names.object_name("reward-jpeg_incompressibility", run_id)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 52
        assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", names.run_label(run_id))
    assert names.object_name("train", "run-a") != names.object_name("train", "run-b")


# ---------------------------------------------------------------- reward servers against the API server


@pytest.fixture
def cluster_env(monkeypatch):
    monkeypatch.setenv(CLUSTER_ENV, FULL.to_json())
    return FULL


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the module (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def make_ctx(tmp_path, tracking_uri, request):
    from flowgrpo_core.stages import PipelineContext

    def make(*overrides: str, workdir: Path | None = None) -> PipelineContext:
        return PipelineContext(
            preset="tiny",
            overrides=list(overrides),
            kfp_run_id=RUN_ID,
            tracking_uri=tracking_uri,
            experiment=request.node.name,
            workdir=str(workdir or tmp_path / "work"),
        )

    return make


def test_launch_creates_deployments_and_services_and_stop_deletes_them(
    kube_api, cluster_env, make_ctx, tmp_path
):
    from flowgrpo_core.stages.servers import launch_reward_servers, stop_reward_servers

    # an object of another run, which stop must leave alone
    other = render_reward_servers(["ocr"], "another-run", NAMESPACE, _serving(), FULL)[0].deployment
    kube_api.objects[("deployments", NAMESPACE, other["metadata"]["name"])] = other

    ctx = make_ctx("rewards={ocr: 1.0, unifiedreward: 0.5}")  # serving.mode stays 'process'
    endpoints = launch_reward_servers(ctx, tmp_path / "endpoints.json")
    expected = {
        s.name: s
        for s in render_reward_servers(["ocr", "unifiedreward"], RUN_ID, NAMESPACE, _serving(), FULL)
    }
    assert endpoints == {
        "ocr": {"url": expected["ocr"].url, "weight": 1.0},
        "unifiedreward": {"url": expected["unifiedreward"].url, "weight": 0.5},
    }
    assert json.loads((tmp_path / "endpoints.json").read_text()) == endpoints
    created = kube_api.sent("POST", "deployments")
    assert sorted(b["metadata"]["name"] for _, _, b in created) == sorted(
        s.deployment["metadata"]["name"] for s in expected.values()
    )
    for path, query, body in created + kube_api.sent("POST", "services"):
        assert f"/namespaces/{NAMESPACE}/" in path and query == {"fieldValidation": "Strict"}
        validate(body)  # what reached the API server is a valid object
    assert len(kube_api.sent("GET", "deployments")) >= 3  # waited for each to report ready

    stopped = stop_reward_servers(ctx)
    assert sorted(stopped) == sorted(
        [f"deployment/{s.deployment['metadata']['name']}" for s in expected.values()]
        + [f"service/{s.service['metadata']['name']}" for s in expected.values()]
    )
    deletes = (
        kube_api.sent("DELETE", "deployments")
        + kube_api.sent("DELETE", "services")
        + kube_api.sent("DELETE", "pytorchjobs")
    )
    assert {q["labelSelector"] for _, q, _ in deletes} == {names.run_selector(RUN_ID)}
    assert list(kube_api.objects) == [("deployments", NAMESPACE, other["metadata"]["name"])]


def test_a_pod_that_cannot_pull_its_image_fails_the_launch_and_is_deleted(
    kube_api, cluster_env, make_ctx, tmp_path
):
    from flowgrpo_core.stages.servers import launch_reward_servers

    kube_api.ready = False
    kube_api.pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "flowgrpo-reward-ocr-x-1", "labels": names.run_labels(RUN_ID, "reward-ocr")},
            "status": {
                "containerStatuses": [
                    {
                        "name": "server",
                        "image": "i",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}},
                    }
                ]
            },
        }
    ]
    with pytest.raises(
        RuntimeError, match="pod flowgrpo-reward-ocr-x-1: ImagePullBackOff: pull access denied"
    ):
        launch_reward_servers(make_ctx("rewards={ocr: 1.0}"), tmp_path / "endpoints.json")
    assert kube_api.objects == {}  # nothing left behind by the failed launch


def test_a_server_that_never_gets_ready_times_out_naming_the_reason(kube_api):
    kube_api.ready = False
    kube_api.pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "labels": names.run_labels(RUN_ID, "reward-ocr")},
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "message": "0/3 nodes have enough nvidia.com/gpu",
                    }
                ]
            },
        }
    ]
    servers = render_reward_servers(["ocr"], RUN_ID, NAMESPACE, _serving(), FULL)
    with pytest.raises(
        TimeoutError,
        match=r"(?s)\['ocr'\] not ready after 0.3 s.*not scheduled: 0/3 nodes have enough nvidia.com/gpu",
    ):
        KubernetesRewardServers(connect(), servers, RUN_ID, startup_timeout_s=0.3, poll_s=0.05).start()


def test_a_retried_launch_finds_its_objects_in_place(kube_api):
    servers = render_reward_servers(["ocr"], RUN_ID, NAMESPACE, _serving(), FULL)
    first = KubernetesRewardServers(connect(), servers, RUN_ID, startup_timeout_s=5).start()
    again = KubernetesRewardServers(connect(), servers, RUN_ID, startup_timeout_s=5).start()
    assert first == again == {"ocr": servers[0].url}
    assert [len(kube_api.sent("POST", k)) for k in ("deployments", "services")] == [2, 2]  # 409 the 2nd time
    assert len(kube_api.objects) == 2


def test_stop_works_without_the_training_operator(kube_api, cluster_env, make_ctx):
    from flowgrpo_core.stages.servers import stop_reward_servers

    kube_api.crd_installed = False
    assert stop_reward_servers(make_ctx()) == []


# ---------------------------------------------------------------- multi-node training against the API server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _substitute(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in container commands: defined variables only, $$ escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text
    )


class LocalOperator:
    """Runs a created PyTorchJob's pods as local processes with the environment the training operator
    sets (MASTER_ADDR/MASTER_PORT of the Master, RANK = pod index, WORLD_SIZE, PET_*), then records
    Succeeded or Failed in the job's status as the operator would."""

    def __init__(self, fake: FakeKubeAPI) -> None:
        self.fake = fake
        self.logs: dict[str, str] = {}
        self.threads: list[threading.Thread] = []

    def __call__(self, job: dict) -> None:
        thread = threading.Thread(target=self._run, args=(job,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _run(self, job: dict) -> None:
        specs = job["spec"]["pytorchReplicaSpecs"]
        nodes = sum(s["replicas"] for s in specs.values())
        port, procs = str(_free_port()), job["spec"]["nprocPerNode"]
        pods = [("master", 0, specs["Master"])] + [
            ("worker", i, specs["Worker"]) for i in range(specs.get("Worker", {}).get("replicas", 0))
        ]
        processes = []
        for role, index, spec in pods:
            rank = index + (role == "worker")
            container = spec["template"]["spec"]["containers"][0]
            env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            env |= {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(rank),
                "WORLD_SIZE": str(nodes * int(procs)),
                "PET_NNODES": str(nodes),
                "PET_NPROC_PER_NODE": procs,
                "PET_NODE_RANK": str(rank),
            }
            command = [_substitute(arg, env) for arg in container["command"]]
            path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
            processes.append(
                (
                    f"{role}-{index}",
                    subprocess.Popen(
                        command,
                        env={**os.environ, **env, "PATH": path, "OMP_NUM_THREADS": "1"},
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    ),
                )
            )
        codes = []
        for name, process in processes:
            out, _ = process.communicate(timeout=600)
            self.logs[name] = out
            codes.append(process.returncode)
        state = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        with self.fake.lock:
            stored = self.fake.objects[("pytorchjobs", job["metadata"]["namespace"], job["metadata"]["name"])]
            stored["status"] = {
                "conditions": [
                    {"type": "Created", "status": "True"},
                    {
                        "type": state,
                        "status": "True",
                        "reason": f"PyTorchJob{state}",
                        "message": f"exit codes {codes}",
                    },
                ]
            }


@pytest.mark.slow
def test_multi_node_training_runs_the_rendered_job_and_returns_its_policy(
    kube_api, make_ctx, tracking_uri, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.models.tiny import build_tiny_sd3
    from flowgrpo_core.stages.train import train_grpo

    volume = tmp_path / "volume"  # the PVC's mount path, the same on every "node" of this machine
    cluster = ClusterOptions(
        nodes=2, gpus=0, pvc="flowgrpo-work", mount_path=str(volume), trainer_image="img:1"
    )
    monkeypatch.setenv(CLUSTER_ENV, cluster.to_json())
    operator = LocalOperator(kube_api)
    kube_api.on_pytorchjob = operator
    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "model")  # the step's input artifact, local to its pod
    ctx = make_ctx("serving.mode=inline", "train.epochs=1", workdir=volume / "work")
    monkeypatch.setattr(trainjob, "POLL_S", 0.2)  # how often the step reads the job's status
    final = train_grpo(ctx, tmp_path / "model", None, tmp_path / "policy")

    assert "2 processes" in operator.logs["master-0"], operator.logs  # two nodes of one process each
    assert final["epochs"] == 1.0 and final["resumed"] == 0.0 and "reward/total" in final
    assert (tmp_path / "policy" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "policy" / "metrics.json").read_text())[0]["epoch"] == 0
    shared = volume / "work" / RUN_ID / "base-model"  # the base model, copied once onto the volume
    assert (shared / "model_index.json").is_file()
    ((_, query, job),) = kube_api.sent("POST", "pytorchjobs")
    assert query == {"fieldValidation": "Strict"} and validate(job)
    assert (
        f"model.source={json.dumps(str(shared))}"
        in job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    )
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(ctx.experiment_name).experiment_id
    stage = client.search_runs([experiment], "tags.stage = 'train_grpo'")[0]
    assert [m.step for m in client.get_metric_history(stage.info.run_id, "reward/total")] == [0]
    assert stage.data.tags["train.pytorchjob"] == job["metadata"]["name"]
    _assert_the_common_ending(client, stage)


def _finishing(fake: FakeKubeAPI, states: list[str]):
    """An operator that marks each created job with the next state of ``states`` at once."""

    def operator(job: dict) -> None:
        state = states.pop(0)
        job["status"] = {
            "conditions": [{"type": state, "status": "True", "reason": f"PyTorchJob{state}", "message": "m"}]
        }

    return operator


def test_a_failed_job_fails_the_step_and_a_retry_replaces_it(kube_api):
    kube = Kube(connect().api, NAMESPACE)
    job = _job()
    kube_api.on_pytorchjob = _finishing(kube_api, ["Failed", "Succeeded"])
    name = job["metadata"]["name"]
    with pytest.raises(
        RuntimeError,
        match=f"PyTorchJob {NAMESPACE}/{name} failed .*kubectl logs -n {NAMESPACE} {name}-master-0",
    ):
        trainjob.run_job(kube, job, poll_s=0.01)
    done = trainjob.run_job(
        kube, job, poll_s=0.01
    )  # the retried step: 409, delete the failed job, create anew
    assert trainjob.job_state(done)[0] == "Succeeded"
    calls = [
        (m, _PATH.match(p)["name"])
        for m, p, _, _ in kube_api.requests
        if _PATH.match(p)["plural"] == "pytorchjobs"
    ]
    assert calls[calls.index(("POST", None), 1) :] == [
        ("POST", None),
        ("GET", name),
        ("DELETE", name),
        ("GET", name),
        ("POST", None),
        ("GET", name),
    ]


def test_a_running_job_is_awaited_not_recreated(kube_api):
    kube = Kube(connect().api, NAMESPACE)
    job = _job()
    kube_api.objects[("pytorchjobs", NAMESPACE, job["metadata"]["name"])] = copy.deepcopy(
        job
    )  # still running
    reads = []

    def finish_later() -> None:
        while len(kube_api.sent("GET", "pytorchjobs")) < 3:
            time.sleep(0.01)
        with kube_api.lock:
            kube_api.objects[("pytorchjobs", NAMESPACE, job["metadata"]["name"])]["status"] = {
                "conditions": [{"type": "Succeeded", "status": "True"}]
            }
        reads.append(True)

    threading.Thread(target=finish_later, daemon=True).start()
    assert trainjob.job_state(trainjob.run_job(kube, job, poll_s=0.01))[0] == "Succeeded"
    assert (
        reads
        and kube_api.sent("DELETE", "pytorchjobs") == []
        and len(kube_api.sent("POST", "pytorchjobs")) == 1
    )


def test_several_gpus_on_one_node_train_as_one_process_per_gpu(tmp_path, monkeypatch):
    """`--gpus 2 --nodes 1`: the training step runs `torchrun --standalone` with 2 processes (gloo on this CPU)
    and collects their policy and metric history into its own output and MLflow run."""
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.cluster.options import CLUSTER_ENV, ClusterOptions
    from flowgrpo_core.models.tiny import build_tiny_sd3
    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.train import train_grpo

    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "model")
    monkeypatch.setenv(CLUSTER_ENV, ClusterOptions(gpus=2).to_json())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = PipelineContext(
        preset="tiny",
        overrides=["serving.mode=inline", "train.epochs=1"],
        kfp_run_id="two-procs",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="",
        workdir=str(tmp_path / "work"),
    )
    final = train_grpo(ctx, tmp_path / "model", None, tmp_path / "policy")
    assert final["epochs"] == 1.0 and (tmp_path / "policy" / "pytorch_lora_weights.safetensors").is_file()
    client = MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.stage = 'train_grpo'"
    )
    assert run.data.tags["train.launcher"] == "torchrun" and run.data.tags["train.procs_per_node"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/total")] == [0]
    _assert_the_common_ending(client, run)


def _assert_the_common_ending(client, run):
    """What every training launcher logs, in one place (stages.train._finish)."""
    assert run.data.tags["train.resumed_from_epoch"] == "none"
    assert run.data.metrics["stage/work_s"] > 0
    logged = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "samples")
    }
    assert {"reward_curve.png", "policy", "samples/last_epoch.png"} <= logged
