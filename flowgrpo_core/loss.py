"""The clipped GRPO objective with a KL penalty, and GRPO-Guard's corrections (docs/algorithm.md sect. 4, 6).

All inputs are per (sample, step): the trainer calls this once per trained timestep with a micro-batch of
B samples, each possibly at a different step of its trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from flowgrpo_core.sde import gaussian_kl


@dataclass
class LossOutput:
    """``loss`` carries the graph; the rest are detached scalars for logging."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    ratio: torch.Tensor  # (B,) per-sample ratios, for per-timestep statistics

    def metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "policy_loss": float(self.policy_loss),
            "kl": float(self.kl),
            "clipfrac": float(self.clipfrac),
            "approx_kl": float(self.approx_kl),
            "ratio_mean": float(self.ratio_mean),
            "ratio_min": float(self.ratio_min),
            "ratio_max": float(self.ratio_max),
        }


RatioNormBias = Literal["batch", "sample"]


def log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    ratio_norm: bool = False,
    mean: torch.Tensor | None = None,
    old_mean: torch.Tensor | None = None,
    std_t: torch.Tensor | None = None,
    sqrt_dt: torch.Tensor | None = None,
    bias: RatioNormBias = "batch",
) -> torch.Tensor:
    """``log(pi_new / pi_old)`` of the sampled step, optionally with GRPO-Guard's RatioNorm.

    For Gaussian steps with equal std ``s = std_t * sqrt(-dt)`` the log-ratio of a sample
    ``x = mean_old + s * eps`` is ``eps . d / s - ||d||^2 / (2 s^2)`` (element means,
    ``d = mean_new - mean_old``). The second term is always negative, which shifts the ratio below 1, and
    the first scales as ``1 / s``, so low-noise steps get wide ratio distributions. RatioNorm adds the
    quadratic term back and multiplies by ``s``. Two forms of the added term:

    - ``bias='sample'``: per sample, ``(logp_new - logp_old + ||d_b||^2 / (2 s_b^2)) * s_b``. This
      removes each sample's own shift, leaving exactly ``eps . d``.
    - ``bias='batch'`` (what the official GRPO-Guard script computes): one number for the whole
      micro-batch, ``s = mean(sqrt(-dt)) * mean(std_t)`` and ``bias = mean over samples and elements of
      d^2 / (2 s^2)``; then ``(logp_new - logp_old + bias) * s``. The official code reduces a 1-D tensor
      over ``dim=()``, which averages over the batch too; its published results come from this form.

    Args:
        log_prob, old_log_prob: (B,) element-mean step log-probs under the current and the sampling policy.
        ratio_norm: apply RatioNorm; then ``mean``, ``old_mean`` (B, ...), ``std_t`` (B,) (the SDE's
            diffusion coefficient, :func:`flowgrpo_core.sde.sde_std_t`) and ``sqrt_dt`` (B,) are needed.
        bias: 'batch' or 'sample', see above.
    Returns:
        (B,) float32.
    """
    delta = log_prob.float() - old_log_prob.float()
    if not ratio_norm:
        return delta
    if mean is None or old_mean is None or std_t is None or sqrt_dt is None:
        raise ValueError("RatioNorm needs the current and old step means, std_t and sqrt(-dt)")
    if bias == "sample":
        step_std = std_t.float() * sqrt_dt.float()
        return (delta + gaussian_kl(mean, old_mean, step_std)) * step_std
    if bias == "batch":
        scale = sqrt_dt.float().mean() * std_t.float().mean()
        shift = (mean.float() - old_mean.float()).pow(2).mean() / (2 * scale**2)
        return (delta + shift) * scale
    raise ValueError(f"unknown RatioNorm bias form {bias!r}; expected 'batch' or 'sample'")


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float | tuple[float, float],
    beta: float = 0.0,
    kl: torch.Tensor | None = None,
    ratio_norm: bool = False,
    mean: torch.Tensor | None = None,
    old_mean: torch.Tensor | None = None,
    std_t: torch.Tensor | None = None,
    sqrt_dt: torch.Tensor | None = None,
    ratio_norm_bias: RatioNormBias = "batch",
    step_weight: torch.Tensor | None = None,
) -> LossOutput:
    """PPO-style clipped surrogate plus ``beta * KL``::

        ratio  = exp(logp_new - logp_old)
        L_clip = mean( max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)) * w )
        L      = L_clip + beta * mean(KL)

    ``w`` is 1, or GRPO-Guard's gradient reweight ``1 / (-dt)`` of each sample's step. With an asymmetric band,
    ``eps_high`` bounds how far a step may raise the probability of a sample with A > 0, and ``eps_low`` how
    far it may lower that of a sample with A < 0.

    Args:
        log_prob: (B,) step log-prob under the current policy (with graph).
        old_log_prob: (B,) the same step's log-prob recorded when sampling.
        advantages: (B,) clipped group-relative advantages.
        clip_range: ``eps`` (the band ``[1 - eps, 1 + eps]``), or ``(eps_low, eps_high)``.
        beta: KL coefficient; ``kl`` (B,) must be given when ``beta > 0``.
        ratio_norm, mean, old_mean, std_t, sqrt_dt, ratio_norm_bias: see :func:`log_ratio`.
        step_weight: (B,) per-sample weight of the policy term, or None.
    Returns:
        LossOutput with the scalar loss and detached statistics.
    """
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs the KL to the reference model")
    lr = log_ratio(log_prob, old_log_prob, ratio_norm, mean, old_mean, std_t, sqrt_dt, ratio_norm_bias)
    ratio = torch.exp(lr)
    low, high = clip_range if isinstance(clip_range, tuple) else (clip_range, clip_range)
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    per_sample = torch.maximum(unclipped, clipped)
    if step_weight is not None:
        per_sample = per_sample * step_weight.float()
    policy_loss = per_sample.mean()

    kl_mean = kl.float().mean() if kl is not None else torch.zeros((), device=policy_loss.device)
    loss = policy_loss + beta * kl_mean if beta > 0 else policy_loss

    with torch.no_grad():
        raw_delta = log_prob.detach().float() - old_log_prob.float()
        return LossOutput(
            loss=loss,
            policy_loss=policy_loss.detach(),
            kl=kl_mean.detach(),
            clipfrac=((ratio.detach() - 1.0 > high) | (1.0 - ratio.detach() > low)).float().mean(),
            approx_kl=0.5 * (raw_delta**2).mean(),
            ratio_mean=ratio.detach().mean(),
            ratio_min=ratio.detach().min(),
            ratio_max=ratio.detach().max(),
            ratio=ratio.detach(),
        )


