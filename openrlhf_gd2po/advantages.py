"""GD²PO advantage estimation (arXiv 2606.16771), pure torch, no OpenRLHF import.

Read next to the paper:
  1. per-dimension group normalisation A_k = (r_k - mean_g) / (std_g + 1e-6)        (GDPO)
  2. conflict: some A_k > 1e-8 and some A_k < -1e-8 on the same rollout
     hard: mask every conflicted rollout; snr: mask only conflicted rollouts whose
     consensus |Σ_k A_k| / (Σ_k |A_k| + 1e-8) is below τ
  3. scale each rollout's Σ_k A_k by its query's kept fraction (group_keep_ratio)
  4. whiten over the tokens of kept rollouts only; masked rollouts get exactly 0

Every group operation is a scatter over `torch.unique(group_ids, return_inverse=True)`,
so the cost is a handful of O(N·K) kernels whatever the number or size of groups.
"""

from dataclasses import dataclass

import torch

ESTIMATORS = ("grpo", "gdpo", "gd2po_hard", "gd2po_snr")
GROUP_NORM_EPS = 1e-6  # std epsilon of GRPO/GDPO group normalisation (authors' code)
SIGN_EPS = 1e-8  # |A_k| at or below this has no sign
SNR_EPS = 1e-8
WHITEN_EPS = 1e-8


@dataclass
class AdvantageResult:
    advantages: torch.Tensor  # [N] float, one scalar per rollout, exactly 0.0 where masked
    keep_mask: torch.Tensor  # [N] bool
    group_keep_ratio: torch.Tensor  # [N] float, kept fraction of the rollout's query group
    metrics: dict  # str -> float


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    estimator: str,
    response_lengths: torch.Tensor | None = None,
    snr_threshold: float = 0.8,
    group_reweight: bool = True,
    whiten: bool = True,
    reward_weights: torch.Tensor | None = None,
    group_std_floor: float = 0.0,
) -> AdvantageResult:
    """One scalar advantage per rollout from K reward dimensions; see the module docstring.

    `reward_weights` scale each dimension's normalised advantage (for grpo, each raw reward
    before the sum). Conflict and SNR are measured on the weighted advantages, so a zero
    weight removes a dimension from the filter as well as from the sum.

    `group_std_floor` (opt-in; 0 = the authors' std + 1e-6) divides by max(group std, floor) + 1e-6,
    so a dimension that is nearly constant inside a group is not blown up to full weight.
    """
    rewards, group_ids, lengths, weights = _validate(
        rewards, group_ids, estimator, response_lengths, snr_threshold, reward_weights
    )
    group_std_floor = float(group_std_floor)
    if not group_std_floor >= 0 or group_std_floor == float("inf"):
        raise ValueError(f"group_std_floor must be finite and >= 0, got {group_std_floor}")
    n, k = rewards.shape
    group_index, group_size = _group_index(group_ids)

    per_dim = _group_normalize(rewards, group_index, group_size, weights, group_std_floor)
    lowest, highest = per_dim.aminmax(dim=1)
    conflict = (highest > SIGN_EPS) & (lowest < -SIGN_EPS)
    summed = per_dim.sum(dim=1)
    magnitude = per_dim.abs().sum(dim=1)
    consensus = summed / (magnitude + SNR_EPS)

    keep_mask = torch.ones(n, dtype=torch.bool, device=rewards.device)
    if estimator == "gd2po_hard":
        keep_mask = ~conflict
    elif estimator == "gd2po_snr":
        keep_mask = ~(conflict & (consensus.abs() < min(max(float(snr_threshold), 0.0), 1.0)))

    kept_per_group = torch.zeros_like(group_size).index_add_(0, group_index, keep_mask.double())
    group_keep_ratio = (kept_per_group / group_size)[group_index]

    if estimator == "grpo":
        advantages = _group_normalize(
            (rewards * weights).sum(dim=1, keepdim=True), group_index, group_size, std_floor=group_std_floor
        )[:, 0]
        effective = advantages  # GRPO normalises one summed dimension: that is its Σ_k A_k
    else:
        effective = summed
        advantages = summed
        if estimator.startswith("gd2po") and group_reweight:
            advantages = advantages * group_keep_ratio
        advantages = torch.where(keep_mask, advantages, torch.zeros_like(advantages))
        if whiten:
            advantages = _whiten(advantages, lengths * keep_mask)

    metrics = {
        "conflict_ratio": conflict.double().mean().item(),
        "keep_ratio": keep_mask.double().mean().item(),
        # Share of the per-dimension advantage mass that sign disagreement cancels in the sum.
        "advantage_cancellation": 1.0 - (summed.abs().sum() / magnitude.sum().clamp(min=SNR_EPS)).item(),
        **_authors_metrics(conflict, consensus, group_keep_ratio, snr_threshold, weights),
        # The paper's claim that masking "preserves the magnitude of effective advantages": mean
        # |Σ_k A_k| over the rollouts this estimator keeps, before reweighting and whitening (0 if none).
        "mean_abs_summed_advantage": (
            effective.abs()[keep_mask].mean().item() if keep_mask.any() else 0.0
        ),
    }
    for dim in range(k):
        metrics[f"reward_dim{dim}_mean"] = rewards[:, dim].mean().item()
        metrics[f"reward_dim{dim}_std"] = rewards[:, dim].std(correction=0).item()
    return AdvantageResult(advantages.float(), keep_mask, group_keep_ratio.float(), metrics)


