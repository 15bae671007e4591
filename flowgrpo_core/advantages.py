"""Group-relative advantages (docs/algorithm.md sect. 3).

GRPO has no critic: the baseline of an image is the mean reward of the other images drawn for the same
prompt in the same epoch. ``A = (r - mean_group) / (std + 1e-4)``, where std is the group's own or, with
``global_std`` (the reference default), the std over every reward of the epoch, so that groups whose
rewards barely differ do not get their noise blown up to unit scale.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

STD_EPS = 1e-4


@dataclass(frozen=True)
class GroupStats:
    """What the epoch's groups say about the reward signal (logged every epoch)."""

    num_groups: int
    zero_variance_share: float  # share of groups whose rewards are all equal: they teach nothing
    mean_within_group_std: float
    global_std: float


class PerPromptStatTracker:
    """Turns rewards into per-prompt advantages.

    Rewards are keyed by prompt text. By default the buffers are cleared at the start of every epoch (the
    Flow-GRPO reference); ``buffer_size > 0`` keeps the last ``buffer_size`` rewards of each prompt across
    epochs instead (the ddpo-pytorch rolling baseline). The state is plain data so that a checkpoint can
    restore it exactly.
    """

    def __init__(self, global_std: bool = True, buffer_size: int = 0) -> None:
        self.global_std = global_std
        self.buffer_size = buffer_size
        self.history: dict[str, list[float]] = defaultdict(list)

    def clear(self) -> None:
        self.history = defaultdict(list)

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Record one epoch of rewards and return their advantages.

        Args:
            prompts: length N, the prompt of each image (a group = the images with equal prompts).
            rewards: (N,) float rewards; non-finite values must be filtered by the caller.
        Returns:
            (N,) float64 advantages, unclipped.
        """
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.shape != (len(prompts),):
            raise ValueError(f"rewards has shape {rewards.shape} but there are {len(prompts)} prompts")
        if not np.isfinite(rewards).all():
            raise ValueError("rewards contain NaN or inf; drop those samples before computing advantages")
        prompt_array = np.array(prompts, dtype=object)
        advantages = np.zeros_like(rewards)
        global_std = float(np.std(rewards)) if len(rewards) else 0.0
        for prompt in dict.fromkeys(prompts):  # unique, in order of first appearance
            in_group = prompt_array == prompt
            self.history[prompt].extend(rewards[in_group].tolist())
            if self.buffer_size > 0:
                self.history[prompt] = self.history[prompt][-self.buffer_size :]
            baseline = np.asarray(self.history[prompt])
            std = global_std if self.global_std else float(np.std(baseline))
            advantages[in_group] = (rewards[in_group] - baseline.mean()) / (std + STD_EPS)
        return advantages

    def state_dict(self) -> dict:
        return {"global_std": self.global_std, "buffer_size": self.buffer_size, "history": dict(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.global_std = bool(state["global_std"])
        self.buffer_size = int(state["buffer_size"])
        self.history = defaultdict(list, {k: [float(x) for x in v] for k, v in state["history"].items()})


def group_stats(prompts: list[str], rewards: np.ndarray) -> GroupStats:
    """Zero-variance share and within-group spread of one epoch's rewards.

    Args:
        prompts: length N.
        rewards: (N,).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    groups: dict[str, list[float]] = defaultdict(list)
    for prompt, reward in zip(prompts, rewards.tolist()):
        groups[prompt].append(reward)
    stds = np.array([np.std(v) for v in groups.values()]) if groups else np.zeros(0)
    return GroupStats(
        num_groups=len(groups),
        zero_variance_share=float((stds == 0).mean()) if len(stds) else 0.0,
        mean_within_group_std=float(stds.mean()) if len(stds) else 0.0,
        global_std=float(np.std(rewards)) if len(rewards) else 0.0,
    )


def reward_statistics(
    prompts: list[str], rewards: np.ndarray, components: dict[str, np.ndarray]
) -> dict[str, float]:
    """What an epoch's rewards say, for logging: the total's mean and std and its share of zero-variance
    groups, and per reward component (``components``: ``{"<name>/raw": (N,) values}``) its mean, std, mean
    within-group std and zero-variance share. A component without within-group spread teaches nothing.

    Args:
        prompts: length N, the group of each (finite) reward.
        rewards: (N,) the weighted totals.
    """
    total = np.asarray(rewards, dtype=np.float64)
    metrics = {
        "reward/total": float(total.mean()) if total.size else float("nan"),
        "reward/total/std": float(total.std()) if total.size else float("nan"),
        "train/zero_variance_share": group_stats(prompts, total).zero_variance_share,
    }
    for key, values in components.items():
        name = key.removesuffix("/raw")
        raw = np.asarray(values, dtype=np.float64)
        stats = group_stats(prompts, raw)
        metrics[f"reward/{name}/mean"] = float(raw.mean()) if raw.size else float("nan")
        metrics[f"reward/{name}/std"] = float(raw.std()) if raw.size else float("nan")
        metrics[f"reward/{name}/within_group_std"] = stats.mean_within_group_std
        metrics[f"reward/{name}/zero_variance_share"] = stats.zero_variance_share
    return metrics


