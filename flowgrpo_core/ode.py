"""Noise-free roll-out steps besides Euler: the second-order multistep DPM-Solver++ (2M) that DiffusionNFT samples
with (docs/algorithm.md sect. 11), written for rectified flow, where ``x_sigma = (1 - sigma) x0 + sigma eps``.

The solver works on the model's clean-image prediction ``x0_hat = x - sigma v`` and the half-log-SNR
``lambda(sigma) = log((1 - sigma) / sigma)``. Its first step, and the last (to sigma = 0), are first order,
which for rectified flow is exactly the Euler step; the others add a correction from the previous step's
``x0_hat``. As in the authors' code, a previous step at sigma = 1 (lambda = -inf) makes that correction 0.
"""

from __future__ import annotations

import torch

ODE_SOLVERS = ("euler", "dpm2")


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def clean_prediction(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x0_hat = x - sigma v``: (B, *latent) float32 from (B, *latent) velocity and sample and (B,) sigma."""
    return sample.float() - _per_sample(sigma.float(), sample) * velocity.float()


def first_order_step(
    x0_hat: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """The DDIM (first-order) step ``x_next = (1 - s') x0_hat + s' eps_hat`` with
    ``eps_hat = (x - (1 - s) x0_hat) / s``; for rectified flow, the Euler step ``x + (s' - s) v``.

    Args:
        x0_hat, sample: (B, *latent); sigma, sigma_next: (B,) with sigma > 0.
    Returns:
        (B, *latent) float32.
    """
    s, s_next = sigma.double(), sigma_next.double()
    keep = _per_sample((s_next / s).float(), sample)
    from_x0 = _per_sample(((1 - s_next) - s_next * (1 - s) / s).float(), sample)
    return keep * sample.float() + from_x0 * x0_hat


def dpm2_step(
    x0_hat: torch.Tensor,
    previous_x0_hat: torch.Tensor,
    sample: torch.Tensor,
    sigma_previous: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """One multistep DPM-Solver++(2M) step from ``sigma`` to ``sigma_next`` (both in (0, 1)), using this step's
    and the previous step's clean predictions::

        h = lambda(s') - lambda(s),  r = (lambda(s) - lambda(s_prev)) / h
        D = x0_hat + (x0_hat - x0_hat_prev) / (2 r)
        x_next = (s' / s) x - (1 - s') (exp(-h) - 1) D

    Args:
        x0_hat, previous_x0_hat, sample: (B, *latent); sigma_previous, sigma, sigma_next: (B,).
    Returns:
        (B, *latent) float32.
    """

    def half_log_snr(s: torch.Tensor) -> torch.Tensor:
        return torch.log(1 - s) - torch.log(s)

    s_prev, s, s_next = sigma_previous.double(), sigma.double(), sigma_next.double()
    h = half_log_snr(s_next) - half_log_snr(s)
    inverse_r = h / (half_log_snr(s) - half_log_snr(s_prev))  # 0 when s_prev = 1: lambda = -inf
    correction = _per_sample((0.5 * inverse_r).float(), sample) * (x0_hat - previous_x0_hat)
    keep = _per_sample((s_next / s).float(), sample)
    scale = _per_sample(((1 - s_next) * (torch.exp(-h) - 1)).float(), sample)
    return keep * sample.float() - scale * (x0_hat + correction)
