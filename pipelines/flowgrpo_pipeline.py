"""The Flow-GRPO DAG (DESIGN.md): wiring only.

    download_model -> launch_reward_servers -> calibrate_rewards -> train_grpo -> evaluate -> register_model

inside an exit handler that always stops the reward servers. The same function runs under kfp.local and
compiles for a cluster (``python -m pipelines.flowgrpo_pipeline out.yaml``).
"""

from dataclasses import dataclass

from kfp import dsl

from components import (
    calibrate_rewards,
    download_model,
    evaluate,
    launch_reward_servers,
    register_model,
    stop_reward_servers,
    train_grpo,
)
from flowgrpo_core.tracking import DEFAULT_TRACKING_URI

# Training runs for hours: KFP's default retry window (3600 s) would forbid a late retry.
TRAIN_RETRY = {
    "num_retries": 2,
    "backoff_duration": "60s",
    "backoff_factor": 2.0,
    "backoff_max_duration": "86400s",
}


@dataclass(frozen=True)
class StageResources:
    cpu: str
    memory: str
    gpu: bool = False


RESOURCES = {
    "download-model": StageResources("1", "4G"),
    "launch-reward-servers": StageResources("1", "2G"),
    "calibrate-rewards": StageResources("2", "16G", gpu=True),
    "train-grpo": StageResources("4", "32G", gpu=True),
    "evaluate": StageResources("2", "16G", gpu=True),
    "register-model": StageResources("1", "2G"),
    "stop-reward-servers": StageResources("1", "1G"),
}


def _configure(task: dsl.PipelineTask, name: str, gpus: int) -> dsl.PipelineTask:
    spec = RESOURCES[name]
    task.set_display_name(name).set_caching_options(False)  # every stage has side effects (MLflow, servers)
    task.set_cpu_request(spec.cpu).set_memory_request(spec.memory)
    if spec.gpu and gpus > 0:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    return task


def build_pipeline(gpus: int = 0):
    """The pipeline function; ``gpus`` > 0 requests that many GPUs for the model-running stages."""

    @dsl.pipeline(
        name="flowgrpo",
        description="Flow-GRPO: online RL for flow-matching text-to-image models, tracked in MLflow",
    )
    def flowgrpo(
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006 (KFP reads the default from the signature)
        model_source: str = "",
        model_revision: str = "",
        tracking_uri: str = DEFAULT_TRACKING_URI,
        experiment: str = "",
        workdir: str = "flowgrpo-runs/work",
    ):
        common = dict(
            preset=preset, overrides=overrides, model_source=model_source, model_revision=model_revision,
            tracking_uri=tracking_uri, experiment=experiment, workdir=workdir, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )  # fmt: skip
        stop = _configure(stop_reward_servers(**common), "stop-reward-servers", gpus)
        with dsl.ExitHandler(stop, name="stop-reward-servers-on-exit"):
            model = _configure(download_model(**common), "download-model", gpus)
            servers = _configure(launch_reward_servers(**common), "launch-reward-servers", gpus).after(model)
            calibration = _configure(
                calibrate_rewards(**common, model=model.outputs["model"], endpoints=servers.outputs["endpoints"]),
                "calibrate-rewards", gpus,
            )  # fmt: skip
            train = _configure(
                train_grpo(**common, model=model.outputs["model"], endpoints=servers.outputs["endpoints"],
                           calibration=calibration.outputs["calibration"]),
                "train-grpo", gpus,
            ).set_retry(**TRAIN_RETRY)  # fmt: skip
            evaluation = _configure(
                evaluate(**common, model=model.outputs["model"], policy=train.outputs["policy"], endpoints=servers.outputs["endpoints"]),
                "evaluate", gpus,
            )  # fmt: skip
            _configure(
                register_model(**common, family=model.outputs["Output"], policy=train.outputs["policy"],
                               evaluation=evaluation.outputs["evaluation"]),
                "register-model", gpus,
            )  # fmt: skip

    return flowgrpo


flowgrpo_pipeline = build_pipeline()


if __name__ == "__main__":
    import sys

    from kfp import compiler

    compiler.Compiler().compile(flowgrpo_pipeline, sys.argv[1] if len(sys.argv) > 1 else "flowgrpo.yaml")
