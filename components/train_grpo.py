"""train_grpo: Flow-GRPO training, resumable after a retry."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train_grpo(
    preset: str,
    overrides: list,
    model_source: str,
    model_revision: str,
    tracking_uri: str,
    experiment: str,
    workdir: str,
    run_id: str,
    kfp_run_id: str,
    model: Input[Model],
    endpoints: Input[Artifact],
    calibration: Input[Artifact],
    policy: Output[Model],
    metrics: Output[Metrics],
):
    """Flow-GRPO training of the policy, resumable from its checkpoints after a retry; per-epoch metrics in MLflow."""

    import json

    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.train import train_grpo as run

    with open(calibration.path) as f:
        calibrated = json.load(f).get("ok")
    if not calibrated:
        raise RuntimeError(f"calibration {calibration.path} did not pass; refusing to train")
    ctx = PipelineContext.from_arguments(locals())
    final = run(ctx, model.path, endpoints.path, policy.path)
    policy.metadata.update({"epochs": int(final["epochs"]), "resumed": bool(final["resumed"])})
    if "exported_epoch" in final:  # evaluated during training: keep-best or stop-on-hacking chose the epoch
        policy.metadata.update({"exported_epoch": int(final["exported_epoch"]), "plot": "proxy_vs_gold.png"})
    for key, value in final.items():
        metrics.log_metric(key.replace("/", "."), float(value))
