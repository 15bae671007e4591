"""The clipped GRPO objective and GRPO-Guard against hand-computed values."""

import pytest
import torch

from flowgrpo_core.loss import grpo_loss, guard_step_weight, log_ratio, loss_statistics
from flowgrpo_core.sde import sde_std_t, sde_step_with_logprob


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


def _guard_inputs():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    sigma, sigma_next = torch.tensor([0.8, 0.8, 0.2]), torch.tensor([0.6, 0.6, 0.1])
    old = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=g)
    new = sde_step_with_logprob(
        v + 0.05 * torch.arange(1, 4)[:, None], x, sigma, sigma_next, 0.7, prev_sample=old.prev_sample
    )
    std_t, sqrt_dt = sde_std_t(sigma, sigma_next, 0.7), torch.sqrt(sigma - sigma_next)
    # eps = (x_next - mean_old) / s and d = mean_new - mean_old, per sample
    eps = (old.prev_sample - old.prev_sample_mean) / old.std[:, None]
    d = new.prev_sample_mean - old.prev_sample_mean
    return old, new, std_t, sqrt_dt, eps, d


def test_log_ratio_of_gaussian_steps_is_eps_d_over_s_minus_the_quadratic_shift():
    old, new, _, _, eps, d = _guard_inputs()
    s = old.std
    raw = (eps * d).mean(1) / s - (d**2).mean(1) / (2 * s**2)
    torch.testing.assert_close(log_ratio(new.log_prob, old.log_prob), raw, rtol=1e-4, atol=1e-5)


def test_ratio_norm_per_sample_removes_each_samples_shift_and_rescales_by_its_step_std():
    old, new, std_t, sqrt_dt, eps, d = _guard_inputs()
    normed = log_ratio(
        new.log_prob,
        old.log_prob,
        True,
        new.prev_sample_mean,
        old.prev_sample_mean,
        std_t,
        sqrt_dt,
        bias="sample",
    )
    torch.testing.assert_close(normed, (eps * d).mean(1), rtol=1e-4, atol=1e-6)


def test_ratio_norm_per_batch_is_the_official_scripts_form():
    old, new, std_t, sqrt_dt, eps, d = _guard_inputs()
    normed = log_ratio(
        new.log_prob, old.log_prob, True, new.prev_sample_mean, old.prev_sample_mean, std_t, sqrt_dt
    )
    # one scale and one shift for the micro-batch: S = mean(sqrt(-dt)) * mean(std_t), shift = mean_all(d^2) / (2 S^2)
    s = old.std
    scale = sqrt_dt.mean() * std_t.mean()
    shift = (d**2).mean() / (2 * scale**2)
    raw = (eps * d).mean(1) / s - (d**2).mean(1) / (2 * s**2)
    torch.testing.assert_close(normed, (raw + shift) * scale, rtol=1e-4, atol=1e-6)
    # samples 0 and 1 share a step but not a shift: the batch form leaves their difference in place
    per_sample = log_ratio(
        new.log_prob,
        old.log_prob,
        True,
        new.prev_sample_mean,
        old.prev_sample_mean,
        std_t,
        sqrt_dt,
        bias="sample",
    )
    assert not torch.allclose(normed, per_sample, rtol=1e-3, atol=0)
    # the shift is one number: the batch form equals the per-sample form when every sample has the batch's shift
    same = log_ratio(
        new.log_prob[:1].expand(2),
        old.log_prob[:1].expand(2),
        True,
        new.prev_sample_mean[:1].expand(2, -1),
        old.prev_sample_mean[:1].expand(2, -1),
        std_t[:1].expand(2),
        sqrt_dt[:1].expand(2),
    )
    alone = log_ratio(
        new.log_prob[:1],
        old.log_prob[:1],
        True,
        new.prev_sample_mean[:1],
        old.prev_sample_mean[:1],
        std_t[:1],
        sqrt_dt[:1],
        bias="sample",
    )
    torch.testing.assert_close(same, alone.expand(2), rtol=1e-5, atol=1e-7)


def test_ratio_norm_batch_shift_carries_a_gradient_through_every_sample():
    old, new, std_t, sqrt_dt, _, _ = _guard_inputs()
    mean = new.prev_sample_mean.clone().requires_grad_(True)
    normed = log_ratio(new.log_prob, old.log_prob, True, mean, old.prev_sample_mean, std_t, sqrt_dt)
    (grad,) = torch.autograd.grad(normed[0], mean)
    # d/d mean_b of shift * S = (mean_b - old_b) / (B * E * S): sample 0's log-ratio depends on samples 1 and 2
    scale = sqrt_dt.mean() * std_t.mean()
    expected = (mean - old.prev_sample_mean).detach() / (mean.numel() * scale)
    torch.testing.assert_close(grad[1:], expected[1:], rtol=1e-4, atol=1e-9)


