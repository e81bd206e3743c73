"""Tests for openrlhf_gd2po.advantages.compute_advantages.

The hand-worked examples keep every group's values simple enough that the normalised
advantages are exact fractions/surds (derivations in the comments). The group-norm std
epsilon (1e-6) moves them by a relative ~2e-6, hence rtol=1e-5 in `assert_values`.
"""

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_gd2po.advantages import compute_advantages

SQRT2, SQRT3 = math.sqrt(2), math.sqrt(3)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


def assert_values(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------
# Shared example: two groups of unequal size, K = 2.
#
# group 0 (3 rollouts)   dim0 = 0, 1, 1   mean 2/3, centred -2/3, 1/3, 1/3,
#                                         Bessel var (4/9 + 1/9 + 1/9) / 2 = 1/3, std 1/√3
#                                         A0 = -2/√3, 1/√3, 1/√3
#                        dim1 = 0, 0, 1   A1 = -1/√3, -1/√3, 2/√3
#                        sum  = -√3, 0, √3
#                        rollout 1: A0 > 0 > A1 -> conflicted, snr = 0 / (2/√3) = 0
# group 1 (2 rollouts)   dim0 = 0, 1      A0 = -1/√2, 1/√2   (a pair is always ±1/√2)
#                        dim1 = 1, 1      A1 = 0, 0
#                        sum  = -1/√2, 1/√2, no conflict
# --------------------------------------------------------------------------------------
REWARDS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
GROUPS = torch.tensor([0, 0, 0, 1, 1])


def test_grpo_hand_example():
    # Rollout sums: group 0 -> 0, 1, 2 (mean 1, var (1+0+1)/2 = 1) -> -1, 0, 1;
    # group 1 -> 1, 2 -> ±1/√2. No whitening, nothing masked.
    result = compute_advantages(REWARDS, GROUPS, "grpo")
    assert_values(result.advantages, [-1.0, 0.0, 1.0, -1 / SQRT2, 1 / SQRT2])
    assert result.keep_mask.all()
    assert_values(result.group_keep_ratio, [1.0] * 5)


def test_gdpo_hand_example():
    # Sums -√3, 0, √3, -1/√2, 1/√2: token mean 0, Σx² = 3+3+1/2+1/2 = 7,
    # unbiased var 7/4 -> whitened = x · 2/√7.
    result = compute_advantages(REWARDS, GROUPS, "gdpo")
    scale = 2 / math.sqrt(7)
    assert_values(result.advantages, [-SQRT3 * scale, 0.0, SQRT3 * scale, -scale / SQRT2, scale / SQRT2])
    assert result.keep_mask.all()


def test_gd2po_hard_hand_example():
    # Rollout 1 is conflicted -> masked; group 0 keeps 2/3, group 1 keeps 1.
    # Scaled kept sums: -√3·2/3 = -2/√3, 2/√3, -1/√2, 1/√2: mean 0,
    # Σx² = 4/3 + 4/3 + 1/2 + 1/2 = 11/3, var 11/9, std √11/3.
    # Whitened: (2/√3)·3/√11 = 6/√33 and (1/√2)·3/√11 = 3/√22.
    result = compute_advantages(REWARDS, GROUPS, "gd2po_hard")
    a, b = 6 / math.sqrt(33), 3 / math.sqrt(22)
    assert_values(result.advantages, [-a, 0.0, a, -b, b])
    assert result.advantages[1].item() == 0.0
    assert result.keep_mask.tolist() == [True, False, True, True, True]
    assert_values(result.group_keep_ratio, [2 / 3, 2 / 3, 2 / 3, 1.0, 1.0])
    assert result.metrics["conflict_ratio"] == pytest.approx(1 / 5)
    assert result.metrics["keep_ratio"] == pytest.approx(4 / 5)


def test_gd2po_hard_without_whitening_or_reweighting():
    # whiten=False leaves the scaled sums: -2/√3, 0, 2/√3, -1/√2, 1/√2.
    result = compute_advantages(REWARDS, GROUPS, "gd2po_hard", whiten=False)
    assert_values(result.advantages, [-2 / SQRT3, 0.0, 2 / SQRT3, -1 / SQRT2, 1 / SQRT2])
    # group_reweight=False too: the plain sums, masked rollout still exactly 0.
    result = compute_advantages(REWARDS, GROUPS, "gd2po_hard", whiten=False, group_reweight=False)
    assert_values(result.advantages, [-SQRT3, 0.0, SQRT3, -1 / SQRT2, 1 / SQRT2])
    assert result.advantages[1].item() == 0.0
    # group_reweight=False, whitened: kept -√3, √3, -1/√2, 1/√2, Σx² = 7, var 7/3,
    # -> ±√3·√(3/7) = ±3/√7 and ±(1/√2)·√(3/7) = ±√(3/14).
    result = compute_advantages(REWARDS, GROUPS, "gd2po_hard", group_reweight=False)
    a, b = 3 / math.sqrt(7), math.sqrt(3 / 14)
    assert_values(result.advantages, [-a, 0.0, a, -b, b])


def test_gdpo_without_whitening_is_the_plain_sum():
    result = compute_advantages(REWARDS, GROUPS, "gdpo", whiten=False)
    assert_values(result.advantages, [-SQRT3, 0.0, SQRT3, -1 / SQRT2, 1 / SQRT2])


# One group of 4, K = 3. A column (1,0,0,0) has mean 1/4, centred 3/4, -1/4 x3,
# Bessel var (9/16 + 3/16) / 3 = 1/4, std 1/2 -> A = 3/2, -1/2, -1/2, -1/2.
#   rollout 0: A = ( 3/2,  3/2, -1/2)  conflicted, sum 5/2, snr (5/2)/(7/2) = 5/7 ≈ 0.714
#   rollout 1: A = (-1/2, -1/2,  3/2)  conflicted, sum 1/2, snr (1/2)/(5/2) = 1/5
#   rollouts 2, 3: A = (-1/2, -1/2, -1/2)  agree, sum -3/2
SNR_REWARDS = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
SNR_GROUPS = torch.zeros(4, dtype=torch.long)


def test_gd2po_snr_keeps_high_consensus_conflicts():
    # τ = 0.5 masks only rollout 1. Kept 5/2, -3/2, -3/2 (one group: the 3/4 reweight cancels
    # in whitening): deviations from mean -1/6 are 8/3, -4/3, -4/3 -> Σ = 64/9 + 2·16/9 = 32/3,
    # var 16/3, std 4/√3 -> 2/√3, -1/√3, -1/√3.
    result = compute_advantages(SNR_REWARDS, SNR_GROUPS, "gd2po_snr", snr_threshold=0.5)
    assert result.keep_mask.tolist() == [True, False, True, True]
    assert_values(result.advantages, [2 / SQRT3, 0.0, -1 / SQRT3, -1 / SQRT3])
    assert_values(result.group_keep_ratio, [0.75] * 4)
    # Unwhitened: sums times the kept fraction 3/4.
    result = compute_advantages(SNR_REWARDS, SNR_GROUPS, "gd2po_snr", snr_threshold=0.5, whiten=False)
    assert_values(result.advantages, [5 / 2 * 0.75, 0.0, -3 / 2 * 0.75, -3 / 2 * 0.75])


def test_gd2po_snr_default_threshold_and_hard_mask_both_conflicts():
    # τ = 0.8 > 5/7 masks rollout 0 too, like hard. The kept rollouts 2, 3 are equal,
    # so whitening has no spread and gives 0 (finite, not NaN).
    for estimator in ("gd2po_snr", "gd2po_hard"):
        result = compute_advantages(SNR_REWARDS, SNR_GROUPS, estimator)
        assert result.keep_mask.tolist() == [False, False, True, True]
        assert_values(result.advantages, [0.0, 0.0, 0.0, 0.0])
        assert_values(result.group_keep_ratio, [0.5] * 4)


def test_response_lengths_weight_whitening_per_token():
    # K = 1, pair -> -c, c with c = 1/√2; lengths 3, 1. Token mean (-3c + c)/4 = -c/2,
    # deviations -c/2 (x3 tokens), 3c/2 (x1): Σ = 3c²/4 + 9c²/4 = 3c² = 3/2, var 3/2 / 3 = 1/2,
    # std c -> -1/2, 3/2. The third rollout (own group, length 0) has no tokens: 0, no effect.
    rewards = torch.tensor([[0.0], [1.0], [5.0]])
    result = compute_advantages(rewards, torch.tensor([0, 0, 1]), "gdpo", response_lengths=torch.tensor([3, 1, 0]))
    assert_values(result.advantages, [-0.5, 1.5, 0.0])


def test_zero_length_rollout_is_left_out_of_the_kept_statistics():
    # Same as the hard example, but rollout 3 (-1/√2 before whitening) has no tokens.
    # Kept tokens: -2/√3, 2/√3, 1/√2, mean (1/√2)/3 = m; the empty rollout gets 0.
    lengths = torch.tensor([1, 1, 1, 0, 1])
    result = compute_advantages(REWARDS, GROUPS, "gd2po_hard", response_lengths=lengths)
    kept = [-2 / SQRT3, 2 / SQRT3, 1 / SQRT2]
    mean = sum(kept) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in kept) / 2)
    expected = [(kept[0] - mean) / std, 0.0, (kept[1] - mean) / std, 0.0, (kept[2] - mean) / std]
    assert_values(result.advantages, expected)
    assert result.keep_mask.tolist() == [True, False, True, True, True]  # empty != masked


