"""Multi-node training as a PyTorchJob (kubeflow.org/v1), launched and awaited by the training stage.

With ``--nodes M`` the ``train_grpo`` step does not train: it shares the base model on the PVC, creates a
PyTorchJob of M pods (one Master, M-1 Workers, each with ``--gpus`` GPUs) that run

    torchrun --nnodes M --nproc_per_node N ... -m flowgrpo_core.cli train --preset P --set ... --out DIR --resume

and waits for it. The policy, checkpoints and metric history come back through the shared volume: the
step copies ``DIR/policy`` into its output artifact and logs the history to MLflow, as the in-process path
does. A retried step finds its job: a running one is awaited, a failed one is replaced by a new one that
resumes from the last checkpoint (``--resume``), a succeeded one is reused.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from flowgrpo_core.cluster import names, pods
from flowgrpo_core.cluster.kube import Kube, is_status
from flowgrpo_core.cluster.options import CLUSTER_ENV, ClusterOptions
from flowgrpo_core.cluster.validation import validate

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
# how often the training step reads the job's status (training runs for hours)
POLL_S = 30.0
# the operator finds the rendezvous port on the container port of this name (and defaults it to 23456)
PORT_NAME, MASTER_PORT = "pytorchjob-port", 23456


def _escape(arg: str) -> str:
    # Kubernetes expands $(VAR) in command arguments; a literal one in a user's override must survive
    return arg.replace("$(", "$$(")


def train_arguments(
    preset: str, overrides: Sequence[str], out_dir: str, endpoints_file: str | None = None, escape=lambda a: a
) -> list[str]:
    """``-m flowgrpo_core.cli train ...`` as every training process runs it (resuming, so a retry continues)."""
    command = ["-m", "flowgrpo_core.cli", "train", "--preset", escape(preset)]
    for override in overrides:
        command += ["--set", escape(override)]
    if endpoints_file:
        command += ["--endpoints", escape(endpoints_file)]
    return [*command, "--out", escape(out_dir), "--resume", "--no-progress"]


def torchrun_command(
    nodes: int, procs_per_node: int, preset: str, overrides: Sequence[str], out_dir: str,
    endpoints_file: str | None = None,
) -> list[str]:  # fmt: skip
    """The training command of every node. The training operator sets MASTER_ADDR / MASTER_PORT (the
    Master pod's Service) and RANK (the pod's index: 0 for the Master, 1.. for the Workers) in each pod;
    Kubernetes substitutes ``$(VAR)`` from the container's environment before starting it."""
    launcher = [
        "torchrun", f"--nnodes={nodes}", f"--nproc_per_node={procs_per_node}", "--node_rank=$(RANK)",
        "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)",
    ]  # fmt: skip
    return [*launcher, *train_arguments(preset, overrides, out_dir, endpoints_file, escape=_escape)]


def check_command(command: list[str]) -> None:
    """Parse the nodes' ``flowgrpo train`` arguments with this image's own CLI (the nodes run the same
    image): an option it does not know fails here, in seconds, not on every node after scheduling."""
    import contextlib
    import io

    from flowgrpo_core.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(command[command.index("flowgrpo_core.cli") + 1 :])
    except SystemExit:
        last = (errors.getvalue().strip().splitlines() or ["?"])[-1]
        raise ValueError(f"`flowgrpo train` refuses the training nodes' command line: {last}") from None


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
        "metadata": {"name": names.object_name("train", run_id), "namespace": namespace, "labels": labels,
                     "annotations": {names.RUN_ID_ANNOTATION: run_id}},
        "spec": {
            "nprocPerNode": str(procs),
            # finished pods stay (their logs explain a failure) until the exit handler deletes the job
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
            "pytorchReplicaSpecs": specs,
        },
    }  # fmt: skip


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


def share_model(model_dir: str | Path, target: Path) -> Path:
    """Copy the base model (the step's input artifact, local to its pod) onto the shared volume once, so
    that every node loads the same files. Copied beside, then renamed: a half copy is never used."""
    if target.is_dir():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(model_dir, partial)
    partial.rename(target)
    return target


def _prepare(
    ctx, model_dir, endpoints_path, shared_base: Path | None
) -> tuple[Path, list[str], str | None, bool]:
    """The run's training folder, the processes' overrides (pointing at the base model), the endpoints file
    they read, and whether a checkpoint will be resumed. Fails on a bad config before any process starts."""
    from flowgrpo_core.checkpoint import latest_checkpoint
    from flowgrpo_core.config import load_config
    from flowgrpo_core.stages.common import read_endpoints

    out = ctx.run_dir / "train"
    out.mkdir(parents=True, exist_ok=True)
    base = share_model(model_dir, shared_base) if shared_base is not None else Path(model_dir)
    overrides = [*ctx.overrides, f"model.source={json.dumps(str(base))}"]
    load_config(ctx.preset, overrides=overrides)
    endpoints_file = None
    if read_endpoints(endpoints_path):
        endpoints_file = str(out / "endpoints.json")
        shutil.copyfile(endpoints_path, endpoints_file)
    return out, overrides, endpoints_file, latest_checkpoint(out / "checkpoints") is not None


