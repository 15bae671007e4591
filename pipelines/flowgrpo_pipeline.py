"""The Flow-GRPO DAG (docs/architecture.md): wiring only.

    download_model -> launch_reward_servers -> calibrate_rewards -> train_grpo -> evaluate -> register_model

inside an exit handler that always stops the reward servers. The same function runs under kfp.local and
compiles for a cluster (``python -m pipelines.flowgrpo_pipeline out.yaml``); for a cluster, ``ClusterOptions``
add GPUs, placement, the shared volume, secrets and the image to every task (kfp-kubernetes).
"""

import dataclasses
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
from components.images import TRAINER_IMAGE
from flowgrpo_core.cluster.options import CLUSTER_ENV, ClusterOptions
from flowgrpo_core.stages.common import (
    PARAMETER_DESCRIPTIONS,
    PIPELINE_ARGUMENTS,
    PIPELINE_PARAMETERS,
    PipelineContext,
)

# the pipeline's parameters and their defaults are PipelineContext's (KFP reads them from the signature)
DEFAULTS = PipelineContext()

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
# the training step of a multi-node run only launches and awaits a PyTorchJob (and copies the policy)
TRAIN_LAUNCHER = StageResources("1", "4G")


def _configure(
    task: dsl.PipelineTask, name: str, gpus: int, cluster: ClusterOptions | None
) -> dsl.PipelineTask:
    spec = RESOURCES[name]
    if name == "train-grpo" and cluster is not None and cluster.distributed_training:
        spec = TRAIN_LAUNCHER
    task.set_display_name(name).set_caching_options(False)  # every stage has side effects (MLflow, servers)
    task.set_cpu_request(spec.cpu).set_memory_request(spec.memory)
    accelerator = cluster.accelerator if cluster is not None else "nvidia.com/gpu"
    if spec.gpu and gpus > 0:
        task.set_accelerator_type(accelerator).set_accelerator_limit(gpus)
    if cluster is not None:
        _place(task, cluster, gpu_node=spec.gpu)
    return task


def _place(task: dsl.PipelineTask, cluster: ClusterOptions, gpu_node: bool) -> None:
    """Volume, secrets, image and (for model-running stages) GPU node placement, from ``cluster``."""
    from kfp import kubernetes

    task.set_container_image(cluster.trainer_image)
    if cluster.pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.pvc, mount_path=cluster.mount_path)
    for binding in cluster.secret_bindings():
        kubernetes.use_secret_as_env(
            task, binding.secret, {binding.key: binding.env}, optional=binding.optional
        )
    if gpu_node:
        for key, value in cluster.node_selector:
            kubernetes.add_node_selector(task, key, value)
        for toleration in cluster.tolerations:
            kubernetes.add_toleration(task, **toleration.to_k8s())
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    for key, value in cluster.pod_labels:
        kubernetes.add_pod_label(task, key, value)
    for key, value in cluster.cache_env().items():
        task.set_env_variable(key, value)
    # the objects the steps create themselves (reward Deployments, the PyTorchJob) need the same options
    task.set_env_variable(CLUSTER_ENV, cluster.to_json())


def build_pipeline(gpus: int = 0, cluster: ClusterOptions | None = None):
    """The pipeline function; ``gpus`` > 0 requests that many GPUs for the model-running stages. With
    ``cluster`` (compile/submit for Kubernetes) its options apply, ``gpus`` included; without it the
    pipeline is the local one (``flowgrpo run``)."""
    if cluster is not None:
        if gpus and gpus != cluster.gpus:
            raise ValueError(f"gpus={gpus} disagrees with cluster.gpus={cluster.gpus}")
        gpus = cluster.gpus
        cluster = dataclasses.replace(cluster, trainer_image=cluster.trainer_image or TRAINER_IMAGE)

    def flowgrpo(
        preset: str = DEFAULTS.preset,
        overrides: list = DEFAULTS.overrides,
        model_source: str = DEFAULTS.model_source,
        model_revision: str = DEFAULTS.model_revision,
        tracking_uri: str = DEFAULTS.tracking_uri,
        experiment: str = DEFAULTS.experiment,
        workdir: str = DEFAULTS.workdir,
        run_id: str = DEFAULTS.run_id,
    ):
        # every component takes every pipeline parameter (PipelineContext), the run id from KFP
        arguments = {**locals(), "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        common = {name: arguments[name] for name in PIPELINE_PARAMETERS}
        stop = _configure(stop_reward_servers(**common), "stop-reward-servers", gpus, cluster)
        with dsl.ExitHandler(stop, name="stop-reward-servers-on-exit"):
            model = _configure(download_model(**common), "download-model", gpus, cluster)
            servers = _configure(
                launch_reward_servers(**common), "launch-reward-servers", gpus, cluster
            ).after(model)
            calibration = _configure(
                calibrate_rewards(
                    **common, model=model.outputs["model"], endpoints=servers.outputs["endpoints"]
                ),
                "calibrate-rewards",
                gpus,
                cluster,
            )
            train = _configure(
                train_grpo(
                    **common,
                    model=model.outputs["model"],
                    endpoints=servers.outputs["endpoints"],
                    calibration=calibration.outputs["calibration"],
                ),
                "train-grpo",
                gpus,
                cluster,
            ).set_retry(**TRAIN_RETRY)
            evaluation = _configure(
                evaluate(
                    **common,
                    model=model.outputs["model"],
                    policy=train.outputs["policy"],
                    endpoints=servers.outputs["endpoints"],
                ),
                "evaluate",
                gpus,
                cluster,
            )
            _configure(
                register_model(
                    **common,
                    family=model.outputs["Output"],
                    policy=train.outputs["policy"],
                    evaluation=evaluation.outputs["evaluation"],
                ),
                "register-model",
                gpus,
                cluster,
            )

    flowgrpo.__doc__ = pipeline_docstring()
    return dsl.pipeline(name="flowgrpo")(flowgrpo)


def pipeline_docstring() -> str:
    """The pipeline's description (its steps, from each component's docstring) and its parameters', in the
    docstring form KFP reads into the compiled YAML."""
    from components import STAGES

    steps = "; ".join(f"{c.name}: {c.component_spec.description.splitlines()[0].rstrip('.')}" for c in STAGES)
    arguments = "\n".join(f"    {name}: {PARAMETER_DESCRIPTIONS[name]}" for name in PIPELINE_ARGUMENTS)
    return (
        "Flow-GRPO: online RL for flow-matching text-to-image models, every run and model tracked in MLflow. "
        f"Steps: {steps}.\n\nArgs:\n{arguments}\n"
    )


flowgrpo_pipeline = build_pipeline()


if __name__ == "__main__":
    import sys

    from kfp import compiler

    output = sys.argv[1] if len(sys.argv) > 1 else "flowgrpo.yaml"
    compiler.Compiler().compile(build_pipeline(cluster=ClusterOptions()), output)
