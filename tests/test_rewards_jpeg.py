"""The JPEG rewards on flow_grpo's scales: compressibility -kB/500, incompressibility +kB."""

import io

import numpy as np
import pytest
from PIL import Image

from flowgrpo_core.rewards import build_reward


def _images():
    rng = np.random.default_rng(0)
    flat = Image.new("RGB", (64, 64), (120, 30, 200))
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return [flat, noisy]


def _kb(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_compressibility_is_minus_kilobytes_over_500_and_incompressibility_plus_kilobytes():
    images = _images()
    sizes = [_kb(im) for im in images]
    down = build_reward("jpeg_compressibility")(images, ["a", "b"])
    up = build_reward("jpeg_incompressibility")(images, ["a", "b"])
    assert down.scores.tolist() == pytest.approx([-s / 500 for s in sizes], rel=1e-12)
    assert up.scores.tolist() == pytest.approx(sizes, rel=1e-12)
    assert down.scores[0] > down.scores[1] and up.scores[0] < up.scores[1]  # the flat image compresses better