def test_reward_weights():
    # weights (2, 1). grpo weights raw rewards: group 0 sums 0, 2, 3 (mean 5/3, centred
    # -5/3, 1/3, 4/3, var (25+1+16)/9/2 = 7/3) -> -5/√21, 1/√21, 4/√21; group 1 sums 1, 3 -> ±1/√2.
    weights = torch.tensor([2.0, 1.0])
    result = compute_advantages(REWARDS, GROUPS, "grpo", reward_weights=weights)
    r21 = math.sqrt(21)
    assert_values(result.advantages, [-5 / r21, 1 / r21, 4 / r21, -1 / SQRT2, 1 / SQRT2])
    # gdpo weights normalised advantages: group 0: 2·(-2, 1, 1)/√3 + (-1, -1, 2)/√3
    # = (-5, 1, 4)/√3; group 1: 2·(∓1/√2) + 0 = ∓√2.
    result = compute_advantages(REWARDS, GROUPS, "gdpo", reward_weights=weights, whiten=False)
    assert_values(result.advantages, [-5 / SQRT3, 1 / SQRT3, 4 / SQRT3, -SQRT2, SQRT2])


def test_zero_weight_removes_a_dimension_from_the_conflict_filter():
    # weights (1, 0): only dim 0 counts, so rollout 1 (A0 = 1/√3, A1 = -1/√3) agrees with itself.
    # Sums -2/√3, 1/√3, 1/√3, -1/√2, 1/√2: mean 0, Σx² = 4/3+1/3+1/3+1/2+1/2 = 3,
    # var 3/4 -> x·2/√3: -4/3, 2/3, 2/3, -√(2/3), √(2/3).
    weights = torch.tensor([1.0, 0.0])
    expected = [-4 / 3, 2 / 3, 2 / 3, -math.sqrt(2 / 3), math.sqrt(2 / 3)]
    for estimator in ("gdpo", "gd2po_hard", "gd2po_snr"):
        result = compute_advantages(REWARDS, GROUPS, estimator, reward_weights=weights)
        assert result.keep_mask.all(), estimator
        assert_values(result.advantages, expected)


