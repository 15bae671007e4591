"""DiffusionNFT's terms in closed form (flowgrpo_core/nft.py) and the DPM-Solver++(2M) steps (flowgrpo_core/ode.py)."""

import math

import pytest
import torch

from flowgrpo_core.nft import (
    adaptive_x0_loss,
    forward_noising,
    implicit_policies,
    nft_loss,
    old_policy_decay,
    optimality_probability,
)
from flowgrpo_core.ode import clean_prediction, dpm2_step, first_order_step


@pytest.fixture(autouse=True)
def _float64_by_default():
    """Closed forms compared to 1e-12 (the functions compute in float32). Set per test and restored: set at
    import, it would change every test module collected after this one."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _batch(seed=0, b=3, shape=(2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g)
    noise = torch.randn(b, *shape, generator=g)
    t = torch.rand(b, generator=g) * 0.8 + 0.1
    v_old = torch.randn(b, *shape, generator=g)
    v_theta = v_old + 0.3 * torch.randn(b, *shape, generator=g)
    return x0, noise, t, v_old, v_theta


def test_optimality_probability_maps_clipped_advantages_onto_zero_one():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    assert optimality_probability(a, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_forward_noising_is_the_rectified_flow_interpolation():
    x0, noise, t, _, _ = _batch()
    x_t = forward_noising(x0, noise, t)
    for i in range(len(t)):
        assert torch.allclose(x_t[i].double(), (1 - t[i]) * x0[i] + t[i] * noise[i], atol=1e-6)
    assert torch.allclose(forward_noising(x0, noise, torch.ones(3)).double(), noise, atol=1e-7)


def test_implicit_policies_straddle_the_old_one_and_carry_no_old_gradient():
    _, _, _, v_old, v_theta = _batch()
    v_theta.requires_grad_(True)
    v_old.requires_grad_(True)
    pos, neg = implicit_policies(v_theta, v_old, 0.3)
    assert torch.allclose((pos + neg) / 2, v_old)  # symmetric around the old policy
    assert torch.allclose(pos - neg, 2 * 0.3 * (v_theta - v_old))
    (pos.sum() + neg.sum()).backward()
    assert v_old.grad is None
    pos1, neg1 = implicit_policies(v_theta, v_old, 1.0)
    assert torch.equal(pos1, v_theta) and torch.allclose(neg1, 2 * v_old - v_theta)


def test_adaptive_weight_is_the_error_s_own_mean_absolute_value_held_constant():
    x0, noise, t, _, v = _batch()
    x_t = forward_noising(x0, noise, t)
    v = v.clone().requires_grad_(True)
    loss = adaptive_x0_loss(x_t, t, v, x0)
    error = x_t - t.view(-1, 1, 1, 1) * v.detach() - x0
    w = error.abs().flatten(1).mean(1)
    assert torch.allclose(loss.double(), error.pow(2).flatten(1).mean(1) / w, rtol=1e-5)
    loss.sum().backward()
    n = error[0].numel()
    # the weight does not take part in the gradient: d/dv of mean(e^2)/w with e = x_t - t v - x0
    expected = -2 * t.view(-1, 1, 1, 1) * error / (n * w.view(-1, 1, 1, 1))
    assert torch.allclose(v.grad, expected, rtol=1e-4, atol=1e-7)
    # a constant error a: loss a^2 / a = a
    const = adaptive_x0_loss(torch.full((1, 4), 0.7), torch.zeros(1), torch.zeros(1, 4), torch.zeros(1, 4))
    assert math.isclose(float(const), 0.7, rel_tol=1e-6)


def test_r_one_at_beta_one_is_weighted_flow_matching_towards_the_samples():
    # r = 1 leaves only v+ = v_theta (beta = 1): flow matching of v_theta on (x0, noise) with the weight t^2 / w
    x0, noise, t, v_old, v_theta = _batch()
    x_t = forward_noising(x0, noise, t)
    out = nft_loss(v_theta, v_old, x_t, t, x0, torch.ones(3), 1.0, 5.0)
    target = noise - x0
    tt = t.view(-1, 1, 1, 1)
    w = (tt * (v_theta - target)).abs().flatten(1).mean(1)
    fm = (tt**2 * (v_theta - target) ** 2).flatten(1).mean(1) / w
    assert torch.allclose(out.loss.double(), 5.0 * fm, rtol=1e-5)
    # and r = 0 trains only the negative policy
    neg = nft_loss(v_theta, v_old, x_t, t, x0, torch.zeros(3), 1.0, 5.0)
    assert torch.allclose(neg.loss, 5.0 * neg.negative)


def _grad(v_theta, v_old, x_t, t, x0, r, beta):
    v = v_theta.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, t, x0, r, beta, 5.0).loss.sum().backward()
    return v.grad


def test_at_the_old_policy_the_loss_is_the_old_loss_and_its_gradient_is_reward_signed():
    x0, noise, t, v_old, _ = _batch()
    x_t = forward_noising(x0, noise, t)
    r = torch.tensor([0.0, 0.5, 0.9])
    v_ref = v_old.clone().requires_grad_(True)
    old_loss = adaptive_x0_loss(x_t, t, v_ref, x0)
    old_loss.sum().backward()
    for beta in (0.1, 1.0):
        out = nft_loss(v_old, v_old, x_t, t, x0, r, beta, 5.0)
        assert torch.allclose(out.positive, out.negative) and torch.allclose(out.positive, old_loss.detach())
        assert torch.allclose(out.loss, old_loss.detach() * 5.0 / beta, rtol=1e-6)
        # d/dv_theta = (2r - 1) c grad L(v_old), whatever beta: r = 1/2 gives no push at all
        expected = (2 * r - 1).view(-1, 1, 1, 1) * 5.0 * v_ref.grad
        assert torch.allclose(_grad(v_old, v_old, x_t, t, x0, r, beta), expected, rtol=1e-5, atol=1e-7)


def test_small_beta_limit_is_the_reward_signed_gradient_at_the_old_policy():
    # beta -> 0: v+ and v- both tend to v_old, and the gradient anywhere tends to (2r - 1) c grad L(v_old)
    x0, noise, t, v_old, v_theta = _batch()
    x_t = forward_noising(x0, noise, t)
    r = torch.tensor([0.2, 0.7, 1.0])
    v_ref = v_old.clone().requires_grad_(True)
    adaptive_x0_loss(x_t, t, v_ref, x0).sum().backward()
    expected = (2 * r - 1).view(-1, 1, 1, 1) * 5.0 * v_ref.grad
    far = (_grad(v_theta, v_old, x_t, t, x0, r, 0.5) - expected).abs().max()
    near = (_grad(v_theta, v_old, x_t, t, x0, r, 1e-4) - expected).abs().max()
    assert near < 1e-3 * far
    pos, neg = implicit_policies(v_theta, v_old, 1e-6)
    assert torch.allclose(pos, v_old, atol=1e-5) and torch.allclose(neg, v_old, atol=1e-5)


@pytest.mark.parametrize(
    "schedule, steps, decays",
    [
        ((0, 1e-3, 0.5), [0, 1, 100, 499, 500, 10_000], [0.0, 1e-3, 0.1, 0.499, 0.5, 0.5]),  # decay_type 1
        ((75, 0.0075, 0.999), [0, 74, 75, 76, 175, 1_000], [0.0, 0.0, 0.0, 0.0075, 0.75, 0.999]),  # type 2
        ((0, 0.0, 0.0), [0, 10, 1_000], [0.0, 0.0, 0.0]),  # type 0: the old policy is always the current
    ],
)
def test_old_policy_decay_follows_the_authors_schedules(schedule, steps, decays):
    got = [old_policy_decay(s, *schedule) for s in steps]
    assert got == pytest.approx(decays, abs=1e-12)


def test_first_order_step_is_the_euler_step():
    x0, noise, t, _, v = _batch()
    x = forward_noising(x0, noise, t)
    nxt = t * 0.6
    euler = x + (nxt - t).view(-1, 1, 1, 1) * v
    got = first_order_step(clean_prediction(v, x, t), x, t, nxt)
    assert torch.allclose(got.double(), euler, atol=1e-5)
    # to sigma = 0 it returns the clean prediction
    assert torch.allclose(
        first_order_step(clean_prediction(v, x, t), x, t, torch.zeros(3)), clean_prediction(v, x, t)
    )


def test_dpm2_step_is_exact_on_a_straight_path_and_matches_the_formula():
    x0, noise, _, _, _ = _batch()
    s_prev, s, s_next = torch.full((3,), 0.9), torch.full((3,), 0.6), torch.full((3,), 0.3)
    x = forward_noising(x0, noise, s)
    # constant clean predictions (a straight flow): the step lands on the path exactly
    got = dpm2_step(x0.float(), x0.float(), x, s_prev, s, s_next)
    assert torch.allclose(got.double(), forward_noising(x0, noise, s_next).double(), atol=1e-5)
    # the correction term, by hand: lambda = log((1-s)/s)
    lam = lambda u: math.log((1 - u) / u)  # noqa: E731
    h, h0 = lam(0.3) - lam(0.6), lam(0.6) - lam(0.9)
    prev = x0 + 0.1
    d = x0 + (x0 - prev) * h / h0 / 2
    expected = 0.3 / 0.6 * x - 0.7 * (math.exp(-h) - 1) * d
    got = dpm2_step(x0.float(), prev.float(), x, s_prev, s, s_next)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # after a step at sigma = 1 (lambda = -inf) the correction vanishes: the first-order step
    after_one = dpm2_step(x0.float(), prev.float(), x, torch.ones(3), s, s_next)
    assert torch.allclose(after_one, first_order_step(x0.float(), x, s, s_next), atol=1e-6)
