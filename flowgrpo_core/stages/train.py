"""train_grpo: the Flow-GRPO run, resumable after a retry from its own latest checkpoint.

The stage trains in its own process, or launches processes that train and collects what they wrote:
``torchrun`` with one process per GPU (``--gpus N``), or a PyTorchJob of ``--nodes M`` pods
(``flowgrpo_core.cluster.trainjob``). Every launcher ends in :func:`_finish`, so every run logs the same
tags, metrics, reward curve and sample grid whichever way it trained.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from flowgrpo_core.stages.common import (
    PipelineContext,
    build_gold_metrics,
    build_training_reward,
    read_endpoints,
)

# the last epoch's images, written by the training process beside its checkpoints
LAST_GRID = "last_epoch.png"


def train_grpo(
    ctx: PipelineContext, model_dir: str | Path, endpoints_path: str | Path | None, policy_dir: str | Path
) -> dict:
    """Train and write the policy to ``policy_dir``. Checkpoints live in ``<workdir>/<run id>/train``, so a
    retried stage (same run id) resumes where the killed attempt stopped instead of starting over."""
    from flowgrpo_core.cluster.options import ClusterOptions

    cluster = ClusterOptions.from_env()  # None unless the pipeline was compiled for a cluster
    if cluster is not None and cluster.distributed_training:  # --nodes > 1: a PyTorchJob trains, we wait
        return train_on_pytorchjob(ctx, cluster, model_dir, endpoints_path, policy_dir)
    if cluster is not None and cluster.gpus > 1:  # one node, several GPUs: one process per GPU
        return train_on_local_processes(ctx, cluster.gpus, model_dir, endpoints_path, policy_dir)
    return train_in_process(ctx, model_dir, endpoints_path, policy_dir)


def train_in_process(
    ctx: PipelineContext, model_dir: str | Path, endpoints_path: str | Path | None, policy_dir: str | Path
) -> dict:
    import mlflow

    from flowgrpo_core.models import load_model
    from flowgrpo_core.tracking import log_metrics
    from flowgrpo_core.trainer import FlowGRPOTrainer

    config = ctx.config()
    with ctx.stage("train_grpo"):
        mlflow.log_text(config.to_yaml(), "config.yaml")
        logging_s, evaluated = 0.0, _logged_evaluations()  # a retried stage logged some already
        every = sample_interval(config.train.epochs)

        def log_epoch(trainer: FlowGRPOTrainer, metrics: dict[str, float]) -> None:
            nonlocal logging_s
            started = time.perf_counter()
            epoch = int(metrics["epoch"])
            log_metrics(metrics, step=epoch)
            _log_evaluations(trainer.watch.records, evaluated)  # as they happen, not only at the end
            if trainer.last_samples is not None and (
                epoch % every == 0 or trainer.epoch == config.train.epochs
            ):
                _log_samples(trainer, epoch)
            logging_s += time.perf_counter() - started

        work_started = time.perf_counter()
        out = ctx.run_dir / "train"
        adapter = load_model(str(model_dir), dtype=config.model.component_dtypes())
        endpoints = read_endpoints(endpoints_path)
        reward = build_training_reward(config, endpoints)
        gold = build_gold_metrics(config, endpoints) if config.eval.every_epochs else None
        trainer = FlowGRPOTrainer(
            config, out, adapter=adapter, reward=reward, callbacks=[log_epoch], gold=gold
        )
        resumed_from = trainer.epoch if trainer.resume() else None
        trainer.train()
        trainer.save_policy(policy_dir)  # straight into the stage's output: full weights can be large
        trainer.close()
        mlflow.set_tag("train.launcher", "in-process")
        work_s = time.perf_counter() - work_started - logging_s
        return _finish(ctx, out, Path(policy_dir), policy_dir, resumed_from, work_s)


# sample grids logged per run of in-process training: about this many, evenly over the epochs, each with
# this many prompts' groups
SAMPLE_GRIDS, SAMPLE_ROWS = 20, 4


def sample_interval(epochs: int) -> int:
    """Log the sample grid every this many epochs (and after the last), about :data:`SAMPLE_GRIDS` per run."""
    return max(1, -(-epochs // SAMPLE_GRIDS))


def _log_samples(trainer, epoch: int) -> None:
    """The epoch's images, one captioned row per prompt, as MLflow image ``samples`` at step ``epoch``
    (the UI's image slider steps through the epochs)."""
    import mlflow

    from flowgrpo_core.sampling import to_pil
    from flowgrpo_core.tracking import captioned_samples

    # in-process training is one process: its roll-outs are the epoch's, in the order of its prompts, each
    # prompt's group together; only the first groups are drawn (an SD3.5 epoch holds 1152 images of 512 px)
    shown = SAMPLE_ROWS * trainer.config.sampling.group_size
    images = to_pil(trainer.last_samples.images[:shown])
    grid = captioned_samples(images, trainer.last_prompts[:shown], rows=SAMPLE_ROWS)
    mlflow.log_image(grid, key="samples", step=epoch)


def train_on_local_processes(
    ctx: PipelineContext,
    processes: int,
    model_dir: str | Path,
    endpoints_path: str | Path | None,
    policy_dir: str | Path,
) -> dict:
    """``--gpus N`` on one node: ``torchrun --standalone`` with one process per GPU, each running
    ``flowgrpo train`` (they write checkpoints, so a retried step resumes)."""
    import subprocess
    import sys

    import mlflow

    from flowgrpo_core.train_command import train_arguments

    config = ctx.config()
    with ctx.stage("train_grpo"):
        mlflow.log_text(config.to_yaml(), "config.yaml")
        started = time.perf_counter()
        out, overrides, endpoints_file, resumed_from = _prepare(
            ctx, model_dir, endpoints_path, shared_base=None
        )
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            *train_arguments(ctx.preset, overrides, str(out), endpoints_file),
        ]
        mlflow.set_tags({"train.launcher": "torchrun", "train.procs_per_node": str(processes)})
        result = subprocess.run(command)
        if result.returncode:
            raise RuntimeError(
                f"training processes failed (exit code {result.returncode}): {' '.join(command)}"
            )
        return _finish(ctx, out, out / "policy", policy_dir, resumed_from, time.perf_counter() - started)