def test_all_equal_group_gets_zero_advantage():
    # Group 0 has three identical rollouts: every normalised advantage is 0 (up to rounding,
    # far below the 1e-8 sign threshold), so no conflict. Group 1: (0,0),(1,1) -> sums ±√2,
    # which already have token variance (2+2)/4 = 1.
    rewards = torch.tensor([[0.1, 0.7]] * 3 + [[0.0, 0.0], [1.0, 1.0]])
    groups = torch.tensor([0, 0, 0, 1, 1])
    for estimator in ("gdpo", "gd2po_hard", "gd2po_snr"):
        result = compute_advantages(rewards, groups, estimator)
        assert result.keep_mask.all(), estimator
        assert_values(result.advantages, [0.0, 0.0, 0.0, -SQRT2, SQRT2])
    result = compute_advantages(rewards, groups, "grpo")
    assert_values(result.advantages, [0.0, 0.0, 0.0, -1 / SQRT2, 1 / SQRT2])


def test_all_masked_gives_finite_zeros():
    # (0,1) vs (1,0): each rollout has A = (∓c, ±c), conflicted with snr 0.
    rewards = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 2)
    groups = torch.tensor([0, 0, 7, 7])
    for estimator in ("gd2po_hard", "gd2po_snr"):
        for whiten in (True, False):
            result = compute_advantages(rewards, groups, estimator, whiten=whiten)
            assert not result.keep_mask.any()
            assert torch.equal(result.advantages, torch.zeros(4))
            assert torch.equal(result.group_keep_ratio, torch.zeros(4))
            assert result.metrics["keep_ratio"] == 0.0
            assert all(math.isfinite(v) for v in result.metrics.values())


