"""Group-relative advantages against hand-computed values."""

import numpy as np
import pytest
import torch

from flowgrpo_core.advantages import (
    STD_EPS,
    PerPromptStatTracker,
    clip_advantages,
    epoch_advantages,
    group_stats,
    samples_to_train,
)

PROMPTS = ["a", "a", "a", "b", "b", "b"]
REWARDS = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])


def test_group_std_normalisation():
    adv = PerPromptStatTracker(global_std=False).update(PROMPTS, REWARDS)
    std_a, std_b = np.std([1, 2, 3]), np.std([10, 10, 13])  # population std: sqrt(2/3), sqrt(2)
    expected = [
        (1 - 2) / (std_a + STD_EPS),
        0.0,
        (3 - 2) / (std_a + STD_EPS),
        -1 / (std_b + STD_EPS),
        -1 / (std_b + STD_EPS),
        2 / (std_b + STD_EPS),
    ]
    np.testing.assert_allclose(adv, expected, rtol=1e-12)


def test_global_std_normalisation():
    adv = PerPromptStatTracker(global_std=True).update(PROMPTS, REWARDS)
    std = np.std(REWARDS)
    np.testing.assert_allclose(adv, np.array([-1, 0, 1, -1, -1, 2]) / (std + STD_EPS), rtol=1e-12)


def test_zero_variance_group_gets_zero_advantages():
    adv = PerPromptStatTracker(global_std=False).update(["a", "a", "b", "b"], np.array([5.0, 5.0, 1.0, 2.0]))
    assert adv[0] == 0 and adv[1] == 0
    np.testing.assert_allclose(adv[2:], [-0.5 / (0.5 + STD_EPS), 0.5 / (0.5 + STD_EPS)])


def test_epoch_advantages_leave_out_non_finite_rewards_and_start_each_epoch_empty():
    rewards = np.array([1.0, np.nan, 3.0, 10.0, 10.0, np.inf])
    raw = {"r/raw": rewards * 2}
    tracker = PerPromptStatTracker(global_std=False)
    tracker.update(["a"], np.array([100.0]))  # last epoch's: forgotten without a buffer
    adv, metrics = epoch_advantages(tracker, PROMPTS, rewards, raw, adv_clip_max=5.0)
    # group a is {1, 3}: mean 2, std 1; group b is {10, 10}: zero variance
    np.testing.assert_allclose(adv, [-1 / (1 + STD_EPS), 0, 1 / (1 + STD_EPS), 0, 0, 0], rtol=1e-12)
    assert metrics["train/nonfinite_rewards"] == 2
    assert metrics["reward/total"] == pytest.approx(np.mean([1, 3, 10, 10]))
    assert metrics["reward/r/mean"] == pytest.approx(2 * np.mean([1, 3, 10, 10]))
    assert metrics["train/zero_variance_share"] == 0.5
    assert metrics["train/advantage_abs_mean"] == pytest.approx(2 / (1 + STD_EPS) / 6)
    clipped, _ = epoch_advantages(
        PerPromptStatTracker(global_std=False), ["a", "a"], np.array([0.0, 1.0]), {}, adv_clip_max=0.5
    )
    np.testing.assert_allclose(clipped, [-0.5, 0.5])


def test_rolling_buffer_keeps_history_and_clear_drops_it():
    tracker = PerPromptStatTracker(global_std=False, buffer_size=4)
    tracker.update(["a", "a"], np.array([0.0, 2.0]))
    adv = tracker.update(["a", "a"], np.array([4.0, 6.0]))  # baseline over [0, 2, 4, 6]: mean 3, std sqrt(5)
    np.testing.assert_allclose(adv, np.array([1.0, 3.0]) / (np.sqrt(5) + STD_EPS))
    tracker.update(["a"], np.array([8.0]))
    assert tracker.history["a"] == [2.0, 4.0, 6.0, 8.0]
    tracker.clear()
    assert dict(tracker.history) == {}