def train_on_pytorchjob(
    ctx: PipelineContext,
    cluster,
    model_dir: str | Path,
    endpoints_path: str | Path | None,
    policy_dir: str | Path,
    kube=None,
) -> dict:
    """The training stage when ``cluster.nodes > 1``: the nodes run ``cluster.trainer_image`` (the image of
    the pipeline's own steps) as a PyTorchJob; the stage waits for it and collects its policy."""
    import mlflow

    from flowgrpo_core.cluster.kube import connect
    from flowgrpo_core.cluster.options import CLUSTER_ENV
    from flowgrpo_core.cluster.trainjob import POLL_S, render_pytorchjob, run_job
    from flowgrpo_core.train_command import check_command, torchrun_command

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
        started = time.perf_counter()
        out, overrides, endpoints_file, resumed_from = _prepare(
            ctx, model_dir, endpoints_path, shared_base=run_dir / "base-model"
        )
        command = torchrun_command(
            cluster.nodes, max(cluster.gpus, 1), ctx.preset, overrides, str(out), endpoints_file
        )
        check_command(command)
        kube = kube or connect()  # the PVC and secrets live in the pipeline's own namespace
        job = render_pytorchjob(ctx.identity, kube.namespace, cluster, cluster.trainer_image, command)
        mlflow.set_tags(
            {
                "train.launcher": "pytorchjob",
                "train.pytorchjob": job["metadata"]["name"],
                "train.nodes": str(cluster.nodes),
                "train.procs_per_node": str(max(cluster.gpus, 1)),
            }
        )
        run_job(kube, job, poll_s=POLL_S)
        return _finish(ctx, out, out / "policy", policy_dir, resumed_from, time.perf_counter() - started)


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
    ctx: PipelineContext, model_dir, endpoints_path, shared_base: Path | None
) -> tuple[Path, list[str], str | None, int | None]:
    """The run's training folder, the processes' overrides (pointing at the base model), the endpoints file
    they read, and the epoch a checkpoint resumes from (None: a fresh start). Fails on a bad config before
    any process starts."""
    from flowgrpo_core.checkpoint import checkpoint_epoch, latest_intact_checkpoint
    from flowgrpo_core.config import load_config

    out = ctx.run_dir / "train"
    out.mkdir(parents=True, exist_ok=True)
    base = share_model(model_dir, shared_base) if shared_base is not None else Path(model_dir)
    overrides = [*ctx.overrides, f"model.source={json.dumps(str(base))}"]
    load_config(ctx.preset, overrides=overrides)
    endpoints_file = None
    if read_endpoints(endpoints_path):
        endpoints_file = str(out / "endpoints.json")
        shutil.copyfile(endpoints_path, endpoints_file)
    latest = latest_intact_checkpoint(
        out / "checkpoints"
    )  # where the trainer will resume (it skips corrupt ones)
    return out, overrides, endpoints_file, checkpoint_epoch(latest) if latest is not None else None


