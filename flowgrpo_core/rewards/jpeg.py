"""JPEG (in)compressibility: the ddpo-pytorch toy rewards, cheap and meaningful on any image."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from flowgrpo_core.rewards.base import Reward, RewardOutput

JPEG_QUALITY = 95


def jpeg_size_kb(image: Image.Image, quality: int = JPEG_QUALITY) -> float:
    """Size in kB (1000 bytes) of the image saved as JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibility(Reward):
    """``-size_kb / 500``: rewards images that compress well (smooth, simple).

    The 1/500 is flow_grpo's scale for this reward (ddpo-pytorch used ``-size_kb``); it matters only in a
    weighted mix of rewards, where it sets this term's share.
    """

    name = "jpeg_compressibility"
    factor = -1.0 / 500

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        sizes = np.array([jpeg_size_kb(image) for image in images])
        return RewardOutput(scores=self.factor * sizes, details={"jpeg_kb": sizes.tolist()})


class JpegIncompressibility(JpegCompressibility):
    """``+size_kb``: rewards detailed, high-frequency images (unscaled, as in flow_grpo)."""

    name = "jpeg_incompressibility"
    factor = 1.0
