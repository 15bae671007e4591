"""Group-relative advantages (ALGORITHM.md sect. 3).

GRPO has no critic: the baseline of an image is the mean reward of the other images drawn for the same
prompt in the same epoch. ``A = (r - mean_group) / (std + 1e-4)``, where std is the group's own or, with
``global_std`` (the reference default), the std over every reward of the epoch, so that groups whose
rewards barely differ do not get their noise blown up to unit scale.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

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


def clip_advantages(advantages: np.ndarray, adv_clip_max: float) -> np.ndarray:
    """Clip to ``[-adv_clip_max, adv_clip_max]`` (reference: 5)."""
    return np.clip(advantages, -adv_clip_max, adv_clip_max)
