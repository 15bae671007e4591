"""launch_reward_servers / stop_reward_servers: one HTTP server per reward (a local process, or a Deployment +
Service on a cluster), stopped by the exit handler."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flowgrpo_core.stages.common import PipelineContext

# Set by ``flowgrpo run`` to its own pid: local reward servers watch that process and stop when it dies.
OWNER_PID_ENV = "FLOWGRPO_OWNER_PID"


def reward_names(config) -> list[str]:
    """Training rewards, then extra evaluation metrics, without duplicates."""
    return list(dict.fromkeys([*config.rewards, *config.eval.metrics]))


def servers_dir(ctx: PipelineContext) -> Path:
    return ctx.run_dir / "reward-servers"


def launch_reward_servers(ctx: PipelineContext, endpoints_path: str | Path) -> dict[str, dict]:
    """Start the servers and write ``{name: {"url", "weight"}}``; with serving.mode 'inline' the URLs are
    empty and every reward is computed in the trainer's process."""
    import mlflow

    from flowgrpo_core.cluster.options import ClusterOptions
    from flowgrpo_core.cluster.reward_servers import serving_backend
    from flowgrpo_core.serving.manager import LocalRewardServers
    from flowgrpo_core.tracking import timed_work

    config = ctx.config()
    names = reward_names(config)
    cluster = ClusterOptions.from_env()  # None unless the pipeline was compiled for a cluster
    backend = serving_backend(config.serving.mode, cluster)
    with ctx.stage("launch_reward_servers"):
        urls: dict[str, str] = {}
        if backend == "process":
            with timed_work():
                servers = LocalRewardServers(
                    {name: config.serving.server_args.get(name, []) for name in names},
                    servers_dir(ctx),
                    host=config.serving.host,
                    startup_timeout_s=config.serving.startup_timeout_s,
                    watch_pid=int(os.environ[OWNER_PID_ENV]) if os.environ.get(OWNER_PID_ENV) else None,
                )
                urls = servers.start()
        elif backend == "kubernetes":  # a Deployment + Service per reward (flowgrpo_core/cluster)
            from flowgrpo_core.cluster import reward_servers

            with timed_work():
                urls = reward_servers.launch(ctx.identity, names, config.serving, cluster)
        endpoints = {
            name: {"url": urls.get(name, ""), "weight": float(config.rewards.get(name, 0.0))}
            for name in names
        }
        Path(endpoints_path).write_text(json.dumps(endpoints, indent=1))
        mlflow.log_dict(endpoints, "endpoints.json")
        mlflow.log_param("serving.servers", ",".join(urls) or "inline")
        mlflow.log_param("serving.backend", backend)
    return endpoints


def stop_reward_servers(ctx: PipelineContext) -> list[str]:
    """Exit handler: stop this run's servers, and mark the parent MLflow run FAILED if the pipeline never
    reached registration (the register stage marks it FINISHED)."""
    from flowgrpo_core.cluster.options import ClusterOptions
    from flowgrpo_core.serving.manager import stop_servers
    from flowgrpo_core.tracking import configure, ensure_experiment, find_runs

    stopped = stop_servers(servers_dir(ctx)) if servers_dir(ctx).is_dir() else []
    try:
        cluster = ClusterOptions.from_env()
        mode, namespace = _serving_mode_and_namespace(ctx)
        # on a cluster the run may own reward Deployments and a PyTorchJob whatever the serving mode:
        # delete everything labelled with the run (costly GPUs must not outlive a failed or cancelled run)
        if cluster is not None or mode == "kubernetes":
            from flowgrpo_core.cluster import reward_servers

            stopped += reward_servers.stop(ctx.identity, namespace)
    finally:
        configure(ctx.tracking_uri)
        from mlflow.tracking import MlflowClient

        experiment_id = ensure_experiment(ctx.experiment_name, ctx.tracking_uri)
        for run in find_runs(experiment_id, **{"kfp.run_id": ctx.identity, "flowgrpo.role": "pipeline"}):
            if run.info.status == "RUNNING":
                MlflowClient().set_terminated(run.info.run_id, status="FAILED")
    return stopped


def _serving_mode_and_namespace(ctx: PipelineContext) -> tuple[str, str]:
    """The config's serving mode and namespace; an invalid config created nothing to stop remotely, but
    the exit handler must still clean up whatever a cluster run may own, so fall back to the defaults."""
    from flowgrpo_core.config import ConfigError

    try:
        serving = ctx.config().serving
    except ConfigError:
        return "process", ""
    return serving.mode, serving.namespace
