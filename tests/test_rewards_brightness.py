"""The brightness control reward on images of known luminance."""

from __future__ import annotations

import pytest
from PIL import Image

from flowgrpo_core.rewards import build_reward


def test_brightness_is_the_mean_luminance_in_unit_range():
    reward = build_reward("brightness")
    half = Image.new("RGB", (4, 4), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 4, 2))  # top half white
    images = [
        Image.new("RGB", (8, 8), (0, 0, 0)),
        Image.new("RGB", (8, 8), (255, 255, 255)),
        half,
        Image.new("RGB", (2, 2), (51, 51, 51)),
    ]
    scores = reward(images, ["x"] * 4).scores
    assert scores.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.2])