def test_group_of_one_keeps_raw_values():
    # A singleton has no spread: normalisation leaves its raw rewards (mean 0, std 1).
    rewards = torch.tensor([[0.5, 0.25], [0.0, 0.0], [1.0, 1.0]])
    groups = torch.tensor([3, 9, 9])
    assert_values(compute_advantages(rewards, groups, "grpo").advantages, [0.75, -1 / SQRT2, 1 / SQRT2])
    for estimator in ("gdpo", "gd2po_hard", "gd2po_snr"):
        result = compute_advantages(rewards, groups, estimator, whiten=False)
        assert_values(result.advantages, [0.75, -SQRT2, SQRT2])


def test_single_rollout_batch_whitens_to_zero():
    # One token has no variance: the whitened value is x - mean = 0, not NaN.
    result = compute_advantages(torch.tensor([[0.5, 0.25]]), torch.tensor([0]), "gdpo")
    assert torch.equal(result.advantages, torch.zeros(1))


@pytest.mark.parametrize("estimator", ["grpo", "gdpo", "gd2po_hard", "gd2po_snr"])
def test_outputs_have_the_documented_types(estimator):
    result = compute_advantages(REWARDS, GROUPS, estimator)
    assert result.advantages.shape == (5,) and result.advantages.dtype == torch.float32
    assert result.keep_mask.dtype == torch.bool
    assert result.group_keep_ratio.shape == (5,)
    for key in ("conflict_ratio", "keep_ratio", "group_keep_ratio_mean", "advantage_cancellation"):
        assert isinstance(result.metrics[key], float)


def test_large_batch_is_fast():
    # Vectorised: 65,536 rollouts x 8 dimensions is a few O(N·K) kernels (15-45 ms here);
    # the per-group loop in benchmarks/bench_advantages.py takes 3-4 s, so this bound
    # catches a regression to a loop. One thread: on a busy 2-core box a descheduled
    # second intra-op thread stalls every parallel kernel.
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (65536, 8), generator=generator).float()
    groups = torch.arange(65536) // 8
    lengths = torch.randint(0, 100, (65536,), generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compute_advantages(rewards, groups, "gd2po_snr", response_lengths=lengths)  # warm-up
        start = time.perf_counter()
        result = compute_advantages(rewards, groups, "gd2po_snr", response_lengths=lengths)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 0.5
    assert torch.isfinite(result.advantages).all()


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_unknown_estimator():
    with pytest.raises(ValueError, match="estimator.*'ppo'"):
        compute_advantages(REWARDS, GROUPS, "ppo")


def test_rewards_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"rewards must be a non-empty \[N, K\]"):
        compute_advantages(torch.zeros(5), GROUPS, "gdpo")