DYNAMIC_SAMPLING = ("off", "no_signal", "estimator")


def group_drop_reason(
    rewards: torch.Tensor,
    estimator: str,
    mode: str,
    snr_threshold: float = 0.8,
    reward_weights: torch.Tensor | None = None,
    group_std_floor: float = 0.0,
) -> str | None:
    """Why dynamic sampling drops one query's group ([n, K] rewards), or None to keep it.

    "no_signal": every dimension with a non-zero weight is constant, so every A_k is 0.
    "estimator" (mode "estimator" only): `estimator` gives no rollout a non-zero advantage before
    whitening: gd2po_* mask every rollout (kept fraction 0), gdpo's A_k cancel exactly, grpo's
    weighted sum is constant. Whitening is batch-wide and cannot give such a group a signal of its own.
    """
    if mode not in DYNAMIC_SAMPLING:
        raise ValueError(f"dynamic sampling mode must be one of {DYNAMIC_SAMPLING}, got {mode!r}")
    if mode == "off":
        return None
    rewards = torch.as_tensor(rewards)
    weights = torch.ones(rewards.shape[1]) if reward_weights is None else torch.as_tensor(reward_weights)
    weighted = rewards[:, weights != 0]
    if bool((weighted == weighted[:1]).all()):
        return "no_signal"
    if mode == "no_signal":
        return None
    result = compute_advantages(
        rewards, torch.zeros(len(rewards), dtype=torch.long), estimator, snr_threshold=snr_threshold,
        group_reweight=False, whiten=False, reward_weights=weights, group_std_floor=group_std_floor,
    )
    has_signal = result.keep_mask & (result.advantages.abs() > SIGN_EPS)
    return None if bool(has_signal.any()) else "estimator"


def _authors_metrics(conflict, consensus, group_keep_ratio, snr_threshold, weights):
    """The authors' logged statistics (tool-calling/verl/trainer/ppo/ray_trainer.py), same definitions.

    group_keep_ratio_*: over rollouts (each rollout carries its group's ratio), std without Bessel.
    consensus_in_conflict_*: Σ_k A_k / Σ_k |A_k| over conflicted rollouts (median: torch's lower
    median); true_conflict_share: conflicted rollouts with |consensus| < τ (what gd2po_snr masks)
    per conflicted rollout. All 0 when nothing conflicts. active_reward_dims: dimensions that
    enter the sum (non-zero weight; the authors count the reward switches that are on).
    """
    in_conflict = consensus[conflict]
    true_conflict = in_conflict.abs() < min(max(float(snr_threshold), 0.0), 1.0)
    some = len(in_conflict) > 0
    return {
        "group_keep_ratio_mean": group_keep_ratio.mean().item(),
        "group_keep_ratio_min": group_keep_ratio.min().item(),
        "group_keep_ratio_max": group_keep_ratio.max().item(),
        "group_keep_ratio_std": group_keep_ratio.std(correction=0).item(),
        "consensus_in_conflict_mean": in_conflict.mean().item() if some else 0.0,
        "consensus_in_conflict_abs_mean": in_conflict.abs().mean().item() if some else 0.0,
        "consensus_in_conflict_median": in_conflict.median().item() if some else 0.0,
        "true_conflict_share": true_conflict.double().mean().item() if some else 0.0,
        "active_reward_dims": float((weights != 0).sum().item()),
    }