def _collect(out: Path, policy_dir: str | Path, resumed: bool) -> dict:
    """Inside the stage's MLflow run: copy the policy trained by other processes, log the epochs not logged
    yet (a retried step may have logged some) and the reward curve; return the final metrics."""
    import tempfile

    import mlflow

    from flowgrpo_core.tracking import log_metrics, reward_curve

    policy = out / "policy"
    history = json.loads((policy / "metrics.json").read_text())
    shutil.copytree(policy, policy_dir, dirs_exist_ok=True)
    run_id = mlflow.active_run().info.run_id
    logged = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "reward/total")}
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            log_metrics(metrics, step=int(metrics["epoch"]))
    mlflow.log_artifacts(str(policy_dir), "policy")
    with tempfile.TemporaryDirectory() as tmp:
        if history:
            mlflow.log_artifact(str(reward_curve(history, Path(tmp) / "reward_curve.png")))
    mlflow.set_tag("train.resumed_from_epoch", "checkpoint" if resumed else "none")
    final = {
        k: v
        for k, v in (history[-1] if history else {}).items()
        if not k.startswith("train/ratio_mean/step_")
    }
    final["resumed"] = float(resumed)
    final["epochs"] = float(int(history[-1]["epoch"]) + 1 if history else 0)
    return final


def train_on_local_processes(
    ctx, processes: int, model_dir: str | Path, endpoints_path: str | Path | None, policy_dir: str | Path
) -> dict:
    """``--gpus N`` on one node: the step runs ``torchrun --standalone`` with one process per GPU and collects
    the policy like the PyTorchJob path (the processes write checkpoints, so a retried step resumes)."""
    import subprocess
    import sys

    import mlflow

    config = ctx.config()
    with ctx.stage("train_grpo"):
        mlflow.log_text(config.to_yaml(), "config.yaml")
        out, overrides, endpoints_file, resumed = _prepare(ctx, model_dir, endpoints_path, shared_base=None)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *train_arguments(ctx.preset, overrides, str(out), endpoints_file)]  # fmt: skip
        mlflow.set_tags({"train.launcher": "torchrun", "train.procs_per_node": str(processes)})
        result = subprocess.run(command)
        if result.returncode:
            raise RuntimeError(
                f"training processes failed (exit code {result.returncode}): {' '.join(command)}"
            )
        return _collect(out, policy_dir, resumed)


def train_on_pytorchjob(
    ctx, cluster: ClusterOptions, model_dir: str | Path, endpoints_path: str | Path | None,
    policy_dir: str | Path, kube: Kube | None = None,
) -> dict:  # fmt: skip
    """The training stage when ``cluster.nodes > 1``: returns the same final metrics as the in-process path.
    The nodes run ``cluster.trainer_image``, the image of the pipeline's own steps."""
    import mlflow

    from flowgrpo_core.cluster.kube import connect

    config = ctx.config()
    run_dir = ctx.run_dir
    if not cluster.on_volume(str(run_dir)):
        raise ValueError(
            f"multi-node training needs the work folder on the shared volume: workdir {ctx.workdir!r} is not "
            f"under the PVC's mount path {cluster.mount_path!r}"
        )
    if not cluster.trainer_image:
        raise ValueError(f"${CLUSTER_ENV} names no trainer image for the training nodes")
    with ctx.stage("train_grpo"):
        mlflow.log_text(config.to_yaml(), "config.yaml")
        out, overrides, endpoints_file, resumed = _prepare(
            ctx, model_dir, endpoints_path, shared_base=run_dir / "base-model"
        )
        command = torchrun_command(
            cluster.nodes, max(cluster.gpus, 1), ctx.preset, overrides, str(out), endpoints_file
        )
        check_command(command)
        kube = kube or connect()  # the PVC and secrets live in the pipeline's own namespace
        job = render_pytorchjob(ctx.kfp_run_id, kube.namespace, cluster, cluster.trainer_image, command)
        mlflow.set_tags({"train.pytorchjob": job["metadata"]["name"], "train.nodes": str(cluster.nodes),
                         "train.procs_per_node": str(max(cluster.gpus, 1))})  # fmt: skip
        run_job(kube, job, poll_s=POLL_S)
        return _collect(out, policy_dir, resumed)