def test_group_ids_shape_mismatch():
    with pytest.raises(ValueError, match=r"group_ids .*shape \[5\]"):
        compute_advantages(REWARDS, torch.tensor([0, 0, 1]), "gdpo")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_names_rollout_and_dimension(bad):
    rewards = REWARDS.clone()
    rewards[3, 1] = bad
    with pytest.raises(ValueError, match=r"rollout 3, dimension 1"):
        compute_advantages(rewards, GROUPS, "gd2po_snr")


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_bad_response_length_names_the_rollout(bad):
    # NaN or inf would silently make every whitened advantage NaN.
    lengths = torch.tensor([1, 1, bad, 1, 1])  # int tensor for -1, float for NaN / inf
    with pytest.raises(ValueError, match=r"response_lengths\[2\]"):
        compute_advantages(REWARDS, GROUPS, "gdpo", response_lengths=lengths)


def test_response_lengths_shape_mismatch():
    with pytest.raises(ValueError, match="response_lengths must have shape"):
        compute_advantages(REWARDS, GROUPS, "gdpo", response_lengths=torch.tensor([1, 1]))


def test_reward_weights_wrong_length():
    with pytest.raises(ValueError, match="reward_weights must have 2 entries"):
        compute_advantages(REWARDS, GROUPS, "gdpo", reward_weights=torch.tensor([1.0, 1.0, 1.0]))


# --------------------------------------------------------------------------------------
# Properties (hypothesis). Rewards come from a small set so groups have ties, all-equal
# dimensions and sign conflicts often; lengths include 0.
# --------------------------------------------------------------------------------------
@st.composite
def batches(draw, max_dims=4):
    num_dims = draw(st.integers(1, max_dims))
    group_sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    n = sum(group_sizes)
    values = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0])
    rewards = torch.tensor(draw(st.lists(st.lists(values, min_size=num_dims, max_size=num_dims), min_size=n, max_size=n)))
    groups = torch.tensor([g for g, size in enumerate(group_sizes) for _ in range(size)])
    lengths = torch.tensor(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)))
    return rewards, groups, lengths


estimators = st.sampled_from(["grpo", "gdpo", "gd2po_hard", "gd2po_snr"])
gd2po_estimators = st.sampled_from(["gd2po_hard", "gd2po_snr"])


@PROPERTY_SETTINGS
@given(batches(), gd2po_estimators, st.booleans(), st.booleans())
def test_masked_rollouts_are_exactly_zero(batch, estimator, whiten, group_reweight):
    rewards, groups, lengths = batch
    result = compute_advantages(rewards, groups, estimator, lengths, whiten=whiten, group_reweight=group_reweight)
    assert torch.isfinite(result.advantages).all()
    assert (result.advantages[~result.keep_mask] == 0.0).all()


@PROPERTY_SETTINGS
@given(batches(), st.sampled_from(["gdpo", "gd2po_hard", "gd2po_snr"]))
def test_whitened_kept_advantages_have_token_mean_zero_and_unit_variance(batch, estimator):
    rewards, groups, lengths = batch
    raw = compute_advantages(rewards, groups, estimator, lengths, whiten=False).advantages.double()
    result = compute_advantages(rewards, groups, estimator, lengths)
    weights = (lengths * result.keep_mask).double()
    total = weights.sum()
    if total < 2:
        return
    raw_mean = (raw * weights).sum() / total
    raw_var = ((raw - raw_mean).square() * weights).sum() / (total - 1)
    if raw_var < 1e-3:  # kept values (almost) all equal: nothing to whiten to unit variance
        return
    whitened = result.advantages.double()
    mean = (whitened * weights).sum() / total
    var = ((whitened - mean).square() * weights).sum() / (total - 1)
    assert abs(mean.item()) < 1e-5
    assert var.item() == pytest.approx(1.0, rel=1e-4)