def test_state_round_trip():
    tracker = PerPromptStatTracker(global_std=False, buffer_size=3)
    tracker.update(["x", "y"], np.array([1.0, 2.0]))
    other = PerPromptStatTracker()
    other.load_state_dict(tracker.state_dict())
    assert other.state_dict() == tracker.state_dict()


def test_clip_and_validation():
    np.testing.assert_array_equal(clip_advantages(np.array([-7.0, 0.3, 9.0]), 5.0), [-5.0, 0.3, 5.0])
    with pytest.raises(ValueError, match="NaN"):
        PerPromptStatTracker().update(["a"], np.array([np.nan]))
    with pytest.raises(ValueError, match="shape"):
        PerPromptStatTracker().update(["a", "b"], np.array([1.0]))


def test_group_stats():
    stats = group_stats(["a", "a", "b", "b"], np.array([5.0, 5.0, 1.0, 3.0]))
    assert stats.num_groups == 2
    assert stats.zero_variance_share == 0.5
    assert stats.mean_within_group_std == pytest.approx(0.5)
    assert stats.global_std == pytest.approx(np.std([5, 5, 1, 3]))


def _two_ranks():
    # 12 samples in sampling batches of 2 over 2 ranks: batches 0, 2, 4 on rank 0, batches 1, 3, 5 on rank 1
    rank_of_sample = (torch.arange(12) // 2) % 2
    advantages = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    return advantages, rank_of_sample


def test_drop_and_keep_zero_advantage_samples():
    advantages, ranks = _two_ranks()
    g = torch.Generator().manual_seed(0)
    assert samples_to_train(advantages, "drop", ranks, 3, g).tolist() == [0, 3, 8]
    assert samples_to_train(advantages, "keep", ranks, 3, g).tolist() == list(range(12))
    finite = torch.ones(12, dtype=torch.bool)
    finite[5] = False
    assert 5 not in samples_to_train(advantages, "keep", ranks, 3, g, eligible=finite).tolist()


def test_refill_puts_back_zero_advantage_samples_until_each_rank_holds_a_multiple_of_its_batches():
    advantages, ranks = _two_ranks()
    kept = samples_to_train(advantages, "refill", ranks, 3, torch.Generator().manual_seed(0))
    assert {0, 3, 8} <= set(kept.tolist())
    # rank 0 had samples 0 and 8 (2 -> 3), rank 1 had sample 3 (1 -> 3)
    assert [int((ranks[kept] == r).sum()) for r in (0, 1)] == [3, 3]
    again = samples_to_train(advantages, "refill", ranks, 3, torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)  # the epoch's generator decides, identically on every rank
    other = [
        samples_to_train(advantages, "refill", ranks, 3, torch.Generator().manual_seed(s)) for s in range(8)
    ]
    assert len({tuple(k.tolist()) for k in other}) > 1  # the refilled samples are drawn at random


def test_refill_edge_cases():
    ranks = torch.zeros(6, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    # already a multiple: nothing added
    assert samples_to_train(torch.tensor([1.0, 2, 3, 0, 0, 0]), "refill", ranks, 3, g).tolist() == [0, 1, 2]
    # no signal at all: nothing is trained (no step of pure KL and weight decay)
    assert len(samples_to_train(torch.zeros(6), "refill", ranks, 3, g)) == 0
    # not enough zero-advantage samples to round up: left as is
    assert samples_to_train(torch.tensor([1.0, 2, 3, 4, 0, 5]), "refill", ranks, 4, g).tolist() == [
        0,
        1,
        2,
        3,
        5,
    ]
    # a sample with a non-finite reward is never put back
    eligible = torch.tensor([True, True, True, True, False, True])
    assert samples_to_train(
        torch.tensor([1.0, 0, 0, 0, 0, 0]), "refill", ranks, 5, g, eligible=eligible
    ).tolist() == [0, 1, 2, 3, 5]
    with pytest.raises(ValueError, match="zero_advantage"):
        samples_to_train(torch.zeros(6), "sometimes", ranks, 3, g)
