"""Proxy vs gold during training: the hacking monitor's rule in closed form, stop-on-hacking and keep-best
through the trainer, and the training stage's MLflow record (step = epochs trained)."""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from flowgrpo_core.config import load_config
from flowgrpo_core.monitoring import Alarm, hacking_alarms
from flowgrpo_core.policy import HELDOUT_FILE, LORA_FILE, PROXY_GOLD_PLOT, export_weights
from flowgrpo_core.trainer import FlowGRPOTrainer
from flowgrpo_core.watch import best_epoch

FAST = [
    "sampling.groups_per_epoch=2",
    "sampling.group_size=4",
    "sampling.num_steps=4",
    "eval.num_steps=4",
    "eval.during_training_prompts=4",
]


def _alarms(proxy, gold, window=2, k=2.0):
    epochs = list(range(0, 5 * len(proxy), 5))
    return hacking_alarms(epochs, [(p, 0.01) for p in proxy], {"gold": gold}, window, k)


def test_the_monitor_fires_when_the_proxy_rises_and_gold_falls_beyond_k_standard_errors():
    (alarm,) = _alarms([1.0, 1.1, 1.2], [(0.5, 0.02), (0.48, 0.02), (0.40, 0.02)])
    # evaluation 2 against evaluation 0: the fall 0.10 over sqrt(0.02^2 + 0.02^2) = 0.0283 is 3.54 s.e. > 2
    assert (alarm.metric, alarm.since, alarm.epoch) == ("gold", 0, 10)
    assert alarm.proxy_rise == pytest.approx(0.2) and alarm.gold_fall == pytest.approx(0.10)
    assert alarm.standard_errors == pytest.approx(0.10 / math.hypot(0.02, 0.02))
    assert "gold fell by 0.1" in alarm.describe() and Alarm(**alarm.to_dict()) == alarm


@pytest.mark.parametrize(
    ("proxy", "gold", "why"),
    [
        ([1.0, 1.1, 1.2], [(0.5, 0.02), (0.5, 0.02), (0.46, 0.02)], "a fall of 1.41 s.e. is noise"),
        ([1.2, 1.1, 1.0], [(0.5, 0.02), (0.4, 0.02), (0.2, 0.02)], "the proxy fell too"),
        ([1.0, 1.0, 1.0], [(0.5, 0.02), (0.4, 0.02), (0.2, 0.02)], "the proxy did not rise"),
        ([1.0, 1.2], [(0.5, 0.02), (0.1, 0.02)], "fewer than window + 1 evaluations"),
        ([1.0, 1.1, 1.2], [(0.5, 0.02), (0.3, 0.02), (0.5, 0.02)], "gold recovered within the window"),
        ([1.0, 1.1, 1.2], [(0.5, math.nan), (0.4, 0.02), (0.2, 0.02)], "no standard error, no verdict"),
        ([1.0, 1.1, math.nan], [(0.5, 0.02), (0.4, 0.02), (0.2, 0.02)], "no proxy, no verdict"),
    ],
)
def test_the_monitor_stays_quiet(proxy, gold, why):
    assert _alarms(proxy, gold) == [], why


def test_the_threshold_is_strict_and_the_window_counts_evaluations_back():
    # fall 10 over sqrt(3^2 + 4^2) = 5: exactly 2 s.e. is no alarm, a hair more is
    assert _alarms([1, 2], [(100, 3), (90, 4)], window=1) == []
    assert len(_alarms([1, 2], [(100, 3), (89.99, 4)], window=1)) == 1
    # window 1 compares the latest evaluation with the one before it, not with the first
    assert _alarms([1, 2, 3], [(0.9, 0.01), (0.5, 0.01), (0.5, 0.01)], window=1) == []
    assert len(_alarms([1, 2, 3], [(0.9, 0.01), (0.5, 0.01), (0.5, 0.01)], window=2)) == 1
    # one alarm per gold metric that fell
    gold = {"a": [(0.5, 0.01), (0.1, 0.01)], "b": [(0.5, 0.01), (0.5, 0.01)], "c": [(0.9, 0.1), (0.1, 0.1)]}
    alarms = hacking_alarms([0, 1], [(0.0, 0.1), (1.0, 0.1)], gold, 1, 2.0)
    assert [a.metric for a in alarms] == ["a", "c"]


def test_best_epoch_is_the_highest_headline_value_the_earliest_of_equals():
    def record(epoch, accuracy):
        return {"epoch": float(epoch), "heldout/g/accuracy/overall": accuracy, "heldout/g_mean": -accuracy}

    records = [record(0, 0.3), record(5, 0.5), record(10, 0.5), record(15, math.nan)]
    assert best_epoch(records, "g") == 5  # the accuracy, not the mean, for a metric with verdicts
    assert (
        best_epoch([{"epoch": 0.0, "heldout/m_mean": 1.0}, {"epoch": 2.0, "heldout/m_mean": 2.0}], "m") == 2
    )
    assert best_epoch([record(0, math.nan)], "g") is None