@PROPERTY_SETTINGS
@given(batches(), estimators, st.randoms(use_true_random=False))
def test_permuting_rollouts_permutes_outputs(batch, estimator, rng):
    rewards, groups, lengths = batch
    perm = list(range(len(groups)))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    base = compute_advantages(rewards, groups, estimator, lengths)
    permuted = compute_advantages(rewards[perm], groups[perm], estimator, lengths[perm])
    assert torch.equal(permuted.keep_mask, base.keep_mask[perm])
    torch.testing.assert_close(permuted.advantages, base.advantages[perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted.group_keep_ratio, base.group_keep_ratio[perm])


@PROPERTY_SETTINGS
@given(batches(), estimators, st.lists(st.integers(-(2**40), 2**40), min_size=5, max_size=5, unique=True))
def test_arbitrary_group_ids_match_relabelled_ones(batch, estimator, labels):
    rewards, groups, lengths = batch
    relabelled = torch.tensor(labels)[groups]  # non-contiguous, negative, huge ids
    base = compute_advantages(rewards, groups, estimator, lengths)
    other = compute_advantages(rewards, relabelled, estimator, lengths)
    assert torch.equal(other.keep_mask, base.keep_mask)
    torch.testing.assert_close(other.advantages, base.advantages)
    torch.testing.assert_close(other.group_keep_ratio, base.group_keep_ratio)


@PROPERTY_SETTINGS
@given(batches(max_dims=1), gd2po_estimators)
def test_single_dimension_never_conflicts_so_gd2po_equals_gdpo(batch, estimator):
    rewards, groups, lengths = batch
    gdpo = compute_advantages(rewards, groups, "gdpo", lengths)
    result = compute_advantages(rewards, groups, estimator, lengths)
    assert result.keep_mask.all()
    torch.testing.assert_close(result.advantages, gdpo.advantages)


@PROPERTY_SETTINGS
@given(batches(), st.booleans())
def test_threshold_zero_keeps_everything_and_equals_gdpo(batch, group_reweight):
    rewards, groups, lengths = batch
    gdpo = compute_advantages(rewards, groups, "gdpo", lengths)
    result = compute_advantages(rewards, groups, "gd2po_snr", lengths, snr_threshold=0.0, group_reweight=group_reweight)
    assert result.keep_mask.all()
    assert (result.group_keep_ratio == 1.0).all()
    torch.testing.assert_close(result.advantages, gdpo.advantages)


@PROPERTY_SETTINGS
@given(batches(), st.booleans(), st.booleans())
def test_threshold_one_equals_hard(batch, whiten, group_reweight):
    # Every conflicted rollout has |Σ A_k| < Σ |A_k|, so its snr is below 1.
    rewards, groups, lengths = batch
    options = dict(response_lengths=lengths, whiten=whiten, group_reweight=group_reweight)
    hard = compute_advantages(rewards, groups, "gd2po_hard", **options)
    snr = compute_advantages(rewards, groups, "gd2po_snr", snr_threshold=1.0, **options)
    assert torch.equal(snr.keep_mask, hard.keep_mask)
    torch.testing.assert_close(snr.advantages, hard.advantages)


@PROPERTY_SETTINGS
@given(batches(), st.floats(0.0, 1.0))
def test_snr_masks_a_subset_of_hard(batch, threshold):
    # SNR only ever rescues conflicted rollouts; it never masks an unconflicted one.
    rewards, groups, lengths = batch
    hard = compute_advantages(rewards, groups, "gd2po_hard", lengths)
    snr = compute_advantages(rewards, groups, "gd2po_snr", lengths, snr_threshold=threshold)
    assert (snr.keep_mask | ~hard.keep_mask).all()


# --------------------------------------------------------------------------------------
# The authors' logged statistics. K = 2, four groups of unequal size:
# G0 [1,0],[0,1],[0,0]: A0 = (2,-1,-1)/√3, A1 = (-1,2,-1)/√3 -> r0, r1 conflicted, consensus +1/3
# G1 [1,0],[0,1]:       A0 = ±1/√2, A1 = ∓1/√2               -> both conflicted, consensus 0
# G2 [0,1],[1,0],[1,1],[1,1]: A0 = (-3,1,1,1)/2, A1 = (1,-3,1,1)/2 -> r0, r1 conflicted, -1/2
# G3 [1,1],[1,1]: no spread, no conflict.
# gd2po_snr at tau 0.4 masks |consensus| < 0.4: G0's two and G1's two (4 of the 6 conflicts).
# Kept fraction per group 1/3, 0, 1, 1; per rollout: three 1/3, two 0, six 1.
# --------------------------------------------------------------------------------------
METRIC_REWARDS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0],
                               [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # fmt: skip
METRIC_GROUPS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])


