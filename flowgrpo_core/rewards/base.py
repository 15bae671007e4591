"""The reward interface: a batch of images and their prompts in, one score per image out.

Every reward, in-process or behind an HTTP server, has this shape, so the trainer, the calibration stage
and the evaluator never need to know where a score comes from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class RewardOutput:
    """Scores of one batch.

    ``details`` holds per-image side values worth logging (each a list of length B), e.g. the text an OCR
    engine read, or the raw and weighted components of a multi-reward.
    """

    scores: np.ndarray  # (B,) float64
    details: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        for key, values in self.details.items():
            if len(values) != len(self.scores):
                raise ValueError(
                    f"reward detail {key!r} has {len(values)} values for {len(self.scores)} scores"
                )


class Reward(ABC):
    """A reward function ``r(image, prompt, metadata) -> float``, evaluated on batches."""

    name: str = "reward"

    @abstractmethod
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        """Score a batch.

        Args:
            images: B RGB images.
            prompts: B prompts (the text the image was generated from).
            metadata: B dicts of prompt metadata (e.g. GenEval tags); empty dicts when there is none.
        Returns:
            RewardOutput with B scores.
        """

    def __call__(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> RewardOutput:
        if metadata is None:
            metadata = [{} for _ in prompts]
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(
                f"reward {self.name!r}: got {len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata"
            )
        out = self.score(images, prompts, metadata)
        if len(out.scores) != len(images):
            raise RuntimeError(
                f"reward {self.name!r} returned {len(out.scores)} scores for {len(images)} images"
            )
        return out
