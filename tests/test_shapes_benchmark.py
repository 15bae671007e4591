"""The verdicts of benchmarks/shapes_geneval.py: a gain or a speed-up is claimed only beyond the noise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from flowgrpo_core.config import load_config

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes_geneval.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("shapes_geneval", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def point(cpu_min: float, overall: float, se: float = 0.03) -> dict:
    return {"cpu_min": cpu_min, "overall": overall, "overall_se": se}


def test_gain_must_exceed_two_standard_errors_of_the_difference(bench):
    base = point(0, 0.30)
    # 2 * hypot(0.03, 0.04) = 0.10
    assert not bench.significant_gain(base, point(30, 0.39, se=0.04))
    assert bench.significant_gain(base, point(30, 0.41, se=0.04))


def test_no_speed_up_is_claimed_when_the_full_method_did_not_improve(bench):
    base = point(0, 0.307)
    full = [base, point(10, 0.324), point(30, 0.331)]
    fast = [base, point(10, 0.389), point(30, 0.345)]  # the README's run: "3.0x sooner" was noise
    assert bench.speedup_line(base, full, fast).startswith("no speed-up measured")


def test_speed_up_is_the_ratio_of_first_times_to_the_full_methods_final_accuracy(bench):
    base = point(0, 0.30)
    full = [base, point(10, 0.40), point(20, 0.50), point(30, 0.60)]
    fast = [base, point(5, 0.45), point(10, 0.61), point(30, 0.70)]
    line = bench.speedup_line(base, full, fast)
    assert "Flow-GRPO at 30.0 CPU-min, Flow-GRPO-Fast at 10.0 CPU-min (3.0x sooner)" in line
    assert "(never within its budget)" in bench.speedup_line(base, full, [base, point(30, 0.5)])


def test_a_method_s_gain_is_stated_as_a_share_of_the_supervised_reference_s(bench):
    base = point(0, 0.30)
    line = bench.share_line("DiffusionNFT", base, point(30, 0.36), point(30, 0.42))
    assert line == "DiffusionNFT: 50 % of the supervised reference's gain (+12.0 points)"
    assert "gained nothing" in bench.share_line("DiffusionNFT", base, point(30, 0.36), point(30, 0.29))


def test_the_supervised_reference_trains_for_its_budget_without_its_evaluations(bench, monkeypatch):
    # the real evaluation (one image of 2 steps per test prompt, all six tasks), timed: its CPU time must not count as training
    calls, evaluate = [], bench.held_out_accuracy

    def timed_evaluation(adapter, cfg):
        began = bench.cpu_seconds()
        accuracy = evaluate(adapter, cfg)
        calls.append((began, bench.cpu_seconds()))
        return accuracy

    monkeypatch.setattr(bench, "held_out_accuracy", timed_evaluation)
    cfg = load_config(
        "shapes",
        overrides=[
            "eval.num_prompts=80",
            "eval.min_images_per_tag=0",
            "eval.images_per_prompt=1",
            "eval.num_steps=2",
            "eval.batch_size=40",
        ],
    )
    threads = torch.get_num_threads()
    try:
        points = bench.supervised_under_budget("supervised reference", cfg, 2.0, 0.5)
    finally:
        torch.set_num_threads(threads)
    assert points[0]["epoch"] == 0 and points[0]["cpu_min"] == 0
    assert set(points[0]) >= {*bench.TAGS, "overall", "overall_se"}
    assert len(points) >= 4 and len(calls) == len(points)  # the base, every 0.5 CPU-s, the end
    steps = [p["epoch"] for p in points]
    assert steps == sorted(steps) and steps[-1] > 0
    # training CPU time = from the base evaluation's end to the last one's start, less the evaluations between
    between = sum(end - began for began, end in calls[1:-1])
    training = calls[-1][0] - calls[0][1] - between
    assert 60 * points[-1]["cpu_min"] == pytest.approx(training, abs=0.05)
    # the evaluations between took CPU time on top; the training time stays near the budget
    assert 2.0 <= 60 * points[-1]["cpu_min"] < 2.0 + 1.0
