"""The evaluate stage: paired base-vs-policy metrics, GenEval-style accuracy per task, reports in MLflow."""

import json

import pytest

from flowgrpo_core.evaluation.compare import _verdict_reports, images_per_prompt_plan
from flowgrpo_core.stages import PipelineContext


def test_verdicts_are_reported_per_task_and_as_the_mean_over_tasks():
    tags = ["counting", "counting", "counting", "counting", "position"]
    details = {"correct": [True, True, True, False, False], "tag": tags}
    (report,) = _verdict_reports(details, tags, ["p"] * 5).values()
    assert report.per_tag == {"counting": 0.75, "position": 0.0}
    assert report.overall == pytest.approx(0.375)  # mean over tasks, not the image mean 0.6
    nested = _verdict_reports(
        {"geneval/correct": [True, False], "geneval/tag": ["colors", "colors"]}, ["x", "x"], ["a", "b"]
    )
    assert nested["geneval/correct"].per_tag == {"colors": 0.5}


def test_tasks_with_few_prompts_get_more_images():
    tags = ["color_attr"] * 5 + ["single_object"] + ["counting"] * 3
    assert images_per_prompt_plan(tags, 2) == [2] * 9
    # at least 8 images per task: 5 x 2 = 10 already; 1 x 8; 3 x ceil(8 / 3) = 9
    assert images_per_prompt_plan(tags, 2, 8) == [2] * 5 + [8] + [3] * 3
    assert images_per_prompt_plan(tags, 4, 3) == [4] * 9  # never fewer than images_per_prompt


def test_evaluate_stage_writes_paired_and_per_task_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.config import load_config
    from flowgrpo_core.models.tiny import build_tiny_sd3
    from flowgrpo_core.stages.evaluate import evaluate
    from flowgrpo_core.trainer import FlowGRPOTrainer

    overrides = [
        "serving.mode=inline",
        "prompts.eval=builtin:shapes_test",
        "eval.metrics=[shapes_geneval]",
        "eval.num_prompts=12",
        "eval.min_images_per_tag=3",
        "eval.num_steps=4",
        "train.learning_rate=0.05",
    ]
    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "model")
    trainer = FlowGRPOTrainer(load_config("tiny", overrides=overrides), tmp_path / "train", progress=False)
    trainer.train(epochs=2)
    trainer.save_policy(tmp_path / "policy")

    ctx = PipelineContext(
        preset="tiny",
        overrides=overrides,
        kfp_run_id="eval-run",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="",
        workdir=str(tmp_path / "work"),
    )
    metrics = evaluate(ctx, tmp_path / "model", tmp_path / "policy", None, tmp_path / "report")
    for side in ("base", "policy"):
        assert f"eval/{side}/reward_mean" in metrics and f"eval/{side}/shapes_geneval_mean" in metrics
        assert 0.0 <= metrics[f"eval/{side}/shapes_geneval/accuracy/overall"] <= 1.0
        for tag in ("position", "color_attr"):
            assert f"eval/{side}/shapes_geneval/accuracy/{tag}" in metrics
    assert metrics["eval/delta/reward"] != 0.0  # the trained LoRA changes the images
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| shapes_geneval/accuracy/overall |" in report and "| reward | all |" in report
    assert (
        "Overall score (avg. over tasks)"
        in (tmp_path / "report" / "summary_shapes_geneval_policy.txt").read_text()
    )
    rows = json.loads((tmp_path / "report" / "samples.json").read_text())
    from flowgrpo_core.prompts import load_prompts

    tags = [m["tag"] for m in load_prompts("builtin:shapes_test").metadata[:12]]
    plan = images_per_prompt_plan(tags, 1, 3)
    assert sum(plan) > 12 and len(rows) == sum(plan)
    assert [r["seed"] for r in rows] == list(range(len(rows)))
    assert {"prompt", "tag", "seed", "base/reward", "policy/shapes_geneval"} <= set(rows[0])

    client = MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.stage = 'evaluate'"
    )
    assert (
        run.data.metrics["eval/policy/shapes_geneval/accuracy/overall"]
        == metrics["eval/policy/shapes_geneval/accuracy/overall"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "samples.json", "summary_shapes_geneval_base.txt", "samples"} <= artifacts
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert any("eval_position" in g for g in grids) and any("eval_all" in g for g in grids)


def test_ocr_accuracy_through_a_real_ocr_server(tmp_path):
    """OCR accuracy = mean OCR reward on held-out text prompts, scored by the OCR reward server."""
    from flowgrpo_core.config import load_config
    from flowgrpo_core.models.tiny import build_tiny_sd3
    from flowgrpo_core.stages.evaluate import evaluate
    from flowgrpo_core.stages.servers import launch_reward_servers, stop_reward_servers
    from flowgrpo_core.trainer import FlowGRPOTrainer

    overrides = [
        "prompts.eval=builtin:ocr_test",
        "eval.metrics=[ocr]",
        "eval.num_prompts=4",
        "eval.num_steps=4",
    ]
    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "model")
    trainer = FlowGRPOTrainer(
        load_config("tiny", overrides=[*overrides, "serving.mode=inline"]), tmp_path / "t", progress=False
    )
    trainer.train(epochs=1)
    trainer.save_policy(tmp_path / "policy")
    ctx = PipelineContext(
        preset="tiny",
        overrides=overrides,
        kfp_run_id="ocr-eval",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="",
        workdir=str(tmp_path / "work"),
    )
    try:
        endpoints = launch_reward_servers(ctx, tmp_path / "endpoints.json")
        assert endpoints["ocr"]["url"].startswith("http://127.0.0.1:") and endpoints["ocr"]["weight"] == 0.0
        metrics = evaluate(
            ctx, tmp_path / "model", tmp_path / "policy", tmp_path / "endpoints.json", tmp_path / "report"
        )
    finally:
        assert sorted(stop_reward_servers(ctx)) == ["jpeg_incompressibility", "ocr"]
    for side in ("base", "policy"):
        assert 0.0 <= metrics[f"eval/{side}/ocr_mean"] <= 1.0 and f"eval/{side}/ocr/ocr" in metrics
    rows = json.loads((tmp_path / "report" / "samples.json").read_text())
    assert all('"' in row["prompt"] for row in rows) and all(0.0 <= row["policy/ocr"] <= 1.0 for row in rows)