def test_authors_metrics_hand_example():
    result = compute_advantages(METRIC_REWARDS, METRIC_GROUPS, "gd2po_snr", snr_threshold=0.4)
    metrics = result.metrics
    assert result.keep_mask.tolist() == [False, False, True, False, False] + [True] * 6
    # Averaged per rollout, as the authors do (per group it would be 7/12).
    assert metrics["group_keep_ratio_mean"] == pytest.approx(7 / 11)
    assert metrics["group_keep_ratio_min"] == 0.0 and metrics["group_keep_ratio_max"] == pytest.approx(1.0)
    assert metrics["group_keep_ratio_std"] == pytest.approx(math.sqrt(62 / 363))
    # Conflicted consensus values: +1/3, +1/3, 0, 0, -1/2, -1/2.
    assert metrics["conflict_ratio"] == pytest.approx(6 / 11)
    assert metrics["consensus_in_conflict_mean"] == pytest.approx(-1 / 18, rel=1e-5)
    assert metrics["consensus_in_conflict_abs_mean"] == pytest.approx(5 / 18, rel=1e-5)
    assert metrics["consensus_in_conflict_median"] == pytest.approx(0.0, abs=1e-6)  # torch's lower median
    assert metrics["true_conflict_share"] == pytest.approx(4 / 6)
    assert metrics["active_reward_dims"] == 2.0


def test_authors_metrics_depend_on_tau_and_weights_not_on_the_estimator():
    for estimator in ("gdpo", "gd2po_hard"):  # true conflicts are those gd2po_snr would mask at tau
        result = compute_advantages(METRIC_REWARDS, METRIC_GROUPS, estimator, snr_threshold=0.6)
        assert result.metrics["true_conflict_share"] == pytest.approx(1.0)
    weighted = compute_advantages(METRIC_REWARDS, METRIC_GROUPS, "gd2po_snr", reward_weights=torch.tensor([1.0, 0.0]))
    assert weighted.metrics["active_reward_dims"] == 1.0
    assert weighted.metrics["conflict_ratio"] == 0.0  # a zero weight takes the dimension out of the filter


def test_authors_metrics_without_conflicts_are_zero():
    result = compute_advantages(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 0]), "gd2po_snr")
    assert result.metrics["conflict_ratio"] == 0.0
    for key in ("consensus_in_conflict_mean", "consensus_in_conflict_abs_mean", "consensus_in_conflict_median",
                "true_conflict_share", "group_keep_ratio_std"):  # fmt: skip
        assert result.metrics[key] == 0.0
    assert result.metrics["group_keep_ratio_mean"] == 1.0


# --------------------------------------------------------------------------------------
# mean_abs_summed_advantage and the opt-in group std floor
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator, expected", [
    ("grpo", (2 + SQRT2) / 5),  # |-1|, 0, 1, 1/√2, 1/√2 (its one normalised dimension)
    ("gdpo", (2 * SQRT3 + SQRT2) / 5),  # |Σ_k A_k| = √3, 0, √3, 1/√2, 1/√2
    ("gd2po_hard", (2 * SQRT3 + SQRT2) / 4),  # the conflicted rollout 1 (Σ = 0) is not kept
    ("gd2po_snr", (2 * SQRT3 + SQRT2) / 4),
])
def test_mean_abs_summed_advantage_over_kept_rollouts_before_reweighting(estimator, expected):
    # Reweighting (2/3 in group 0) and whitening would change these values; the metric is taken before both.
    result = compute_advantages(REWARDS, GROUPS, estimator)
    assert result.metrics["mean_abs_summed_advantage"] == pytest.approx(expected, rel=1e-5)


