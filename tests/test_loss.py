"""The clipped GRPO objective and GRPO-Guard against hand-computed values."""

import pytest
import torch

from flowgrpo_core.loss import grpo_loss, guard_step_weight, log_ratio
from flowgrpo_core.sde import sde_step_with_logprob


def test_at_ratio_one_the_gradient_is_the_plain_policy_gradient():
    torch.manual_seed(0)
    theta = torch.randn(4, 3, requires_grad=True)
    features = torch.randn(4, 3)
    advantages = torch.tensor([1.0, -2.0, 0.5, 0.0])
    log_prob = (theta * features).sum(1)
    out = grpo_loss(log_prob, log_prob.detach(), advantages, clip_range=1e-4)
    (grad,) = torch.autograd.grad(out.loss, theta)
    log_prob2 = (theta * features).sum(1)
    (expected,) = torch.autograd.grad(-(advantages * log_prob2).mean(), theta)
    torch.testing.assert_close(grad, expected)
    assert out.ratio_mean.item() == 1.0 and out.ratio_min.item() == 1.0 and out.ratio_max.item() == 1.0
    assert out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0


@pytest.mark.parametrize(
    ("ratio", "advantage", "clipped"),
    [
        (1.0 + 0.9e-3, 1.0, False),  # inside the band
        (1.0 + 1.1e-3, 1.0, True),  # above 1+eps with A > 0: clipped
        (1.0 - 1.1e-3, 1.0, False),  # below 1-eps with A > 0: the unclipped term is the max
        (1.0 - 1.1e-3, -1.0, True),  # below 1-eps with A < 0: clipped
        (1.0 + 1.1e-3, -1.0, False),  # above 1+eps with A < 0: unclipped
    ],
)
def test_clip_engages_exactly_outside_the_band(ratio, advantage, clipped):
    eps = 1e-3
    new = torch.tensor([0.0], requires_grad=True)
    old = -torch.log(torch.tensor([ratio]))
    out = grpo_loss(new, old, torch.tensor([advantage]), clip_range=eps)
    (grad,) = torch.autograd.grad(out.loss, new)
    assert (grad.abs().item() == 0.0) is clipped
    if not clipped:
        assert grad.item() == pytest.approx(-advantage * ratio, rel=1e-5)
    assert out.clipfrac.item() == float(abs(ratio - 1) > eps)
    expected = max(-advantage * ratio, -advantage * min(max(ratio, 1 - eps), 1 + eps))
    assert out.policy_loss.item() == pytest.approx(expected, rel=1e-6)


def test_loss_value_kl_term_and_statistics():
    new = torch.tensor([0.1, -0.2, 0.0])
    old = torch.tensor([0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, 2.0, -1.0])
    kl = torch.tensor([0.5, 1.0, 1.5])
    out = grpo_loss(new, old, adv, clip_range=0.05, beta=0.1, kl=kl)
    r = torch.exp(new)
    terms = torch.maximum(-adv * r, -adv * r.clamp(0.95, 1.05))
    assert out.policy_loss.item() == pytest.approx(terms.mean().item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(terms.mean().item() + 0.1 * 1.0, rel=1e-6)
    assert out.kl.item() == pytest.approx(1.0)
    assert out.approx_kl.item() == pytest.approx(0.5 * (0.01 + 0.04) / 3, rel=1e-5)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    assert out.ratio_min.item() == pytest.approx(float(torch.exp(torch.tensor(-0.2))))


def test_beta_without_kl_is_an_error():
    with pytest.raises(ValueError, match="KL"):
        grpo_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), 1e-4, beta=0.1)


def test_ratio_norm_removes_the_quadratic_shift_and_rescales_by_the_step_std():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    sigma, sigma_next = torch.tensor([0.8, 0.2]), torch.tensor([0.6, 0.1])
    old = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=g)
    new = sde_step_with_logprob(v + 0.05, x, sigma, sigma_next, 0.7, prev_sample=old.prev_sample)
    s = old.std
    # log-ratio = eps.d/s - |d|^2/(2 s^2) with eps = (x_next - mean_old)/s and d = mean_new - mean_old
    eps = (old.prev_sample - old.prev_sample_mean) / s[:, None]
    d = new.prev_sample_mean - old.prev_sample_mean
    raw = (eps * d).mean(1) / s - (d**2).mean(1) / (2 * s**2)
    torch.testing.assert_close(log_ratio(new.log_prob, old.log_prob), raw, rtol=1e-4, atol=1e-5)
    normed = log_ratio(new.log_prob, old.log_prob, True, new.prev_sample_mean, old.prev_sample_mean, s)
    torch.testing.assert_close(normed, (eps * d).mean(1), rtol=1e-4, atol=1e-6)


def test_gradient_reweight_is_one_over_minus_dt():
    w = guard_step_weight(torch.tensor([0.9, 0.2]), torch.tensor([0.8, 0.15]))
    torch.testing.assert_close(w, torch.tensor([10.0, 20.0]))
    new = torch.tensor([0.0, 0.0], requires_grad=True)
    out = grpo_loss(new, torch.zeros(2), torch.tensor([1.0, 1.0]), 1e-3, step_weight=w)
    (grad,) = torch.autograd.grad(out.loss, new)
    torch.testing.assert_close(grad, torch.tensor([-5.0, -10.0]))
