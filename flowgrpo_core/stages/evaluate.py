"""evaluate: base vs policy on the held-out prompts, per metric and per task, with sample grids."""

from __future__ import annotations

import json
from pathlib import Path

from flowgrpo_core.stages.common import PipelineContext, build_metric, build_training_reward, read_endpoints


def evaluate(
    ctx: PipelineContext,
    model_dir: str | Path,
    policy_dir: str | Path,
    endpoints_path: str | Path | None,
    report_dir: str | Path,
) -> dict:
    """Writes ``report.md`` (table), ``samples.json`` (per-image scores) and grids to ``report_dir``."""
    import mlflow

    from flowgrpo_core.evaluation.compare import compare
    from flowgrpo_core.models import load_model
    from flowgrpo_core.policy import attach_policy
    from flowgrpo_core.prompts import load_prompts
    from flowgrpo_core.tracking import log_metrics, timed_work

    config = ctx.config()
    e, s = config.eval, config.sampling
    prompts = load_prompts(config.prompts.eval)
    prompts = prompts.take(list(range(min(e.num_prompts, len(prompts)))))
    endpoints = read_endpoints(endpoints_path)
    metrics = {"reward": build_training_reward(config, endpoints)} | {
        m: build_metric(m, endpoints) for m in e.metrics
    }
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ctx.stage("evaluate"):
        with timed_work():
            adapter = load_model(str(model_dir), dtype=config.model.component_dtypes())
            weights = attach_policy(adapter, policy_dir, ema=config.train.ema)
            result = compare(
                adapter,
                prompts,
                metrics,
                resolution=s.resolution,
                num_steps=e.num_steps,
                guidance_scale=e.guidance_scale,
                batch_size=e.batch_size,
                seed=e.seed,
                images_per_prompt=e.images_per_prompt,
                min_images_per_tag=e.min_images_per_tag,
                negative_prompt=s.negative_prompt,
                max_sequence_length=s.max_sequence_length,
                sde_type=s.sde_type,
            )
        mlflow.set_tag("eval.weights", "ema" if weights.name == "ema" else "final")
        header = f"# Evaluation: base vs policy\n\n{len(result.rows)} images, {e.num_steps} ODE steps, CFG {e.guidance_scale}, seed {e.seed}\n\n"
        (out / "report.md").write_text(header + result.table)
        (out / "samples.json").write_text(json.dumps(result.rows, indent=1))
        for name, text in result.summaries.items():
            (out / f"summary_{name.replace('/', '_')}.txt").write_text(text)
            mlflow.log_text(text, f"summary_{name.replace('/', '_')}.txt")
        for tag, grid in result.grids.items():
            grid.save(out / f"grid_{tag}.png")
            mlflow.log_image(grid, f"samples/eval_{tag}.png")
        log_metrics(result.metrics)
        mlflow.log_artifact(str(out / "report.md"))
        mlflow.log_artifact(str(out / "samples.json"))
    return result.metrics
