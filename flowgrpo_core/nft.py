"""DiffusionNFT's objective (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process";
docs/algorithm.md sect. 11), as pure functions.

Instead of likelihood ratios of SDE steps, NFT regresses on the policy's own clean samples. A clean sample
``x0`` is noised by the forward process, ``x_t = (1 - t) x0 + t eps``, and two implicit policies built from
the old (sampling) policy ``v_old`` and the trained one ``v_theta`` are pulled towards it:

    v+ = (1 - beta) v_old + beta v_theta        the positive policy, trained on samples the reward liked
    v- = (1 + beta) v_old - beta v_theta        the negative policy, trained on the others

with weights ``r`` and ``1 - r``, where ``r`` in [0, 1] is the sample's optimality probability from its
group-normalised reward. At ``v_theta = v_old`` both equal ``v_old``; moving ``v_theta`` to fit the good
samples with ``v+`` moves ``v-`` the other way, away from the bad ones. Each policy is judged by its clean-image
prediction ``x0_hat = x_t - t v`` with an adaptive weight (the error's own mean absolute value, held
constant), and the sum is scaled by ``adv_clip_max / beta`` as the authors' code does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """``r = clip(A, -c, c) / (2 c) + 1/2``, clamped to [0, 1]: 1 for the best samples of a group, 1/2 for an
    average one, 0 for the worst.

    Args:
        advantages: (B,) group-normalised rewards (``flowgrpo_core.advantages``).
        adv_clip_max: c, where advantages are clipped.
    Returns:
        (B,) float32.
    """
    c = float(adv_clip_max)
    clipped = advantages.float().clamp(-c, c)
    return (clipped / c / 2.0 + 0.5).clamp(0.0, 1.0)


def forward_noising(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The rectified-flow forward process ``x_t = (1 - t) x0 + t eps``.

    Args:
        x0: (B, *latent) clean samples; noise: (B, *latent) standard normal; t: (B,) noise levels in [0, 1].
    Returns:
        (B, *latent) float32.
    """
    t = _per_sample(t.float(), x0)
    return (1.0 - t) * x0.float() + t * noise.float()


def implicit_policies(
    v_theta: torch.Tensor, v_old: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative implicit velocities ``(v+, v-)``; ``v_old`` carries no gradient.

    Args:
        v_theta: (B, *latent) the trained policy's velocity (with graph); v_old: (B, *latent) the old policy's.
        beta: the guidance strength.
    Returns:
        two (B, *latent) tensors: ``(1 - beta) v_old + beta v_theta`` and ``(1 + beta) v_old - beta v_theta``.
    """
    v_old = v_old.detach()
    positive = beta * v_theta + (1.0 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v_theta
    return positive, negative


def adaptive_x0_loss(
    x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``mean((x0_hat - x0)^2) / w`` with ``x0_hat = x_t - t v`` and the adaptive weight
    ``w = max(mean |x0_hat - x0|, 1e-5)``, computed in float64 and held constant (no gradient), so every sample
    contributes a gradient of comparable size whatever its noise level.

    Since ``x0_hat - x0 = t (v - (eps - x0))``, this is flow matching towards ``x0`` with the per-sample weight
    ``t^2 / w``.

    Args:
        x_t: (B, *latent); t: (B,); velocity: (B, *latent) with graph; x0: (B, *latent) the clean samples.
    Returns:
        (B,) float32.
    """
    error = x_t.float() - _per_sample(t.float(), x_t) * velocity.float() - x0.float()
    with torch.no_grad():
        weight = error.double().abs().flatten(1).mean(dim=1).clamp(min=1e-5)
    return (error.pow(2).flatten(1).mean(dim=1) / weight).float()


class NFTLoss(NamedTuple):
    """Per-sample terms of the NFT loss; ``loss`` carries the graph."""

    loss: torch.Tensor  # (B,) (r L+ + (1 - r) L-) * adv_clip_max / beta
    positive: torch.Tensor  # (B,) L+: the positive policy's adaptive x0 loss
    negative: torch.Tensor  # (B,) L-: the negative policy's


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    adv_clip_max: float,
) -> NFTLoss:
    """The reward-weighted loss over the two implicit policies::

        L = (r L(v+) + (1 - r) L(v-)) * c / beta,   L(v) = adaptive_x0_loss(x_t, t, v, x0)

    The factor ``c / beta`` (c = ``adv_clip_max``) is the authors' scale: at ``v_theta = v_old`` the gradient
    with respect to ``v_theta`` is ``(2 r - 1) c grad L(v_old)`` for every beta.

    Args:
        v_theta, v_old: (B, *latent) velocities at ``x_t``; x_t, x0: (B, *latent); t: (B,); r: (B,) in [0, 1].
    Returns:
        NFTLoss of (B,) tensors.
    """
    positive, negative = implicit_policies(v_theta, v_old, beta)
    l_pos = adaptive_x0_loss(x_t, t, positive, x0)
    l_neg = adaptive_x0_loss(x_t, t, negative, x0)
    r = r.float()
    loss = (r * l_pos + (1.0 - r) * l_neg) / beta * adv_clip_max
    return NFTLoss(loss, l_pos.detach(), l_neg.detach())


def old_policy_decay(step: int, flat_steps: int, rate: float, max_decay: float) -> float:
    """The decay ``d`` of the old policy's soft update ``old <- d old + (1 - d) theta`` after ``step`` optimiser
    steps: 0 (the old policy becomes the current one) for the first ``flat_steps``, then rising linearly by
    ``rate`` per step up to ``max_decay``. The authors' schedules: (0, 0.001, 0.5) for GenEval and PickScore,
    (75, 0.0075, 0.999) for OCR."""
    if step < flat_steps:
        return 0.0
    return min((step - flat_steps) * rate, max_decay)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))
