"""Weighted sum of several rewards (``{name: weight}``), keeping every component for logging."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from flowgrpo_core.rewards.base import Reward, RewardOutput


class MultiReward(Reward):
    """``r = sum_k w_k r_k``. ``details`` gets ``<name>/raw`` and ``<name>/weighted`` for each component."""

    name = "multi"

    def __init__(self, components: dict[str, tuple[Reward, float]]) -> None:
        if not components:
            raise ValueError("a multi-reward needs at least one component")
        self.components = components

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        total = np.zeros(len(images))
        details: dict[str, list] = {}
        for name, (reward, weight) in self.components.items():
            out = reward(images, prompts, metadata)
            total += weight * out.scores
            details[f"{name}/raw"] = out.scores.tolist()
            details[f"{name}/weighted"] = (weight * out.scores).tolist()
            for key, values in out.details.items():
                details[f"{name}/{key}"] = values
        return RewardOutput(scores=total, details=details)
