"""The gradient noise scale against hand-computed values and synthetic gradients of known signal and noise."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrpo_core.noise_scale import gradient_noise_scale


def test_closed_form_on_three_gradients():
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    scale = gradient_noise_scale(grads, batch_images=4)
    assert scale.signal == pytest.approx(2 / 3)  # pair dots 0, 1, 1
    assert scale.total == pytest.approx(4 / 3)  # norms^2 1, 1, 2
    assert scale.noise == pytest.approx(2 / 3) and scale.cosine == pytest.approx(0.5)
    # leave-one-out pair means: 1, 1, 0 -> jackknife sqrt(2/3 * (2 * (1/3)^2 + (2/3)^2))
    assert scale.signal_se == pytest.approx(math.sqrt(2 / 3 * (2 / 9 + 4 / 9)))


def test_recovers_a_known_noise_scale():
    # G with |G|^2 = 1; per-image covariance 0.02 I in 500 dims: tr(Sigma) = 10, so B_noise = 10 images
    gen = torch.Generator().manual_seed(0)
    dims, per_image_var, batch = 500, 0.02, 10
    true = torch.zeros(dims)
    true[0] = 1.0
    grads = true + torch.randn(300, dims, generator=gen) * math.sqrt(per_image_var / batch)
    scale = gradient_noise_scale(grads, batch_images=batch)
    assert scale.detected
    assert scale.signal == pytest.approx(1.0, abs=3 * scale.signal_se) and scale.signal_se < 0.1
    assert scale.images == pytest.approx(10.0, rel=0.15)
    assert scale.images_lower_bound < scale.images


def test_pure_noise_is_not_mistaken_for_signal():
    gen = torch.Generator().manual_seed(1)
    scale = gradient_noise_scale(torch.randn(8, 2000, generator=gen), batch_images=64)
    assert not scale.detected and scale.images == math.inf
    assert abs(scale.cosine) < 0.05


def test_needs_three_batches():
    with pytest.raises(ValueError, match="n >= 3"):
        gradient_noise_scale(torch.zeros(2, 5), batch_images=1)
