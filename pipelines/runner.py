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
    run_id: str = ""  # the run's identity (``--resume`` takes it)
    resumed_from_epoch: str = "none"  # the epoch training continued from, when it did


class StepFailed(RuntimeError):
    """A step of a local run failed: the message names the step and its reason; ``tail`` holds the last lines
    of its output and ``log`` the run's whole log."""

    def __init__(self, message: str, tail: list[str], log: Path) -> None:
        super().__init__(message)
        self.tail, self.log = tail, log


class PipelineInterrupted(RuntimeError):
    """``flowgrpo run`` got SIGINT or SIGTERM: its processes and reward servers are stopped and its MLflow runs
    marked KILLED; the message says how to continue the run."""


def new_run_id() -> str:
    """A local run's identity: sortable by time, unique across concurrent runs."""
    import secrets

    return time.strftime("local-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def resolve_resume(ctx: PipelineContext, resume: str) -> str:
    """The run id ``flowgrpo run --resume`` continues: ``resume`` itself, or for ``last`` the newest pipeline
    run of the experiment that did not finish. Refuses an id that left nothing to continue."""
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.tracking import configure

    configure(ctx.tracking_uri)
    found = MlflowClient().get_experiment_by_name(ctx.experiment_name)
    runs = (
        MlflowClient().search_runs(
            [found.experiment_id],
            filter_string="tags.`flowgrpo.role` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
        )
        if found is not None
        else []
    )
    if resume == "last":
        unfinished = [r for r in runs if r.info.status != "FINISHED"]
        if not unfinished:
            raise ValueError(
                f"--resume last: experiment {ctx.experiment_name!r} has no unfinished pipeline run"
            )
        return unfinished[0].data.tags["kfp.run_id"]
    known = {r.data.tags.get("kfp.run_id") for r in runs}
    if resume not in known and not (Path(ctx.workdir) / resume).is_dir():
        raise ValueError(
            f"--resume {resume}: no such run in experiment {ctx.experiment_name!r} or under {ctx.workdir}"
        )
    return resume


LOG_NAME = "pipeline.log"


def run_local(
    args: PipelineContext, pipeline_root: str = "flowgrpo-runs/kfp", verbose: bool = False
) -> LocalRun:
    """The whole DAG in this machine's processes (kfp.local.SubprocessRunner, no containers).

    Everything the steps print goes to ``<workdir>/<run id>/pipeline.log``; the terminal gets our own lines
    (``verbose``: everything). A failed step raises :class:`StepFailed` with its reason and output's tail.

    The run gets an identity (``args.run_id``, or a new one) that keys its work folder and MLflow runs, so
    concurrent runs on one database stay apart and an interrupted run can be continued with the same id.
    SIGINT/SIGTERM stop the step running, the reward servers and mark the MLflow runs KILLED, then raise
    :class:`PipelineInterrupted`; reward servers also stop by themselves when this process dies harder
    (they watch its pid), and a later run marks such a run's MLflow runs KILLED.
    """
    import dataclasses
    import os

    from kfp import local

    from flowgrpo_core.processes import Interrupted, interrupt_on_signals
    from flowgrpo_core.stages.servers import OWNER_PID_ENV
    from pipelines.console import failure_report, routed_console
    from pipelines.flowgrpo_pipeline import flowgrpo_pipeline

    args.validate()
    args = dataclasses.replace(args, run_id=args.run_id or new_run_id())
    start = time.time()
    log = args.run_dir / LOG_NAME
    previous_owner = os.environ.get(OWNER_PID_ENV)
    os.environ[OWNER_PID_ENV] = str(os.getpid())  # the steps' processes inherit it; reward servers watch it
    try:
        with routed_console(log, verbose):
            _close_orphaned_runs(args)
            parent = _open_parent_run(args)
            local.init(
                runner=local.SubprocessRunner(use_venv=False),
                pipeline_root=str(Path(pipeline_root).resolve()),
            )
            with interrupt_on_signals():
                flowgrpo_pipeline(**args.pipeline_arguments())
    except Interrupted as interrupt:
        raise PipelineInterrupted(_stop_interrupted(args, interrupt.signal_name)) from None
    except RuntimeError as error:  # kfp.local: "Pipeline 'flowgrpo' finished with status FAILURE. ..."
        failure = failure_report(log)
        if failure is None:
            raise
        raise StepFailed(f"step {failure.step} failed: {failure.reason}", failure.tail, log) from error
    finally:
        if previous_owner is None:
            os.environ.pop(OWNER_PID_ENV, None)
        else:
            os.environ[OWNER_PID_ENV] = previous_owner
    registered = gate = None
    tags = {r.data.tags.get("stage"): r.data.tags for r in _stage_runs(parent)}
    register = tags.get("register_model", {})
    if "registry.model" in register:
        registered = f"{register['registry.model']}/{register['registry.version']}"
        passed = "champion" if register.get("gate.passed") == "true" else "stays a candidate"
        gate = f"{passed}: {register.get('gate.reason', '')}"
    return LocalRun(
        args.experiment_name,
        parent.info.run_id,
        registered,
        args.tracking_uri,
        time.time() - start,
        gate,
        args.run_id,
        tags.get("train_grpo", {}).get("train.resumed_from_epoch", "none"),
    )


def _open_parent_run(ctx: PipelineContext):
    """The run's parent MLflow run, created (or, for a continued run, reopened) before the first step, tagged
    with this process as its owner."""
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.tracking import configure, ensure_experiment, owner_tag, parent_run_id

    configure(ctx.tracking_uri)
    experiment_id = ensure_experiment(ctx.experiment_name, ctx.tracking_uri)
    run_id = parent_run_id(
        experiment_id, ctx.identity, ctx.parent_name(), ctx.parent_tags(), ctx.parent_params()
    )
    client = MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "flowgrpo.continued_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    client.set_tag(run_id, "flowgrpo.owner", owner_tag())
    return client.get_run(run_id)


def _close_orphaned_runs(ctx: PipelineContext) -> None:
    """Mark KILLED the MLflow runs of earlier local pipelines whose process died without closing them."""
    from flowgrpo_core.tracking import configure, orphaned_pipeline_runs, terminate_runs

    configure(ctx.tracking_uri)
    for run in orphaned_pipeline_runs(ctx.experiment_name):
        identity = run.data.tags.get("kfp.run_id", "")
        marked = terminate_runs(ctx.tracking_uri, ctx.experiment_name, identity)
        print(
            f"[flowgrpo] run {identity} was killed without closing its {len(marked)} MLflow runs: marked KILLED "
            f"(continue it with --resume {identity})"
        )


def _stop_interrupted(ctx: PipelineContext, signal_name: str) -> str:
    """Stop the step's processes and this run's reward servers, mark its MLflow runs KILLED; the message."""
    from flowgrpo_core.processes import signals_ignored, stop_children
    from flowgrpo_core.serving.manager import stop_servers
    from flowgrpo_core.stages.servers import servers_dir
    from flowgrpo_core.tracking import terminate_runs

    with signals_ignored():
        processes = stop_children()
        servers = stop_servers(servers_dir(ctx)) if servers_dir(ctx).is_dir() else []
        marked = terminate_runs(ctx.tracking_uri, ctx.experiment_name, ctx.identity)
    return (
        f"{signal_name}: stopped run {ctx.identity} ({len(processes)} processes, reward servers "
        f"{servers or 'none'}; {len(marked)} MLflow runs marked KILLED). Continue it, from its last "
        f"checkpoint, with the same command and --resume {ctx.identity}"
    )


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


@dataclass(frozen=True)
class KfpConnection:
    """Where and as whom ``submit`` talks to Kubeflow Pipelines: the host, the profile namespace of a
    multi-user Kubeflow, and at most one way to authenticate (a bearer token from an environment variable, a
    service-account token file, or an auth proxy's session cookies from an environment variable)."""

    host: str
    namespace: str | None = None
    token_env: str | None = None
    sa_token_path: str | None = None
    cookies_env: str | None = None
    ssl_ca_cert: str | None = None

    def client_arguments(self) -> dict:
        """``kfp.Client``'s keyword arguments; fails naming the option whose secret is missing."""
        import os

        ways = [name for name in ("token_env", "sa_token_path", "cookies_env") if getattr(self, name)]
        if len(ways) > 1:
            raise ValueError(
                f"pass one way to authenticate, not {', '.join('--' + w.replace('_', '-') for w in ways)}"
            )
        arguments: dict = {"host": self.host, "namespace": self.namespace or "kubeflow"}
        for option, name, key in (
            ("--token-env", self.token_env, "existing_token"),
            ("--cookies-env", self.cookies_env, "cookies"),
        ):
            if name:
                if not os.environ.get(name):
                    raise ValueError(f"{option} {name}: the environment variable is not set or empty")
                arguments[key] = os.environ[name]
        for option, path in (("--sa-token-path", self.sa_token_path), ("--ssl-ca-cert", self.ssl_ca_cert)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"{option} {path}: no such file")
        if self.sa_token_path:
            from kfp.client import ServiceAccountTokenVolumeCredentials

            arguments["credentials"] = ServiceAccountTokenVolumeCredentials(path=self.sa_token_path)
        if self.ssl_ca_cert:
            arguments["ssl_ca_cert"] = self.ssl_ca_cert
        return arguments


def submit(
    args: PipelineContext,
    connection: KfpConnection | str,
    run_name: str | None = None,
    kfp_experiment: str | None = None,
    gpus: int = 0,
    cluster: ClusterOptions | None = None,
) -> str:
    """Submit to Kubeflow Pipelines (``connection``, or just its host); returns the KFP run id."""
    import kfp

    from pipelines.flowgrpo_pipeline import build_pipeline

    if isinstance(connection, str):
        connection = KfpConnection(connection)
    cluster = cluster or ClusterOptions(gpus=gpus)
    args = for_cluster(args, cluster)
    args.validate(check_tracking=False)
    client_arguments = connection.client_arguments()
    _check_kfp_host(connection.host)
    client = kfp.Client(**client_arguments)
    run = client.create_run_from_pipeline_func(
        build_pipeline(cluster=cluster),
        arguments=args.pipeline_arguments(),
        run_name=run_name or f"flowgrpo-{args.preset}",
        experiment_name=kfp_experiment or f"flowgrpo-{args.preset}",
        namespace=connection.namespace,
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
