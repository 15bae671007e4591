"""Mean brightness: a control reward that any policy can move, to check that a training set-up learns at all."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from flowgrpo_core.rewards.base import Reward, RewardOutput


class Brightness(Reward):
    """Mean luminance (PIL's ``L``) in [0, 1]. A set-up that cannot raise this has a bug, not a hard reward."""

    name = "brightness"

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        return RewardOutput(
            scores=np.array([np.asarray(im.convert("L"), dtype=np.float64).mean() / 255 for im in images])
        )