def _group_index(group_ids):
    """Dense group index per rollout and each group's size (float64)."""
    _, group_index = torch.unique(group_ids, return_inverse=True)
    group_size = torch.bincount(group_index).double()
    return group_index, group_size


def _group_normalize(values, group_index, group_size, weights=1.0, std_floor=0.0):
    """(x - group mean) / (max(group std, std_floor) + 1e-6) per column, Bessel-corrected std, times `weights`.

    A group of one rollout has no spread to normalise by: it keeps its raw value
    (mean 0, std 1), as GRPO's reference implementation does.
    """
    num_groups = group_size.shape[0]
    sums = values.new_zeros(num_groups, values.shape[1]).index_add_(0, group_index, values)
    # Singletons (mean 0, scale 1) and weights are applied per group, so each [N, K] step runs once.
    singleton = (group_size == 1)[:, None]
    centred = values - torch.where(singleton, 0.0, sums / group_size[:, None])[group_index]
    squares = torch.zeros_like(sums).index_add_(0, group_index, centred * centred)
    std = (squares / (group_size - 1).clamp(min=1)[:, None]).sqrt().clamp(min=std_floor)
    return centred * (torch.where(singleton, 1.0, 1.0 / (std + GROUP_NORM_EPS)) * weights)[group_index]


def _whiten(values, token_weights):
    """Token-weighted whitening: each rollout counts once per response token in `token_weights`.

    Unbiased variance over tokens, (x - mean) / sqrt(var + 1e-8). Rollouts with zero weight
    (masked, or empty responses) get 0; with no weighted token at all everything is 0.
    """
    token_weights = token_weights.double()
    total = token_weights.sum()
    if total <= 0:
        return torch.zeros_like(values)
    mean = (values * token_weights).sum() / total
    squared = ((values - mean).square() * token_weights).sum()
    var = squared / (total - 1) if total > 1 else torch.zeros_like(squared)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    return torch.where(token_weights > 0, whitened, torch.zeros_like(whitened))


def _validate(rewards, group_ids, estimator, response_lengths, snr_threshold, reward_weights):
    """Check shapes and values; return float64 rewards, group ids, float64 lengths and weights."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2 or rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must be a non-empty [N, K] tensor, got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got dtype {rewards.dtype}")
    n, k = rewards.shape
    bad = (~torch.isfinite(rewards)).nonzero()
    if len(bad):
        row, dim = bad[0].tolist()
        raise ValueError(
            f"rewards[{row}, {dim}] is {rewards[row, dim].item()} (rollout {row}, dimension {dim}); "
            f"{len(bad)} non-finite reward(s) in total"
        )
    group_ids = torch.as_tensor(group_ids)
    if group_ids.shape != (n,) or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be an integer tensor of shape [{n}], got dtype {group_ids.dtype} "
            f"shape {tuple(group_ids.shape)}"
        )
    if response_lengths is None:
        lengths = torch.ones(n)
    else:
        lengths = torch.as_tensor(response_lengths)
        if lengths.shape != (n,):
            raise ValueError(f"response_lengths must have shape [{n}], got {tuple(lengths.shape)}")
        # `~(x >= 0)` also catches NaN, which would otherwise turn every whitened advantage NaN.
        bad_lengths = ~(lengths >= 0) | torch.isinf(lengths)
        if bad_lengths.any():
            row = int(bad_lengths.nonzero()[0])
            raise ValueError(f"response_lengths[{row}] is {lengths[row].item()}; lengths must be finite and >= 0")
        lengths = lengths.double()
    if reward_weights is None:
        weights = torch.ones(k)
    else:
        weights = torch.as_tensor(reward_weights, dtype=torch.float64)
        if weights.shape != (k,):
            raise ValueError(f"reward_weights must have {k} entries (one per dimension), got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all():
            raise ValueError(f"reward_weights must be finite, got {weights.tolist()}")
    snr_threshold = float(snr_threshold)
    if snr_threshold != snr_threshold:
        raise ValueError("snr_threshold is NaN")
    device = rewards.device
    return rewards.double(), group_ids.to(device), lengths.to(device, torch.float64), weights.to(device, torch.float64)
