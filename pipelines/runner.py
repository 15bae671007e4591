"""Run the pipeline locally (kfp.local), compile it to KFP IR YAML, or submit it to a KFP server.

Every entry point validates its input first (config, model source, tracking server), so a typo fails in a
second with a message instead of after the first stage has started.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from flowgrpo_core.cluster.options import ClusterOptions
from flowgrpo_core.stages.common import DEFAULT_WORKDIR, PipelineContext


@dataclass
class LocalRun:
    experiment: str
    parent_run_id: str | None
    registered: str | None  # "name/version"
    tracking_uri: str
    seconds: float
    gate: str | None = None  # why champion moved or not


def run_local(args: PipelineContext, pipeline_root: str = "flowgrpo-runs/kfp") -> LocalRun:
    """The whole DAG in this machine's processes (kfp.local.SubprocessRunner, no containers)."""
    from kfp import local

    from pipelines.flowgrpo_pipeline import flowgrpo_pipeline

    args.validate()
    experiment = args.experiment_name
    start = time.time()
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(pipeline_root).resolve())
    )
    flowgrpo_pipeline(**args.pipeline_arguments())
    parent = _latest_parent_run(args.tracking_uri, experiment, since=start)
    registered = gate = None
    if parent is not None:
        tags = {r.data.tags.get("stage"): r.data.tags for r in _stage_runs(parent)}
        register = tags.get("register_model", {})
        if "registry.model" in register:
            registered = f"{register['registry.model']}/{register['registry.version']}"
            passed = "champion" if register.get("gate.passed") == "true" else "stays a candidate"
            gate = f"{passed}: {register.get('gate.reason', '')}"
    return LocalRun(
        experiment,
        parent.info.run_id if parent else None,
        registered,
        args.tracking_uri,
        time.time() - start,
        gate,
    )


def _latest_parent_run(tracking_uri: str, experiment: str, since: float):
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.tracking import configure

    configure(tracking_uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`flowgrpo.role` = 'pipeline' and attributes.start_time >= {int(since * 1000) - 1000}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _stage_runs(parent) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient().search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )


def for_cluster(args: PipelineContext, cluster: ClusterOptions) -> PipelineContext:
    """The arguments of a cluster run: with a PVC, the default work folder moves onto it (checkpoints must
    survive the step's pod for a retry to resume; training nodes share them)."""
    import dataclasses

    if cluster.pvc and args.workdir == DEFAULT_WORKDIR:
        args = dataclasses.replace(args, workdir=cluster.mount_path.rstrip("/") + "/work")
    if cluster.distributed_training and not cluster.on_volume(args.workdir):
        raise ValueError(
            f"--nodes {cluster.nodes}: the work folder {args.workdir!r} must be on the PVC (under {cluster.mount_path})"
        )
    return args


def compile_pipeline(
    args: PipelineContext, output: str | Path, gpus: int = 0, cluster: ClusterOptions | None = None
) -> Path:
    """KFP IR YAML whose parameter defaults are these arguments (so the UI shows them pre-filled)."""
    from kfp import compiler

    from pipelines.flowgrpo_pipeline import build_pipeline

    cluster = cluster or ClusterOptions(gpus=gpus)
    args = for_cluster(args, cluster)
    args.validate(check_tracking=False)  # the cluster reaches its own tracking server, this machine may not
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        build_pipeline(cluster=cluster), str(output), pipeline_parameters=args.pipeline_arguments()
    )
    return output


def submit(
    args: PipelineContext,
    host: str,
    run_name: str | None = None,
    kfp_experiment: str | None = None,
    gpus: int = 0,
    cluster: ClusterOptions | None = None,
) -> str:
    """Submit to Kubeflow Pipelines at ``host``; returns the KFP run id."""
    import kfp

    from pipelines.flowgrpo_pipeline import build_pipeline

    cluster = cluster or ClusterOptions(gpus=gpus)
    args = for_cluster(args, cluster)
    args.validate(check_tracking=False)
    _check_kfp_host(host)
    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_func(
        build_pipeline(cluster=cluster),
        arguments=args.pipeline_arguments(),
        run_name=run_name or f"flowgrpo-{args.preset}",
        experiment_name=kfp_experiment or f"flowgrpo-{args.preset}",
    )
    return run.run_id


def _check_kfp_host(host: str, timeout_s: float = 10.0) -> None:
    import urllib.error
    import urllib.request

    if not host.startswith(("http://", "https://")):
        raise ValueError(f"KFP host {host!r} must be an http(s):// URL")
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        urllib.request.urlopen(url, timeout=timeout_s)
    except urllib.error.HTTPError:
        return  # the server answered (auth proxies may refuse healthz): reachable
    except (OSError, urllib.error.URLError) as error:
        raise ConnectionError(f"Kubeflow Pipelines host {host} is not reachable ({error})") from None
