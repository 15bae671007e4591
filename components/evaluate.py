"""evaluate: base vs policy on held-out prompts, with a Markdown report."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(
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
    policy: Input[Model],
    endpoints: Input[Artifact],
    report: Output[Markdown],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
):
    """Base vs policy on held-out prompts with the same seeds: paired metrics per task, sample grids, a report with images."""

    import json
    import os
    import shutil

    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.evaluate import evaluate as run

    ctx = PipelineContext.from_arguments(locals())
    folder = os.path.join(os.path.dirname(evaluation.path), "evaluation_files")
    results = run(ctx, model.path, policy.path, endpoints.path, folder)
    shutil.copyfile(os.path.join(folder, "report.md"), report.path)
    with open(evaluation.path, "w") as f:
        json.dump(results, f, indent=1)
    for key, value in results.items():
        metrics.log_metric(key.replace("/", "."), float(value))