def epoch_advantages(
    tracker: PerPromptStatTracker,
    prompts: list[str],
    rewards: np.ndarray,
    components: dict[str, np.ndarray],
    adv_clip_max: float,
) -> tuple[np.ndarray, dict[str, float]]:
    """An epoch's clipped advantages and reward statistics. A sample whose reward is not finite (a failed
    scorer) gets advantage 0 and enters neither the baseline nor the statistics. Without a rolling buffer
    the tracker starts the epoch empty.

    Args:
        prompts: length N; rewards: (N,) weighted totals; components: ``{"<name>/raw": (N,)}``.
    Returns:
        (N,) float64 advantages and the metrics of :func:`reward_statistics`, plus
        ``train/nonfinite_rewards`` and ``train/advantage_abs_mean``.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    finite = np.isfinite(rewards)
    if tracker.buffer_size == 0:
        tracker.clear()
    advantages = np.zeros(len(rewards))
    kept_prompts = [p for p, ok in zip(prompts, finite) if ok]
    if finite.any():
        advantages[finite] = clip_advantages(tracker.update(kept_prompts, rewards[finite]), adv_clip_max)
    metrics = reward_statistics(
        kept_prompts, rewards[finite], {k: np.asarray(v)[finite] for k, v in components.items()}
    )
    metrics["train/nonfinite_rewards"] = float((~finite).sum())
    metrics["train/advantage_abs_mean"] = float(np.abs(advantages).mean()) if len(advantages) else 0.0
    return advantages, metrics


def clip_advantages(advantages: np.ndarray, adv_clip_max: float) -> np.ndarray:
    """Clip to ``[-adv_clip_max, adv_clip_max]`` (reference: 5)."""
    return np.clip(advantages, -adv_clip_max, adv_clip_max)


def samples_to_train(
    advantages: torch.Tensor,
    mode: str,
    rank_of_sample: torch.Tensor,
    batches_per_rank: int,
    generator: torch.Generator,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which samples of the epoch enter the loss (``train.zero_advantage``).

    A sample with advantage 0 adds nothing to the policy gradient but, kept, still counts in the mean the
    loss is averaged over (and adds its KL term).

    - 'drop': only the samples with a non-zero advantage.
    - 'refill' (the reference's SD3 scripts): drop them, then on each rank put back randomly chosen
      zero-advantage samples until its count is a multiple of its sampling batches; the reference needs
      this to reshape the kept samples into equal micro-batches. A rank with no signal at all trains
      nothing (the reference's full script fails there; its Fast script would train one batch's worth of
      zero-advantage samples, a step of pure KL and weight decay).
    - 'keep' (the reference's FLUX scripts): every sample.

    Args:
        advantages: (N,) the epoch's advantages, all ranks.
        rank_of_sample: (N,) the rank that holds each sample.
        batches_per_rank: sampling batches each rank drew.
        generator: the epoch's generator (the draw is the same on every rank).
        eligible: (N,) bool, samples that may be put back (default: all; the trainer excludes non-finite rewards).
    Returns:
        (K,) sorted global indices.
    """
    n = len(advantages)
    if mode == "keep":
        return torch.arange(n) if eligible is None else torch.nonzero(eligible).flatten()
    keep = advantages != 0
    if mode == "refill":
        candidates = ~keep if eligible is None else ~keep & eligible
        for rank in torch.unique(rank_of_sample).tolist():
            mine = rank_of_sample == rank
            count = int((keep & mine).sum())
            missing = batches_per_rank - count % batches_per_rank
            if count == 0 or missing == batches_per_rank:
                continue
            zero = torch.nonzero(candidates & mine).flatten()
            if len(zero) >= missing:
                keep[zero[torch.randperm(len(zero), generator=generator)[:missing]]] = True
    elif mode != "drop":
        raise ValueError(f"unknown zero_advantage mode {mode!r}; expected 'refill', 'drop' or 'keep'")
    return torch.nonzero(keep).flatten()
