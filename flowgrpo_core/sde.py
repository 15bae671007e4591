"""The ODE -> SDE step of Flow-GRPO and the Gaussian quantities derived from it (docs/algorithm.md sect. 2, 4).

A rectified-flow model predicts the velocity ``v = noise - x0`` at noise level ``sigma``. The deterministic
sampler takes Euler steps ``x_next = x + v * dt`` with ``dt = sigma_next - sigma < 0``. Flow-GRPO swaps
each Euler step for one step of a reverse-time SDE whose marginals equal the ODE's, which makes every step
a Gaussian policy ``p(x_next | x) = N(mean, step_std^2 I)`` with a tractable log-density.

All functions compute in float32 whatever the input dtype: in half precision the ``1 / step_std^2`` term
overflows and the log-ratios of nearly identical policies lose all their digits.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

SDEType = Literal["sde", "cps"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SDEStep(NamedTuple):
    """Result of one stochastic step; unpacks as ``(prev_sample, log_prob, prev_sample_mean, std)``."""

    prev_sample: torch.Tensor  # (B, ...) float32: x_next
    log_prob: torch.Tensor  # (B,) float32: element-mean Gaussian log-density of x_next
    prev_sample_mean: torch.Tensor  # (B, ...) float32: mean of the step Gaussian
    std: torch.Tensor  # (B,) float32: standard deviation of the step Gaussian (``step_std``)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor so it broadcasts against ``like`` of shape (B, ...)."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _mean_over_elements(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): mean over every non-batch dimension."""
    return t.flatten(1).mean(dim=1)


def _check_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor, batch: int) -> None:
    if sigma.ndim != 1 or sigma_next.ndim != 1 or sigma.shape[0] != batch or sigma_next.shape[0] != batch:
        raise ValueError(
            f"sigma and sigma_next must have shape ({batch},), got {tuple(sigma.shape)} and {tuple(sigma_next.shape)}"
        )
    if not bool((sigma_next < sigma).all()):
        raise ValueError("every sigma_next must be smaller than its sigma (sampling runs from noise to data)")


def sde_std_t(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Diffusion coefficient ``std_t = a * sqrt(sigma / (1 - sigma))`` of the 'sde' variant.

    At ``sigma == 1`` the expression is infinite; the reference then uses the first sigma below 1 of the
    schedule, which is exactly ``sigma_next`` of that step.

    Args:
        sigma, sigma_next: (B,) noise levels of the current and the next step.
    Returns:
        (B,) float32.
    """
    sigma = sigma.float()
    denominator_sigma = torch.where(sigma >= 1, sigma_next.float(), sigma)
    return noise_level * torch.sqrt(sigma / (1 - denominator_sigma))


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sde_type: SDEType = "sde",
) -> SDEStep:
    """One reverse-SDE step from ``sigma`` to ``sigma_next`` and the log-density of its result.

    'sde' (Flow-GRPO, docs/algorithm.md sect. 2), with ``dt = sigma_next - sigma``::

        std_t    = a * sqrt(sigma / (1 - sigma))
        mean     = x * (1 + std_t^2 / (2 sigma) * dt) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
        step_std = std_t * sqrt(-dt)

    'cps' (coefficient-preserving sampling): ``step_std = sigma_next * sin(a pi / 2)`` and the mean
    re-noises the predicted x0 so that the total noise variance stays ``sigma_next^2``; its log-prob keeps
    only the quadratic term ``-(x_next - mean)^2``, as the reference does.

    With ``noise_level = 0`` the 'sde' mean is exactly the Euler ODE step and the 'cps' mean is the
    deterministic CPS step (:func:`deterministic_step`).

    The per-sample factors are computed once on (B, 1, ...) tensors and the latent-sized arithmetic runs
    in place where autograd allows it; the operations and their order are those of the formulas above, so
    the result is bit-identical to evaluating them literally (tested).

    Args:
        velocity: (B, ...) the model's velocity prediction at (sample, sigma), after CFG.
        sample: (B, ...) x at ``sigma``.
        sigma, sigma_next: (B,) per-sample noise levels, ``sigma_next < sigma``.
        noise_level: ``a`` in the formulas (config ``sampling.noise_level``).
        prev_sample: (B, ...) an existing x_next to score instead of drawing one (training).
        generator: RNG (or one per sample) for the noise when ``prev_sample`` is None.
        sde_type: 'sde' (Flow-GRPO) or 'cps'.
    Returns:
        ``SDEStep(prev_sample, log_prob (B,), prev_sample_mean, std (B,))``, all float32. ``log_prob`` is
        the mean over all latent elements of the Gaussian log-density, not the sum.
    """
    _check_sigmas(sigma, sigma_next, sample.shape[0])
    velocity, sample = velocity.float(), sample.float()
    mean, step_std = _step_mean(velocity, sample, sigma.float(), sigma_next.float(), noise_level, sde_type)

    if prev_sample is None:
        prev_sample = _randn_like(mean, generator).mul_(step_std).add_(mean)
    prev_sample = prev_sample.float()

    # The sample is a constant of the policy: gradients flow through the mean only. Every in-place
    # operation below acts on a fresh tensor that no backward formula saves.
    log_density = prev_sample.detach() - mean
    log_density = log_density * log_density
    if sde_type == "sde":
        # -(r^2) / (2 s^2) == r^2 / -(2 s^2) exactly: a sign flip is exact in IEEE arithmetic
        log_density = log_density.div_(-(2 * step_std**2)).sub_(torch.log(step_std)).sub_(_LOG_SQRT_2PI)
    else:
        log_density = log_density.neg_()
    return SDEStep(prev_sample, _mean_over_elements(log_density), mean, step_std.flatten())


def _step_mean(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    sde_type: SDEType,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step Gaussian's mean (B, ...) and std (B, 1, ...) in float32; inputs already float32."""
    s, s_next = _per_sample(sigma, sample), _per_sample(sigma_next, sample)
    dt = s_next - s
    if sde_type == "sde":
        std_t = _per_sample(sde_std_t(sigma, sigma_next, noise_level), sample)
        var_t = std_t**2
        x_factor = 1 + var_t / (2 * s) * dt
        v_factor = 1 + var_t * (1 - s) / (2 * s)
        # x * x_factor + (v * v_factor) * dt, in that order
        mean = (velocity * v_factor).mul_(dt).add_(sample * x_factor)
        return mean, std_t * torch.sqrt(-dt)
    if sde_type == "cps":
        step_std = s_next * math.sin(noise_level * math.pi / 2)
        x0_hat = sample - s * velocity
        noise_hat = sample + (1 - s) * velocity
        noise_scale = torch.sqrt(torch.clamp(s_next**2 - step_std**2, min=0))
        mean = (x0_hat * (1 - s_next)).add_(noise_hat * noise_scale)
        return mean, step_std
    raise ValueError(f"unknown sde_type {sde_type!r}; expected 'sde' or 'cps'")


def deterministic_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sde_type: SDEType = "sde",
) -> torch.Tensor:
    """The noise-free step a roll-out takes outside a Flow-GRPO-Fast window.

    For 'sde' it is the Euler ODE step (:func:`ode_step`). For 'cps' it is the CPS step at noise level 0,
    ``x0_hat * (1 - sigma_next) + noise_hat * sigma_next``, as the reference samples outside its window;
    mathematically the Euler step too, but rounded differently (about 5e-7 per step).

    Args:
        velocity, sample: (B, ...).
        sigma, sigma_next: (B,).
    Returns:
        (B, ...) float32.
    """
    if sde_type == "sde":
        return ode_step(velocity, sample, sigma, sigma_next).float()
    _check_sigmas(sigma, sigma_next, sample.shape[0])
    mean, _ = _step_mean(velocity.float(), sample.float(), sigma.float(), sigma_next.float(), 0.0, sde_type)
    return mean


