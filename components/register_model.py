"""register_model: MLflow registered version, alias 'candidate', 'champion' through the gate."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def register_model(
    preset: str,
    overrides: list,
    model_source: str,
    model_revision: str,
    tracking_uri: str,
    experiment: str,
    workdir: str,
    run_id: str,
    kfp_run_id: str,
    family: str,
    policy: Input[Model],
    evaluation: Input[Artifact],
    registration: Output[Artifact],
) -> str:
    """Register the policy as an MLflow pyfunc version (alias candidate); champion moves only through the gate. Returns 'name/version'."""
    import json

    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.register import register_model as run

    ctx = PipelineContext.from_arguments(locals())
    with open(evaluation.path) as f:
        eval_metrics = json.load(f)
    result = run(ctx, policy.path, family, eval_metrics)
    with open(registration.path, "w") as f:
        json.dump(result, f, indent=1)
    registration.metadata.update(result)
    return f"{result['name']}/{result['version']}"
