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
    """``-size_kb``: rewards images that compress well (smooth, simple)."""

    name = "jpeg_compressibility"
    sign = -1.0

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        sizes = np.array([jpeg_size_kb(image) for image in images])
        return RewardOutput(scores=self.sign * sizes, details={"jpeg_kb": sizes.tolist()})


class JpegIncompressibility(JpegCompressibility):
    """``+size_kb``: rewards detailed, high-frequency images."""

    name = "jpeg_incompressibility"
    sign = 1.0
