"""The SDE step against closed forms: Gaussian log-density, the ODE limit, KL, and preserved marginals."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowgrpo_core.sde import (
    deterministic_step,
    gaussian_kl,
    kl_std,
    ode_step,
    sde_std_t,
    sde_step_with_logprob,
)


def _inputs(batch=3, shape=(4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g)
    v = torch.randn(batch, *shape, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.2])[:batch]
    sigma_next = torch.tensor([0.7, 0.45, 0.0])[:batch]
    return x, v, sigma, sigma_next


def test_log_prob_is_the_element_mean_of_the_gaussian_density():
    x, v, sigma, sigma_next = _inputs()
    step = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(1))
    expected = (
        Normal(step.prev_sample_mean, step.std.reshape(-1, 1, 1, 1))
        .log_prob(step.prev_sample)
        .flatten(1)
        .mean(1)
    )
    torch.testing.assert_close(step.log_prob, expected, rtol=1e-6, atol=1e-6)
    assert step.log_prob.shape == (3,)


def test_step_matches_the_formulas_of_algorithm_md():
    x, v, sigma, sigma_next = _inputs()
    a = 0.7
    step = sde_step_with_logprob(v, x, sigma, sigma_next, a, generator=torch.Generator().manual_seed(1))
    for b in range(3):
        s, sn = float(sigma[b]), float(sigma_next[b])
        dt = sn - s
        std_t = a * math.sqrt(s / (1 - s))
        mean = x[b] * (1 + std_t**2 / (2 * s) * dt) + v[b] * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        torch.testing.assert_close(step.prev_sample_mean[b], mean, rtol=1e-5, atol=1e-6)
        assert step.std[b].item() == pytest.approx(std_t * math.sqrt(-dt), rel=1e-6)


def test_scoring_an_existing_sample_reproduces_its_log_prob():
    x, v, sigma, sigma_next = _inputs()
    drawn = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(1))
    scored = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.log_prob, drawn.log_prob)


def test_zero_noise_level_gives_the_euler_ode_step():
    x, v, sigma, sigma_next = _inputs()
    step = sde_step_with_logprob(v, x, sigma, sigma_next, 0.0, prev_sample=torch.zeros_like(x))
    torch.testing.assert_close(step.prev_sample_mean, ode_step(v, x, sigma, sigma_next), rtol=0, atol=1e-6)
    tiny = sde_step_with_logprob(v, x, sigma, sigma_next, 1e-4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(tiny.prev_sample, ode_step(v, x, sigma, sigma_next), rtol=0, atol=1e-3)


def test_sigma_one_uses_the_next_sigma_in_the_denominator():
    std = sde_std_t(torch.tensor([1.0]), torch.tensor([0.8]), 0.7)
    assert std.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.8)))
    x, v = torch.randn(1, 8), torch.randn(1, 8)
    step = sde_step_with_logprob(
        v, x, torch.tensor([1.0]), torch.tensor([0.8]), 0.7, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(step.log_prob).all() and torch.isfinite(step.prev_sample).all()


def test_half_precision_inputs_are_computed_in_float32():
    x, v, sigma, sigma_next = _inputs()
    full = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=x * 0.9)
    half = sde_step_with_logprob(v.half(), x.half(), sigma, sigma_next, 0.7, prev_sample=(x * 0.9).half())
    assert half.log_prob.dtype == torch.float32 and half.prev_sample.dtype == torch.float32
    torch.testing.assert_close(half.log_prob, full.log_prob, rtol=1e-2, atol=1e-2)


def test_invalid_sigmas_are_rejected():
    x, v, sigma, _ = _inputs()
    with pytest.raises(ValueError, match="smaller"):
        sde_step_with_logprob(v, x, sigma, sigma, 0.7)
    with pytest.raises(ValueError, match="shape"):
        sde_step_with_logprob(v, x, sigma[:2], sigma[:2] - 0.1, 0.7)


def test_cps_variant():
    x, v, sigma, sigma_next = _inputs()
    a = 0.8
    step = sde_step_with_logprob(
        v, x, sigma, sigma_next, a, generator=torch.Generator().manual_seed(3), sde_type="cps"
    )
    std = sigma_next * math.sin(a * math.pi / 2)
    torch.testing.assert_close(step.std, std)
    s, sn = sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1)
    mean = (x - s * v) * (1 - sn) + (x + (1 - s) * v) * torch.sqrt(sn**2 - std.reshape(-1, 1, 1, 1) ** 2)
    torch.testing.assert_close(step.prev_sample_mean, mean)
    torch.testing.assert_close(step.log_prob, -((step.prev_sample - mean) ** 2).flatten(1).mean(1))


def _literal_step(v, x, sigma, sigma_next, a, sde_type, noise=None, prev=None):
    """The formulas of the docstring evaluated literally, term by term, on broadcast tensors: draws
    ``mean + std * noise``, or scores ``prev``."""
    s, sn = sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1)
    dt = sn - s
    if sde_type == "sde":
        std_t = a * torch.sqrt(s / (1 - torch.where(s >= 1, sn, s)))
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        std = std_t * torch.sqrt(-dt)
    else:
        std = sn * math.sin(a * math.pi / 2)
        mean = (x - s * v) * (1 - sn) + (x + (1 - s) * v) * torch.sqrt(torch.clamp(sn**2 - std**2, min=0))
    if prev is None:
        prev = mean + std * noise
    if sde_type == "sde":
        density = (
            -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
        )
    else:
        density = -((prev.detach() - mean) ** 2)
    return prev, density.flatten(1).mean(1), mean


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_step_is_bit_identical_to_the_literal_formulas_gradient_included(sde_type):
    x, v, _, sigma_next = _inputs()
    sigma = torch.tensor([1.0, 0.5, 0.2])  # sigma = 1 takes the sigma_next branch of std_t
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    prev, log_prob, mean = _literal_step(v, x, sigma, sigma_next, 0.7, sde_type, noise=noise)
    step = sde_step_with_logprob(
        v, x, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(5), sde_type=sde_type
    )
    assert torch.equal(step.prev_sample, prev) and torch.equal(step.prev_sample_mean, mean)
    assert torch.equal(step.log_prob, log_prob)
    # scoring a given sample (training), with the gradient through the velocity
    v_ours, v_literal = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    scored = sde_step_with_logprob(v_ours, x, sigma, sigma_next, 0.7, prev_sample=prev, sde_type=sde_type)
    _, literal, _ = _literal_step(v_literal, x, sigma, sigma_next, 0.7, sde_type, prev=prev)
    assert torch.equal(scored.log_prob, literal)
    scored.log_prob.sum().backward()
    literal.sum().backward()
    assert torch.equal(v_ours.grad, v_literal.grad)


def test_per_sample_generators_draw_what_randn_draws():
    x, v, sigma, sigma_next = _inputs()
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    step = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=gens)
    noise = torch.stack(
        [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    )
    assert torch.equal(step.prev_sample, step.prev_sample_mean + step.std.reshape(-1, 1, 1, 1) * noise)


def test_deterministic_step_outside_the_window():
    x, v, sigma, sigma_next = _inputs()
    assert torch.equal(deterministic_step(v, x, sigma, sigma_next, "sde"), ode_step(v, x, sigma, sigma_next))
    cps = deterministic_step(v, x, sigma, sigma_next, "cps")
    s, sn = sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1)
    # the CPS step at noise level 0: x0_hat (1 - sigma_next) + noise_hat sigma_next, the Euler step up to rounding
    assert torch.equal(cps, (x - s * v) * (1 - sn) + (x + (1 - s) * v) * torch.sqrt(sn**2))
    torch.testing.assert_close(cps, ode_step(v, x, sigma, sigma_next), rtol=0, atol=1e-5)
    assert torch.equal(
        cps,
        sde_step_with_logprob(v, x, sigma, sigma_next, 0.0, prev_sample=cps, sde_type="cps").prev_sample_mean,
    )


def test_kl_is_zero_for_identical_means_and_matches_the_closed_form():
    g = torch.Generator().manual_seed(4)
    m1, m2 = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0])
    assert torch.equal(gaussian_kl(m1, m1, std), torch.zeros(3))
    expected = (
        kl_divergence(Normal(m1, std.reshape(-1, 1, 1)), Normal(m2, std.reshape(-1, 1, 1))).flatten(1).mean(1)
    )
    torch.testing.assert_close(gaussian_kl(m1, m2, std), expected)


def test_kl_std_forms():
    sigma, sigma_next, step_std = torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.123])
    assert kl_std(sigma, sigma_next, 0.7, step_std, "exact").item() == pytest.approx(0.123)
    assert kl_std(sigma, sigma_next, 0.7, step_std, "reference").item() == pytest.approx(0.7)  # a*sqrt(.5/.5)
    assert kl_std(sigma, sigma_next, 0.7, step_std, "reference", sde_type="cps").item() == pytest.approx(
        0.123
    )


# ---- an analytic flow: Gaussian data, so the exact velocity is known in closed form ----

MU, S0 = 1.5, 0.5


def _exact_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[noise - x0 | x_sigma = x] for x0 ~ N(MU, S0^2), noise ~ N(0, 1), x_sigma = (1-sigma) x0 + sigma noise."""
    s = sigma.reshape(-1, 1)
    mean, var = (1 - s) * MU, (1 - s) ** 2 * S0**2 + s**2
    return -MU + (s - (1 - s) * S0**2) / var * (x - mean)