def test_mean_abs_summed_advantage_is_zero_when_everything_is_masked():
    rewards = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # both rollouts conflicted
    result = compute_advantages(rewards, torch.tensor([0, 0]), "gd2po_hard")
    assert not result.keep_mask.any()
    assert result.metrics["mean_abs_summed_advantage"] == 0.0


def test_group_std_floor_stops_a_near_constant_dimension_from_full_weight():
    # dim1 = 0, 0, 0.01: std 0.00577, so per-dimension normalisation turns a 0.01 difference into
    # -1/√3, -1/√3, 2/√3, as large as dim0's. A floor of 0.1 divides by 0.1 instead.
    rewards = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.01]])
    groups = torch.tensor([0, 0, 0])
    default = compute_advantages(rewards, groups, "gdpo", whiten=False)
    assert_values(default.advantages, [(-2 - 1) / SQRT3, (1 - 1) / SQRT3, (1 + 2) / SQRT3], atol=1e-3)
    floored = compute_advantages(rewards, groups, "gdpo", whiten=False, group_std_floor=0.1)
    dim1 = torch.tensor([-1 / 300, -1 / 300, 2 / 300]) / (0.1 + 1e-6)
    assert_values(floored.advantages, (torch.tensor([-2.0, 1.0, 1.0]) / SQRT3 + dim1).tolist(), atol=1e-4)
    # dim0's std (0.577) is above the floor: that dimension is untouched. Masking sees the floored values:
    # rollout 1 (A0 > 0, A1 < 0) stays conflicted, but its small A1 gives it a consensus near 1.
    snr = compute_advantages(rewards, groups, "gd2po_snr", snr_threshold=0.8, group_std_floor=0.1)
    assert snr.keep_mask.tolist() == [True, True, True]
    assert compute_advantages(rewards, groups, "gd2po_snr", snr_threshold=0.8).keep_mask.tolist() == [True, False, True]


@pytest.mark.parametrize("estimator", ["grpo", "gdpo", "gd2po_hard", "gd2po_snr"])
def test_group_std_floor_below_every_std_changes_nothing(estimator):
    default = compute_advantages(REWARDS, GROUPS, estimator)
    floored = compute_advantages(REWARDS, GROUPS, estimator, group_std_floor=0.1)  # every std is >= 0.5
    torch.testing.assert_close(floored.advantages, default.advantages)
    assert torch.equal(floored.keep_mask, default.keep_mask)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_group_std_floor(bad):
    with pytest.raises(ValueError, match="group_std_floor"):
        compute_advantages(REWARDS, GROUPS, "gdpo", group_std_floor=bad)


# --- dynamic sampling's group test (issue 18) ---------------------------------------------------------


def test_group_drop_reasons():
    from openrlhf_gd2po.advantages import group_drop_reason

    constant = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, 0.5]])
    opposed = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # every rollout conflicts, A_1 = -A_2: consensus 0
    constant_sum = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])  # sum 2 everywhere, spreads differ
    agreeing = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for estimator in ("grpo", "gdpo", "gd2po_hard", "gd2po_snr"):
        assert group_drop_reason(constant, estimator, "no_signal") == "no_signal"
        assert group_drop_reason(constant, estimator, "estimator") == "no_signal"
        assert group_drop_reason(opposed, estimator, "no_signal") is None  # no dimension is constant
        assert group_drop_reason(opposed, estimator, "estimator") == "estimator"
        assert group_drop_reason(agreeing, estimator, "estimator") is None
        assert group_drop_reason(constant, estimator, "off") is None
    # A constant sum still carries signal in each dimension: only grpo (which normalises the sum) has none.
    assert group_drop_reason(constant_sum, "grpo", "estimator") == "estimator"
    assert group_drop_reason(constant_sum, "gdpo", "estimator") is None
    assert group_drop_reason(constant_sum, "gd2po_snr", "estimator", snr_threshold=0.0) is None
    # Weights: a zero-weight dimension neither carries signal nor counts as one.
    assert group_drop_reason(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "gdpo", "no_signal", reward_weights=[1.0, 0.0]) == "no_signal"
    with pytest.raises(ValueError, match="dynamic sampling mode must be one of"):
        group_drop_reason(constant, "gdpo", "always")
