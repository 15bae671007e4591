"""How much of a policy-gradient step is signal: the gradient noise scale (McCandlish et al. 2018,
"An Empirical Model of Large-Batch Training").

Each of n independent batches of N images gives a gradient ``g_i = G + noise_i`` with
``E|noise_i|^2 = tr(Sigma) / N``, where G is the true gradient and Sigma the per-image covariance. Then

    mean_{i != j} g_i . g_j      is an unbiased estimate of |G|^2,
    mean_i |g_i|^2               estimates |G|^2 + tr(Sigma) / N,
    B_noise = tr(Sigma) / |G|^2  the batch (in images) at which signal and noise weigh the same.

A step from far fewer than ``B_noise`` images is mostly noise: a small learning rate then averages it out only
over many steps, a large one moves the policy at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseScale:
    signal: float  # |G|^2, unbiased; negative when the noise hides it
    signal_se: float  # jackknife standard error of ``signal`` over the batches
    total: float  # mean |g_i|^2
    batch_images: int  # N

    @property
    def noise(self) -> float:
        """tr(Sigma) / N: the noise energy of one batch's gradient."""
        return self.total - self.signal

    @property
    def cosine(self) -> float:
        """Expected cosine between two batches' gradients: |G|^2 / E|g|^2 (0: pure noise, 1: no noise)."""
        return self.signal / self.total if self.total > 0 else 0.0

    @property
    def detected(self) -> bool:
        """Whether the signal is more than two standard errors above zero."""
        return self.signal > 2 * self.signal_se

    @property
    def images(self) -> float:
        """B_noise = tr(Sigma) / |G|^2 in images; infinite when no signal is detected."""
        return self.batch_images * self.noise / self.signal if self.detected else math.inf

    @property
    def images_lower_bound(self) -> float:
        """B_noise with the signal at its estimate plus two standard errors: the noise scale is at least this."""
        upper = self.signal + 2 * self.signal_se
        return self.batch_images * (self.total - upper) / upper if upper > 0 else math.inf


def _mean_pair_dot(grads: torch.Tensor) -> float:
    n = grads.shape[0]
    gram = grads @ grads.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def gradient_noise_scale(grads: torch.Tensor, batch_images: int) -> NoiseScale:
    """The noise scale from independent batch gradients.

    Args:
        grads: (n, P) gradients of n >= 3 independent batches at the same weights, float64 preferred.
        batch_images: N, images behind each gradient.
    """
    if grads.ndim != 2 or grads.shape[0] < 3:
        raise ValueError(f"need (n >= 3, P) batch gradients, got shape {tuple(grads.shape)}")
    grads = grads.double()
    n = grads.shape[0]
    signal = _mean_pair_dot(grads)
    leave_one_out = torch.tensor([_mean_pair_dot(torch.cat([grads[:k], grads[k + 1 :]])) for k in range(n)])
    signal_se = math.sqrt((n - 1) / n * float(((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    total = float((grads**2).sum(dim=1).mean())
    return NoiseScale(signal, signal_se, total, batch_images)
