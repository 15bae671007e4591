"""Calibration verdicts on real probes of the tiny model, and on hand-made reward tables."""

from collections.abc import Sequence

import numpy as np
import pytest

from flowgrpo_core.calibration import CalibrationError, check, run_probe, summarize
from flowgrpo_core.config import load_config
from flowgrpo_core.rewards import MultiReward, Reward, RewardOutput, build_reward

PROBE = [
    "sampling.groups_per_epoch=2",
    "sampling.group_size=4",
    "sampling.num_steps=4",
    "calibration.epochs=2",
]


class _Constant(Reward):
    name = "constant"

    def score(self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        return RewardOutput(np.full(len(images), 0.5))


class _PerPrompt(Reward):
    """Depends only on the prompt: varies across groups, never within one."""

    name = "per_prompt"

    def score(self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        return RewardOutput(np.array([len(p) for p in prompts], dtype=float))


class _SometimesNaN(Reward):
    name = "flaky"

    def score(self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        s = build_reward("jpeg_incompressibility")(images, prompts).scores
        s[::3] = np.nan
        return RewardOutput(s)


def _probe(tmp_path, components):
    cfg = load_config("tiny", overrides=PROBE)
    reward = MultiReward({name: (r, 1.0) for name, r in components.items()})
    return run_probe(cfg, tmp_path, reward=reward, progress=False)


def test_a_working_reward_passes_with_its_statistics(tmp_path):
    reports, history = _probe(tmp_path, {"jpeg_incompressibility": build_reward("jpeg_incompressibility")})
    (report,) = reports
    check(reports)
    assert report.count == 16 and report.nonfinite == 0 and report.std > 0 and report.within_group_std > 0
    assert report.zero_variance_share == 0.0 and len(report.epoch_means) == 2 and len(history) == 2
    assert all(h["train/kl"] == 0.0 for h in history)  # beta = 0: no reference forward


@pytest.mark.parametrize(
    ("component", "message"),
    [
        (_Constant(), r"reward 'constant' is broken: it is constant \(0.5 for all 16 images\)"),
        (
            _PerPrompt(),
            r"reward 'per_prompt' is broken: it has no within-group signal: 100% of prompt groups",
        ),
        (_SometimesNaN(), r"reward 'flaky' is broken: 8 of 16 scores are NaN or infinite"),
    ],
)
def test_broken_rewards_fail_with_their_name_and_reason(tmp_path, component, message):
    good = build_reward("jpeg_incompressibility")
    reports, _ = _probe(tmp_path, {"jpeg_incompressibility": good, component.name: component})
    with pytest.raises(CalibrationError, match=message) as info:
        check(reports)
    assert "jpeg_incompressibility" not in str(info.value)


def test_trend_is_the_slope_of_the_epoch_means():
    epochs = [(["a", "a", "b", "b"], np.array([1.0, 2.0, 3.0, 5.0]) + e) for e in range(3)]
    report = summarize("r", epochs, 0.9)
    assert report.trend == pytest.approx(1.0) and report.epoch_means == [2.75, 3.75, 4.75]
    assert report.within_group_std == pytest.approx(0.75) and not report.problems
