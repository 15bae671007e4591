"""launch_reward_servers and its exit handler stop_reward_servers."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def launch_reward_servers(
    preset: str,
    overrides: list,
    model_source: str,
    model_revision: str,
    tracking_uri: str,
    experiment: str,
    workdir: str,
    run_id: str,
    kfp_run_id: str,
    endpoints: Output[Artifact],
):
    """Start one reward server per reward; writes {name: {url, weight}} JSON."""
    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.servers import launch_reward_servers as run

    ctx = PipelineContext.from_arguments(locals())
    result = run(ctx, endpoints.path)
    endpoints.metadata["rewards"] = sorted(result)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def stop_reward_servers(
    preset: str,
    overrides: list,
    model_source: str,
    model_revision: str,
    tracking_uri: str,
    experiment: str,
    workdir: str,
    run_id: str,
    kfp_run_id: str,
):
    """Exit handler: always stop this run's reward servers (and close a failed run's MLflow parent)."""
    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.servers import stop_reward_servers as run

    ctx = PipelineContext.from_arguments(locals())
    print("stopped reward servers:", run(ctx))