def test_gradient_reweight_is_one_over_minus_dt():
    w = guard_step_weight(torch.tensor([0.9, 0.2]), torch.tensor([0.8, 0.15]))
    torch.testing.assert_close(w, torch.tensor([10.0, 20.0]))
    new = torch.tensor([0.0, 0.0], requires_grad=True)
    out = grpo_loss(new, torch.zeros(2), torch.tensor([1.0, 1.0]), 1e-3, step_weight=w)
    (grad,) = torch.autograd.grad(out.loss, new)
    torch.testing.assert_close(grad, torch.tensor([-5.0, -10.0]))


def test_loss_statistics_weigh_every_sample_of_every_rank_alike():
    # rank 0: 2 samples (loss sums 2 x 0.5), ratios at step 0; rank 1: 6 samples (sum 6 x 0.1), steps 0 and 3
    rank0 = ({"loss": 1.0, "kl": 0.2}, 2, {0: [1.0, 1.002]})
    rank1 = ({"loss": 0.6, "kl": 0.0}, 6, {0: [0.998], 3: [1.01, 0.99]})
    stats = loss_statistics([rank0, rank1])
    assert stats["train/loss"] == pytest.approx(1.6 / 8) and stats["train/kl"] == pytest.approx(0.2 / 8)
    assert stats["train/clipfrac"] == 0.0  # not reported by any rank
    assert stats["train/ratio_min"] == 0.99 and stats["train/ratio_max"] == 1.01
    assert stats["train/ratio_mean/step_0"] == pytest.approx(1.0) and stats[
        "train/ratio_mean/step_3"
    ] == pytest.approx(1.0)
    assert loss_statistics([({}, 0, {})])["train/loss"] == 0.0  # an idle epoch


@pytest.mark.parametrize(
    ("ratio", "advantage", "clipped"),
    [
        (1.0 + 1.5e-3, 1.0, False),  # above 1 + low but inside 1 + high: the wider upper side lets it through
        (1.0 + 2.5e-3, 1.0, True),  # above 1 + high with A > 0: clipped
        (1.0 - 0.5e-3, -1.0, False),  # inside 1 - low
        (1.0 - 1.5e-3, -1.0, True),  # below 1 - low with A < 0: clipped, though inside the upper width
        (1.0 - 2.5e-3, 1.0, False),  # below the band with A > 0: the unclipped term is the max
        (1.0 + 2.5e-3, -1.0, False),  # above the band with A < 0: unclipped
    ],
)
def test_asymmetric_clip_band_is_one_minus_low_to_one_plus_high(ratio, advantage, clipped):
    low, high = 1e-3, 2e-3
    new = torch.tensor([0.0], requires_grad=True)
    old = -torch.log(torch.tensor([ratio]))
    out = grpo_loss(new, old, torch.tensor([advantage]), clip_range=(low, high))
    (grad,) = torch.autograd.grad(out.loss, new)
    assert (grad.abs().item() == 0.0) is clipped
    if not clipped:
        assert grad.item() == pytest.approx(-advantage * ratio, rel=1e-5)
    expected = max(-advantage * ratio, -advantage * min(max(ratio, 1 - low), 1 + high))
    assert out.policy_loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.clipfrac.item() == float(ratio - 1 > high or 1 - ratio > low)


def test_an_equal_band_is_the_symmetric_clip_to_the_bit():
    g = torch.Generator().manual_seed(0)
    new, old = 1e-3 * torch.randn(64, generator=g), 1e-3 * torch.randn(64, generator=g)
    advantages = torch.randn(64, generator=g)
    a = grpo_loss(new, old, advantages, 1e-3)
    b = grpo_loss(new, old, advantages, (1e-3, 1e-3))
    assert 0 < a.clipfrac.item() < 1  # some ratios clipped, some not
    assert torch.equal(a.loss, b.loss) and torch.equal(a.clipfrac, b.clipfrac)


def test_the_config_gives_the_band_and_refuses_two_upper_widths():
    from flowgrpo_core.config import ConfigError, load_config

    def bounds(*overrides):
        return load_config("tiny", overrides=["train.clip_range=0.01", *overrides]).train.clip_bounds()

    assert bounds() == (0.01, 0.01)
    assert bounds("train.clip_range_low=0.002") == (0.002, 0.01)
    assert bounds("train.clip_range_high=0.03") == (0.01, 0.03)
    assert bounds("train.highclip_range=0.03") == bounds(
        "train.clip_range_high=0.03", "train.highclip_range=0.03"
    )
    with pytest.raises(ConfigError, match=r"highclip_range: 0\.04 and clip_range_high: 0\.03"):
        bounds("train.clip_range_high=0.03", "train.highclip_range=0.04")
