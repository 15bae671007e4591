"""evaluate: base vs policy on the held-out prompts, per metric and per task, with sample grids."""

from __future__ import annotations

import json
from pathlib import Path

from flowgrpo_core.stages.common import (
    PipelineContext,
    build_gold_metrics,
    build_training_reward,
    read_endpoints,
)


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
    from flowgrpo_core.heldout import PROXY, evaluation_prompts, sampling_settings
    from flowgrpo_core.models import load_model
    from flowgrpo_core.policy import PROXY_GOLD_PLOT, attach_policy, read_heldout
    from flowgrpo_core.tracking import (
        evaluation_headline,
        log_metrics,
        log_prompt_set,
        log_to_parent,
        timed_work,
    )

    config = ctx.config()
    e = config.eval
    prompts = evaluation_prompts(config, e.num_prompts)
    endpoints = read_endpoints(endpoints_path)
    metrics = {PROXY: build_training_reward(config, endpoints)} | build_gold_metrics(config, endpoints)
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
                seed=e.seed,
                images_per_prompt=e.images_per_prompt,
                min_images_per_tag=e.min_images_per_tag,
                **sampling_settings(config),
            )
        log_prompt_set(prompts, config.prompts.eval, "evaluation")
        mlflow.set_tag("eval.weights", "ema" if weights.name == "ema" else "final")
        heldout = read_heldout(policy_dir)
        # the policy may be an earlier epoch than the last (keep-best, stop-on-hacking)
        if heldout is not None:
            mlflow.set_tag("eval.policy_epoch", str(heldout["exported_epoch"]))
        header = f"# Evaluation: base vs policy\n\n{len(result.rows)} images, {e.num_steps} ODE steps, CFG {e.guidance_scale}, seed {e.seed}\n\n"
        during = proxy_gold_section(heldout, Path(policy_dir), out) if heldout is not None else ""
        (out / "report.md").write_text(header + result.table + samples_section(result.grids) + during)
        (out / "samples.json").write_text(json.dumps(result.rows, indent=1))
        for name, text in result.summaries.items():
            (out / f"summary_{name.replace('/', '_')}.txt").write_text(text)
            mlflow.log_text(text, f"summary_{name.replace('/', '_')}.txt")
        for tag, grid in result.grids.items():
            grid.save(out / f"grid_{tag}.png")
            mlflow.log_image(grid, f"samples/eval_{tag}.png")
        log_metrics(result.metrics)
        log_to_parent(evaluation_headline(result.metrics))
        mlflow.log_artifact(str(out / "report.md"))
        mlflow.log_artifact(str(out / "samples.json"))
        if (out / PROXY_GOLD_PLOT).is_file():
            mlflow.log_artifact(str(out / PROXY_GOLD_PLOT))
    return result.metrics


def markdown_image(image, alt: str, max_width: int = 1024) -> str:
    """A PIL image as a Markdown image with the PNG inline (a data URI): the KFP UI shows a Markdown output
    as one file, so pictures cannot sit beside it. Wider images are scaled down to ``max_width``."""
    import base64
    import io

    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def samples_section(grids: dict) -> str:
    """The report's sample grids, one per task: base above, policy below, on the same seeds."""
    if not grids:
        return ""
    lines = ["\n## Samples (top: base, bottom: policy, same seeds)\n"]
    for tag, grid in grids.items():
        lines += [f"### {tag}\n", markdown_image(grid, f"base vs policy, {tag}"), ""]
    return "\n".join(lines)


def proxy_gold_section(heldout: dict, policy_dir: Path, out: Path) -> str:
    """The report's account of the evaluations during training (``heldout.json`` of the policy): which
    epoch the evaluated policy is, the alarms, a table of proxy and gold per evaluation, and the plot,
    copied beside the report and embedded in it (the KFP Markdown output is a single file)."""
    import shutil

    from PIL import Image

    from flowgrpo_core.heldout import headline
    from flowgrpo_core.policy import PROXY_GOLD_PLOT

    names = [heldout["proxy"], *heldout["gold"]]
    lines = [
        "\n## Proxy vs gold during training\n",
        f"The policy evaluated above is the one after epoch {heldout['exported_epoch']} of "
        f"{heldout['final_epoch']} ({heldout['exported_because']}).",
    ]
    lines += [f"- alarm: {_alarm_text(alarm)}" for alarm in heldout["alarms"]]
    lines += [
        "",
        f"| epochs trained | {heldout['proxy']} (proxy) | " + " | ".join(heldout["gold"]) + " | seconds |",
        "|---" * (len(names) + 2) + "|",
    ]
    for record in heldout["records"]:
        # value ± standard error
        cells = ["{:.4f} ± {:.4f}".format(*headline(record, name)) for name in names]
        lines.append(f"| {int(record['epoch'])} | " + " | ".join(cells) + f" | {record['time/eval_s']:.1f} |")
    plot = policy_dir / PROXY_GOLD_PLOT
    if plot.is_file():
        shutil.copyfile(plot, out / PROXY_GOLD_PLOT)
        with Image.open(plot) as image:
            lines += [
                "",
                markdown_image(image.convert("RGB"), "proxy vs gold"),
                f"({PROXY_GOLD_PLOT} beside this report)",
            ]
    return "\n".join(lines) + "\n"


def _alarm_text(alarm: dict) -> str:
    from flowgrpo_core.monitoring import Alarm

    return Alarm(**alarm).describe()