def _simulate(noise_level: float, steps: int = 200, n: int = 100_000):
    g = torch.Generator().manual_seed(0)
    sigmas = torch.linspace(1, 0, steps + 1)
    x = torch.randn(n, 1, generator=g)
    marginals = []
    for i in range(steps):
        s, sn = sigmas[i].expand(n), sigmas[i + 1].expand(n)
        x = sde_step_with_logprob(_exact_velocity(x, s), x, s, sn, noise_level, generator=g).prev_sample
        marginals.append((float(sigmas[i + 1]), x.mean().item(), x.var().item()))
    return marginals


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_sde_sampling_preserves_the_marginals_of_the_flow(noise_level):
    marginals = _simulate(noise_level)
    for sigma, mean, var in marginals[len(marginals) // 4 :]:  # after the sigma = 1 transient has relaxed
        exp_mean, exp_var = (1 - sigma) * MU, (1 - sigma) ** 2 * S0**2 + sigma**2
        assert mean == pytest.approx(exp_mean, abs=0.02), f"mean at sigma={sigma}"
        assert var == pytest.approx(exp_var, rel=0.04), f"variance at sigma={sigma}"
    _, final_mean, final_var = marginals[-1]
    assert final_mean == pytest.approx(MU, abs=0.01)
    assert math.sqrt(final_var) == pytest.approx(S0, rel=0.015)
