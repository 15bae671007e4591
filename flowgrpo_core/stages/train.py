"""train_grpo: the Flow-GRPO run, resumable after a retry from its own latest checkpoint."""

from __future__ import annotations

from pathlib import Path

from flowgrpo_core.stages.common import PipelineContext, build_training_reward, read_endpoints


def train_grpo(
    ctx: PipelineContext, model_dir: str | Path, endpoints_path: str | Path | None, policy_dir: str | Path
) -> dict:
    """Train and write the policy to ``policy_dir``. Checkpoints live in ``<workdir>/<run id>/train``, so a
    retried stage (same run id) resumes where the killed attempt stopped instead of starting over."""
    from flowgrpo_core.cluster.options import ClusterOptions

    cluster = ClusterOptions.from_env()  # None unless the pipeline was compiled for a cluster
    if cluster is not None and cluster.distributed_training:  # --nodes > 1: a PyTorchJob trains, we wait
        from flowgrpo_core.cluster.trainjob import train_on_pytorchjob

        return train_on_pytorchjob(ctx, cluster, model_dir, endpoints_path, policy_dir)
    if cluster is not None and cluster.gpus > 1:  # one node, several GPUs: one process per GPU
        from flowgrpo_core.cluster.trainjob import train_on_local_processes

        return train_on_local_processes(ctx, cluster.gpus, model_dir, endpoints_path, policy_dir)

    import tempfile
    import time

    import mlflow

    from flowgrpo_core.models import load_model
    from flowgrpo_core.sampling import to_pil
    from flowgrpo_core.tracking import image_grid, log_metrics, reward_curve
    from flowgrpo_core.trainer import FlowGRPOTrainer

    config = ctx.config()
    with ctx.stage("train_grpo"):
        mlflow.log_text(config.to_yaml(), "config.yaml")

        logging_s = 0.0

        def log_epoch(trainer: FlowGRPOTrainer, metrics: dict[str, float]) -> None:
            nonlocal logging_s
            started = time.perf_counter()
            log_metrics(metrics, step=int(metrics["epoch"]))
            logging_s += time.perf_counter() - started

        work_started = time.perf_counter()
        adapter = load_model(str(model_dir), dtype=config.model.component_dtypes())
        trainer = FlowGRPOTrainer(
            config, ctx.run_dir / "train", adapter=adapter, reward=build_training_reward(config, read_endpoints(endpoints_path)),
            callbacks=[log_epoch],
        )  # fmt: skip
        resumed = trainer.resume()
        mlflow.set_tag("train.resumed_from_epoch", str(trainer.epoch) if resumed else "none")
        if resumed:  # epochs the killed attempt trained but did not get to log
            logged = {
                m.step
                for m in mlflow.tracking.MlflowClient().get_metric_history(
                    mlflow.active_run().info.run_id, "reward/total"
                )
            }
            for metrics in trainer.history:
                if int(metrics["epoch"]) not in logged:
                    log_epoch(trainer, metrics)
        history = trainer.train()
        trainer.save_policy(policy_dir)
        log_metrics(
            {"stage/work_s": time.perf_counter() - work_started - logging_s}
        )  # per-epoch logging excluded
        mlflow.log_artifacts(str(policy_dir), "policy")
        with tempfile.TemporaryDirectory() as tmp:
            if history:
                mlflow.log_artifact(str(reward_curve(history, Path(tmp) / "reward_curve.png")))
        if trainer.last_samples is not None:
            images = to_pil(trainer.last_samples.images[:16])
            mlflow.log_image(
                image_grid([images[i : i + 8] for i in range(0, len(images), 8)]), "samples/last_epoch.png"
            )
        final = {
            k: v
            for k, v in (history[-1] if history else {}).items()
            if not k.startswith("train/ratio_mean/step_")
        }
        final["resumed"] = float(resumed)
        final["epochs"] = float(trainer.epoch)
    return final
