"""register_model: an MLflow pyfunc version (base reference + adapter + config), 'candidate' always,
'champion' through the gate. Idempotent per pipeline run."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from flowgrpo_core.stages.common import PipelineContext


def register_model(
    ctx: PipelineContext, policy_dir: str | Path, family: str, eval_metrics: dict[str, float]
) -> dict:
    import mlflow

    from flowgrpo_core.policy import read_heldout
    from flowgrpo_core.registry import register_policy
    from flowgrpo_core.tracking import finish_parent, log_to_parent

    config = ctx.config()
    name = config.tracking.registered_model or f"flowgrpo-{family}"
    tags = {"flowgrpo.preset": ctx.preset}
    heldout = read_heldout(policy_dir)
    if heldout is not None:  # keep-best or stop-on-hacking may have exported an earlier epoch than the last
        tags["train.exported_epoch"] = str(heldout["exported_epoch"])
    with ctx.stage("register_model"):
        result = register_policy(
            policy_dir,
            config.model.source,
            config.model.revision,
            name,
            eval_metrics,
            config.tracking.gate_metric,
            config.tracking.gate_margin,
            ctx.identity,
            extra_tags=tags,
            gate_standard_errors=config.tracking.gate_standard_errors,
        )
        mlflow.set_tags(
            {
                "registry.model": name,
                "registry.version": result.version,
                "gate.passed": str(result.gate_passed).lower(),
                "gate.reason": result.gate_reason[:500],
            }
        )
        mlflow.log_text(result.gate_reason, "gate.txt")
        log_to_parent(
            {"gate/passed": float(result.gate_passed)},
            {
                "registry.model": name,
                "registry.version": result.version,
                "gate.passed": str(result.gate_passed).lower(),
            },
        )
    finish_parent(ctx.tracking_uri, ctx.experiment_name, ctx.identity)
    return asdict(result)
