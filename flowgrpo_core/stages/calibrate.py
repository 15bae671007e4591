"""calibrate_rewards: a short beta = 0 probe that fails the pipeline when a reward is broken."""

from __future__ import annotations

import json
from pathlib import Path

from flowgrpo_core.stages.common import PipelineContext, build_training_reward, read_endpoints


def calibrate_rewards(
    ctx: PipelineContext, model_dir: str | Path, endpoints_path: str | Path | None, out_json: str | Path
) -> dict:
    """Run the probe, log its statistics and calibration.json, then raise CalibrationError naming every
    broken reward (after logging, so the evidence is in MLflow)."""
    import mlflow

    from flowgrpo_core.calibration import check, run_probe, to_json
    from flowgrpo_core.models import load_model
    from flowgrpo_core.tracking import log_metrics, timed_work

    config = ctx.config()
    with ctx.stage("calibrate_rewards"):
        with timed_work():
            adapter = load_model(str(model_dir), dtype=config.model.component_dtypes())
            reward = build_training_reward(config, read_endpoints(endpoints_path))
            reports, history = run_probe(config, ctx.run_dir / "calibration", adapter=adapter, reward=reward)
        result = to_json(reports)
        for epoch, metrics in enumerate(history):
            log_metrics(
                {f"calibration/{k}": v for k, v in metrics.items() if k.startswith("reward/")}, step=epoch
            )
        for report in reports:
            log_metrics(
                {
                    f"calibration/{report.name}/mean": report.mean,
                    f"calibration/{report.name}/std": report.std,
                    f"calibration/{report.name}/within_group_std": report.within_group_std,
                    f"calibration/{report.name}/zero_variance_share": report.zero_variance_share,
                    f"calibration/{report.name}/trend": report.trend,
                    f"calibration/{report.name}/nonfinite": report.nonfinite,
                }
            )
        Path(out_json).write_text(json.dumps(result, indent=1))
        mlflow.log_dict(result, "calibration.json")
        mlflow.set_tag("calibration.ok", str(result["ok"]).lower())
        check(reports)
    return result