class _Scripted:
    """An evaluator whose records follow a script, one ``(proxy, gold)`` per call."""

    def __init__(self, script):
        self.script = iter(script)

    def __call__(self, adapter):
        proxy, gold = next(self.script)
        return {
            "heldout/reward_mean": proxy,
            "heldout/reward_mean_se": 0.01,
            "heldout/brightness_mean": gold,
            "heldout/brightness_mean_se": 0.01,
        }


def _scripted_trainer(tmp_path, script, *overrides, name="run"):
    cfg = load_config(
        "tiny",
        overrides=[*FAST, "eval.every_epochs=1", "eval.metrics=[brightness]", "train.epochs=3", *overrides],
    )
    trainer = FlowGRPOTrainer(cfg, tmp_path / name, progress=False)
    trainer.watch.evaluator = _Scripted(script)
    exports = {}

    def export_each_epoch(t, metrics):  # what save_policy would have written after each epoch
        folder = tmp_path / f"{name}-at" / str(t.epoch)
        export_weights(t.adapter, folder)
        with t.ema.swapped_in():
            export_weights(t.adapter, folder / "ema")
        exports[t.epoch] = folder

    trainer.callbacks.append(export_each_epoch)
    return trainer, exports


def _same_files(a, b) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_stop_on_hacking_stops_and_exports_the_last_good_epoch(tmp_path, caplog):
    # gold falls 28 s.e. at the evaluation after 2 epochs while the proxy keeps rising
    script = [(1.0, 0.5), (1.1, 0.5), (1.2, 0.1), (1.3, 0.1)]
    overrides = ["train.stop_on_hacking=true", "eval.hacking_window=1", "train.checkpoint_every=0"]
    trainer, exports = _scripted_trainer(tmp_path, script, *overrides)
    with caplog.at_level(logging.WARNING, logger="flowgrpo_core.watch"):
        trainer.train()
    assert (
        "reward hacking? from epoch 1 to 2 the proxy rose by 0.1 while brightness fell by 0.4" in caplog.text
    )
    assert trainer.epoch == 2 and trainer.watch.stopped_at == 2 and trainer.watch.last_good == 1
    assert [r["monitor/hacking"] for r in trainer.watch.records] == [0.0, 0.0, 1.0]
    assert trainer.watch.alarms[0]["since"] == 1 and trainer.watch.alarms[0]["epoch"] == 2
    policy = trainer.save_policy(tmp_path / "policy")
    assert _same_files(policy / LORA_FILE, exports[1] / LORA_FILE)
    assert _same_files(policy / "ema" / LORA_FILE, exports[1] / "ema" / LORA_FILE)
    assert not _same_files(policy / LORA_FILE, exports[2] / LORA_FILE)
    summary = json.loads((policy / HELDOUT_FILE).read_text())
    assert summary["exported_epoch"] == 1 and summary["stopped_at"] == 2 and summary["final_epoch"] == 2
    assert (policy / PROXY_GOLD_PLOT).stat().st_size > 0
    # the stop is in the checkpoint (written at the stop): a retried run does not train past it
    again, _ = _scripted_trainer(tmp_path, [], *overrides)
    assert again.resume() and again.epoch == 2
    again.train()
    assert again.epoch == 2 and again.watch.exported_epoch() == 1
    assert sorted(p.name for p in (tmp_path / "run" / "kept").iterdir()) == ["epoch-000001.safetensors"]


def test_keep_best_exports_the_best_evaluated_epoch(tmp_path):
    script = [(1.0, 0.3), (1.1, 0.6), (1.2, 0.4), (1.3, 0.5)]
    overrides = ["train.keep_best=brightness", "train.checkpoint_every=1"]
    trainer, exports = _scripted_trainer(tmp_path, script, *overrides)
    trainer.train()
    assert trainer.epoch == 3 and trainer.watch.best == 1 and trainer.watch.stopped_at is None
    policy = trainer.save_policy(tmp_path / "policy")
    assert _same_files(policy / LORA_FILE, exports[1] / LORA_FILE)
    assert _same_files(policy / "ema" / LORA_FILE, exports[1] / "ema" / LORA_FILE)
    summary = json.loads((policy / HELDOUT_FILE).read_text())
    assert (summary["exported_epoch"], summary["best_epoch"], summary["final_epoch"]) == (1, 1, 3)
    assert [r["epoch"] for r in summary["records"]] == [0, 1, 2, 3]
    # the export put the final weights back: training state is untouched
    final = tmp_path / "final"
    export_weights(trainer.adapter, final)
    assert _same_files(final / LORA_FILE, exports[3] / LORA_FILE)
    # only the best epoch's weights stay kept
    assert [p.name for p in (tmp_path / "run" / "kept").iterdir()] == ["epoch-000001.safetensors"]