def guard_step_weight(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's gradient reweight ``1 / (-dt)`` per sample.

    After RatioNorm the gradient of a step's log-ratio with respect to the velocity scales with ``-dt``;
    dividing by it gives every noise level the same weight.

    Args:
        sigma, sigma_next: (B,).
    Returns:
        (B,) float32.
    """
    return 1.0 / (sigma.float() - sigma_next.float())


LOGGED = ("loss", "policy_loss", "kl", "clipfrac", "approx_kl", "ratio_mean")


def loss_statistics(
    parts: list[tuple[dict[str, float], int, dict[int, list[float]]]], logged: tuple[str, ...] = LOGGED
) -> dict[str, float]:
    """An epoch's training statistics from every rank's share: ``(sums, count, ratios)`` per rank, where
    ``sums[k]`` adds :meth:`LossOutput.metrics` ``[k]`` weighted by the samples of each term, ``count`` the
    samples, and ``ratios`` each trained step's ratios. Means are per sample over all ranks; the ratio's
    min, max and mean per step are over every term. ``logged``: the objective's statistics; one without
    likelihood ratios (DiffusionNFT) logs no ratio statistics.
    """
    total = sum(count for _, count, _ in parts)
    metrics = {
        f"train/{k}": sum(s.get(k, 0.0) for s, _, _ in parts) / total if total else 0.0 for k in logged
    }
    if "ratio_mean" not in logged:
        return metrics
    ratios: dict[int, list[float]] = {}
    for _, _, steps in parts:
        for j, values in steps.items():
            ratios.setdefault(j, []).extend(values)
    every = [r for values in ratios.values() for r in values]
    metrics["train/ratio_min"] = min(every) if every else 0.0
    metrics["train/ratio_max"] = max(every) if every else 0.0
    for j, values in sorted(ratios.items()):
        metrics[f"train/ratio_mean/step_{j}"] = float(np.mean(values))
    return metrics