def _finish(
    ctx: PipelineContext,
    out: Path,
    policy: Path,
    policy_dir: str | Path,
    resumed_from: int | None,
    work_s: float,
) -> dict:
    """Inside the stage's MLflow run, whichever process trained: copy the policy the processes wrote
    (``policy``) into the stage's output unless it is there already, log the epochs not logged yet (a retried
    step, or processes that do not log), the evaluations during training with the monitor's and keep-best's
    tags and the proxy-vs-gold plot, the reward curve and the last epoch's images (``out``); return the
    final metrics."""
    import tempfile

    import mlflow
    import yaml

    from flowgrpo_core.policy import PROXY_GOLD_PLOT, read_heldout
    from flowgrpo_core.prompts import load_prompts
    from flowgrpo_core.tracking import log_metrics, log_prompt_set, log_to_parent, reward_curve

    history = json.loads((policy / "metrics.json").read_text())
    # the objective as a param of this run too (the whole config is the download stage's params), so the
    # UI compares Flow-GRPO and DiffusionNFT training runs side by side
    trained = yaml.safe_load((policy / "config.yaml").read_text())
    mlflow.log_param("train.algorithm", trained["train"]["algorithm"])
    if Path(policy_dir).resolve() != policy.resolve():
        shutil.copytree(policy, policy_dir, dirs_exist_ok=True)
    run_id = mlflow.active_run().info.run_id
    logged = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "reward/total")}
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            log_metrics(metrics, step=int(metrics["epoch"]))
    log_metrics({"stage/work_s": work_s})
    spec = ctx.config().prompts.train
    log_prompt_set(load_prompts(spec), spec, "training")  # lineage: what the policy was trained on
    mlflow.log_artifacts(str(policy_dir), "policy")
    with tempfile.TemporaryDirectory() as tmp:
        if history:
            mlflow.log_artifact(str(reward_curve(history, Path(tmp) / "reward_curve.png")))
    if (out / LAST_GRID).is_file():
        mlflow.log_artifact(str(out / LAST_GRID), "samples")
    mlflow.set_tag("train.resumed_from_epoch", str(resumed_from) if resumed_from is not None else "none")
    heldout = read_heldout(policy_dir)
    if heldout is not None:
        _log_evaluations(heldout["records"], _logged_evaluations())
        mlflow.set_tags(_heldout_tags(heldout))
        if (Path(policy_dir) / PROXY_GOLD_PLOT).is_file():
            mlflow.log_artifact(str(Path(policy_dir) / PROXY_GOLD_PLOT))
    final = {
        k: v
        for k, v in (history[-1] if history else {}).items()
        if not k.startswith("train/ratio_mean/step_")
    }
    if heldout is not None:
        final["exported_epoch"] = float(heldout["exported_epoch"])
    final["resumed"] = float(resumed_from is not None)
    final["epochs"] = float(int(history[-1]["epoch"]) + 1 if history else 0)
    log_to_parent(
        {
            "train/final_reward": final.get("reward/total", math.nan),
            "train/final_kl": final.get("train/kl", math.nan),
            "train/epochs": final["epochs"],
        }
    )
    return final


def _logged_evaluations() -> set[int]:
    """Steps (epochs trained) of the held-out evaluations the active run has logged."""
    import mlflow

    from flowgrpo_core.heldout import PREFIX, PROXY

    history = mlflow.tracking.MlflowClient().get_metric_history(
        mlflow.active_run().info.run_id, f"{PREFIX}/{PROXY}_mean"
    )
    return {m.step for m in history}


def _log_evaluations(records: list[dict[str, float]], logged: set[int]) -> None:
    """Log the held-out evaluations not in ``logged`` (steps), each with step = epochs trained, and add
    them to ``logged``."""
    from flowgrpo_core.tracking import log_metrics

    for record in records:
        step = int(record["epoch"])
        if step not in logged:
            log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=step)
            logged.add(step)


def _heldout_tags(heldout: dict) -> dict[str, str]:
    """Which epoch the policy is and why, the keep-best epoch, and the monitor's verdict."""
    from flowgrpo_core.monitoring import Alarm

    alarms = [Alarm(**a) for a in heldout["alarms"]]
    tags = {
        "train.exported_epoch": str(heldout["exported_epoch"]),
        "train.exported_because": heldout["exported_because"],
        "monitor.hacking": "; ".join(a.describe() for a in alarms)[:5000] if alarms else "none",
        "train.stopped_on_hacking": str(heldout["stopped_at"]) if heldout["stopped_at"] is not None else "no",
    }
    if heldout["keep_best"] is not None:
        tags["train.best_epoch"] = str(heldout["best_epoch"])
    return tags