def _randn_like(t: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``t``; with one generator per sample each row is drawn from its own
    generator (so a sample's noise does not depend on the batch it was drawn in), written in place."""
    if isinstance(generator, list):
        if t.device.type == "cpu" and all(g.device.type == "cpu" for g in generator):
            out = torch.empty(t.shape, dtype=t.dtype)
            for row, g in zip(out, generator):
                row.normal_(generator=g)  # what torch.randn(row.shape, generator=g) draws
            return out
        return torch.stack(
            [
                torch.randn(t.shape[1:], generator=g, device=g.device, dtype=t.dtype).to(t.device)
                for g in generator
            ]
        )
    device = generator.device if generator is not None else t.device
    return torch.randn(t.shape, generator=generator, device=device, dtype=t.dtype).to(t.device)


def ode_step(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """Euler step of the probability-flow ODE: ``x + v * (sigma_next - sigma)``.

    Args:
        velocity, sample: (B, ...).
        sigma, sigma_next: (B,).
    Returns:
        (B, ...) in the dtype of ``sample``; the arithmetic is float32.
    """
    dt = _per_sample(sigma_next.float() - sigma.float(), sample)
    return (sample.float() + velocity.float() * dt).to(sample.dtype)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) per latent element, averaged like the log-prob.

    For two Gaussians with the same covariance the KL is ``||mean_p - mean_q||^2 / (2 std^2)``; dividing
    by the number of elements puts it on the scale of the element-mean log-prob.

    Args:
        mean_p, mean_q: (B, ...) step means of the policy and the reference model.
        std: (B,) the common standard deviation.
    Returns:
        (B,) float32.
    """
    diff_sq = (mean_p.float() - mean_q.float()) ** 2
    return _mean_over_elements(diff_sq) / (2 * std.float() ** 2)


def kl_std(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    step_std: torch.Tensor,
    form: Literal["exact", "reference"],
    sde_type: SDEType = "sde",
) -> torch.Tensor:
    """The std used in the KL penalty (docs/algorithm.md sect. 4).

    'exact' is the std of the step Gaussians, ``step_std``. 'reference' reproduces flow_grpo, which divides
    by ``std_t`` (without the ``sqrt(-dt)`` factor) for the 'sde' variant; for 'cps' both are the same.

    Args:
        sigma, sigma_next, step_std: (B,).
    Returns:
        (B,) float32.
    """
    if form == "exact" or sde_type == "cps":
        return step_std.float()
    if form == "reference":
        return sde_std_t(sigma, sigma_next, noise_level)
    raise ValueError(f"unknown KL form {form!r}; expected 'exact' or 'reference'")
