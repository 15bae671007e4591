"""Reward calibration at beta = 0 (docs/algorithm.md sect. 10): a short GRPO probe that checks, before a long
run, that each reward is finite, varies within groups, and moves.

A reward that is constant, NaN, or identical for every image of a prompt gives zero advantages: the
whole training run would be spent learning nothing. The probe finds that in minutes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from flowgrpo_core.advantages import group_stats


class CalibrationError(RuntimeError):
    """A reward failed calibration; the message names the reward and the reason."""


@dataclass
class RewardCalibration:
    name: str
    mean: float
    std: float
    within_group_std: float
    zero_variance_share: float
    nonfinite: int
    count: int
    trend: float  # least-squares slope of the epoch means, per epoch
    epoch_means: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def summarize(
    name: str, epochs: list[tuple[list[str], np.ndarray]], max_zero_variance_share: float
) -> RewardCalibration:
    """Statistics and verdict of one reward over the probe's epochs.

    Args:
        epochs: per epoch, the prompts of its images and the reward's (N,) raw scores.
    """
    scores = np.concatenate([s for _, s in epochs]) if epochs else np.zeros(0)
    finite = np.isfinite(scores)
    nonfinite = int((~finite).sum())
    within, zero_share, means = [], [], []
    for prompts, s in epochs:
        ok = np.isfinite(s)
        stats = group_stats([p for p, keep in zip(prompts, ok) if keep], s[ok])
        within.append(stats.mean_within_group_std)
        zero_share.append(stats.zero_variance_share)
        means.append(float(s[ok].mean()) if ok.any() else math.nan)
    kept = scores[finite]
    report = RewardCalibration(
        name=name,
        mean=float(kept.mean()) if kept.size else math.nan,
        std=float(kept.std()) if kept.size else math.nan,
        within_group_std=float(np.mean(within)) if within else math.nan,
        zero_variance_share=float(np.mean(zero_share)) if zero_share else math.nan,
        nonfinite=nonfinite,
        count=int(scores.size),
        trend=_slope(means),
        epoch_means=means,
    )
    if nonfinite:
        report.problems.append(f"{nonfinite} of {scores.size} scores are NaN or infinite")
    if kept.size and kept.std() == 0:
        report.problems.append(f"it is constant ({kept[0]:.6g} for all {kept.size} images)")
    elif report.zero_variance_share >= max_zero_variance_share:
        report.problems.append(
            f"it has no within-group signal: {report.zero_variance_share:.0%} of prompt groups have zero variance "
            f"(threshold {max_zero_variance_share:.0%}), so their advantages are all zero"
        )
    return report


def _slope(values: list[float]) -> float:
    y = np.array([v for v in values if math.isfinite(v)])
    if y.size < 2:
        return 0.0
    x = np.arange(y.size, dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0])


def check(reports: list[RewardCalibration]) -> None:
    """Raise CalibrationError naming every broken reward and why."""
    broken = [f"reward {r.name!r} is broken: " + "; ".join(r.problems) for r in reports if r.problems]
    if broken:
        raise CalibrationError("calibration failed:\n  " + "\n  ".join(broken))


def to_json(reports: list[RewardCalibration]) -> dict:
    return {"rewards": {r.name: asdict(r) for r in reports}, "ok": not any(r.problems for r in reports)}


def run_probe(config, workdir, adapter=None, reward=None, prompts=None, progress: bool = True):
    """Train ``config.calibration.epochs`` epochs without a KL term, with the run's algorithm, and summarize
    every reward component.

    The probe trains a throwaway policy: pass a fresh adapter (or None to load one), never the one a
    real run will train. Returns ``(reports, history)``.
    """
    from collections import defaultdict

    from flowgrpo_core.trainer import FlowGRPOTrainer

    # without the KL term (Flow-GRPO's beta, DiffusionNFT's nft_kl_beta): the probe needs no reference forwards
    kl_off = "train.beta=0" if config.train.algorithm == "grpo" else "train.nft_kl_beta=0"
    probe = config.override(
        kl_off,
        f"train.epochs={config.calibration.epochs}",
        "train.checkpoint_every=0",
        "train.ema=false",
    )
    collected: dict[str, list[tuple[list[str], np.ndarray]]] = defaultdict(list)

    def capture(trainer, _metrics) -> None:
        for key, values in trainer.last_rewards.details.items():
            if key.endswith("/raw"):
                collected[key[: -len("/raw")]].append(
                    (trainer.last_prompts, np.asarray(values, dtype=np.float64))
                )

    trainer = FlowGRPOTrainer(
        probe,
        workdir,
        adapter=adapter,
        reward=reward,
        prompts=prompts,
        callbacks=[capture],
        progress=progress,
    )
    history = trainer.train()
    threshold = config.calibration.max_zero_variance_share
    return [summarize(name, epochs, threshold) for name, epochs in collected.items()], history
