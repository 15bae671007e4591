"""calibrate_rewards: the beta = 0 probe; fails the pipeline when a reward is broken."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def calibrate_rewards(
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
    calibration: Output[Artifact],
    metrics: Output[Metrics],
):
    """A short beta = 0 GRPO probe of every reward; fails the run when a reward is constant, non-finite or has no within-group signal."""

    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.calibrate import calibrate_rewards as run

    ctx = PipelineContext.from_arguments(locals())
    result = run(ctx, model.path, endpoints.path, calibration.path)
    for name, stats in result["rewards"].items():
        for key in ("mean", "std", "within_group_std", "zero_variance_share", "trend"):
            metrics.log_metric(f"{name}.{key}", float(stats[key]))