def test_the_training_stage_logs_evaluations_with_step_epochs_trained(tmp_path, tiny_sd3_folder):
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.evaluate import evaluate
    from flowgrpo_core.stages.train import train_grpo

    overrides = [
        *FAST,
        "serving.mode=inline",
        "train.epochs=3",
        "train.checkpoint_every=0",
        "eval.every_epochs=2",
        "eval.metrics=[brightness]",
        "train.keep_best=brightness",
        "eval.num_prompts=4",
    ]
    ctx = PipelineContext(
        preset="tiny",
        overrides=overrides,
        kfp_run_id="watch-run",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="",
        workdir=str(tmp_path / "work"),
    )
    final = train_grpo(ctx, tiny_sd3_folder, None, tmp_path / "policy")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (run,) = client.search_runs([experiment], "tags.stage = 'train_grpo'")
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in ("heldout/reward_mean", "heldout/brightness_mean_se", "time/eval_s", "monitor/hacking")
    }
    # the base before the first epoch, then after 2 epochs (3 % 2 != 0: no evaluation at the end)
    assert all([step for step, _ in points] == [0, 2] for points in history.values())
    summary = json.loads((tmp_path / "policy" / HELDOUT_FILE).read_text())
    assert [v for _, v in history["heldout/reward_mean"]] == [
        r["heldout/reward_mean"] for r in summary["records"]
    ]
    best = best_epoch(summary["records"], "brightness")
    tags = run.data.tags
    assert (
        tags["train.exported_epoch"]
        == tags["train.best_epoch"]
        == str(best)
        == str(summary["exported_epoch"])
    )
    assert final["exported_epoch"] == best and tags["train.stopped_on_hacking"] == "no"
    assert PROXY_GOLD_PLOT in {a.path for a in client.list_artifacts(run.info.run_id)}
    # reward/total is logged per epoch as before
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/total")] == [0, 1, 2]

    evaluate(ctx, tiny_sd3_folder, tmp_path / "policy", None, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Proxy vs gold during training" in report and f"after epoch {best} of 3" in report
    assert "data:image/png;base64," in report and (tmp_path / "report" / PROXY_GOLD_PLOT).is_file()
    (evaluation,) = client.search_runs([experiment], "tags.stage = 'evaluate'")
    assert evaluation.data.tags["eval.policy_epoch"] == str(best)


class _Posted(Exception):
    """Rank 1 has handed its part to the gather; rank 0 will finish it."""


class _TwoRanks:
    """Two ranks' ``all_gather_objects`` played one after the other: rank 1 posts its part and stops there
    (it would wait for rank 0), then rank 0 gathers both."""

    def __init__(self):
        self.parts = {}

    def rank(self, rank):
        ranks = self

        class Dist:
            world_size = 2

            def __init__(self):
                self.rank = rank

            def all_gather_objects(self, value):
                ranks.parts[rank] = value
                if rank == 1:
                    raise _Posted
                return [ranks.parts[0], ranks.parts[1]]

        return Dist()


def test_ranks_share_the_held_out_images_and_report_what_one_process_does():
    from flowgrpo_core.heldout import HeldOutEvaluator
    from flowgrpo_core.models import adapter_for
    from flowgrpo_core.models.tiny import build_tiny_sd3
    from flowgrpo_core.rewards import build_reward

    cfg = load_config(
        "tiny",
        overrides=[*FAST, "prompts.eval=builtin:shapes_test", "eval.during_training_prompts=5"],
    )
    metrics = {"reward": build_reward("brightness"), "shapes_geneval": build_reward("shapes_geneval")}
    adapter = adapter_for(build_tiny_sd3(seed=0))
    alone = HeldOutEvaluator(cfg, metrics)(adapter)
    ranks = _TwoRanks()
    with pytest.raises(_Posted):
        HeldOutEvaluator(cfg, metrics, ranks.rank(1))(adapter)  # images 3-4
    shared = HeldOutEvaluator(cfg, metrics, ranks.rank(0))(adapter)  # images 0-2, then everyone's scores
    assert len(ranks.parts[0]["reward"][0]) == 3 and len(ranks.parts[1]["reward"][0]) == 2
    assert shared.keys() == alone.keys() and "heldout/shapes_geneval/accuracy/overall_se" in shared
    assert shared == pytest.approx(alone, rel=1e-5, abs=1e-7)
