"""`gd2po-analyze`'s numbers: reward statistics, correlations, every estimator's metrics, the text report."""

import math

import torch

from openrlhf_gd2po.advantages import ESTIMATORS, compute_advantages

SNR_THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def analyze_rewards(rewards: torch.Tensor, group_ids: torch.Tensor, lengths: torch.Tensor, names: list[str]) -> dict:
    """Reward statistics, correlations and every estimator's conflict and keep metrics."""
    def run(estimator, **kwargs):
        return compute_advantages(rewards, group_ids, estimator, response_lengths=lengths, **kwargs).metrics

    def keep(metrics):
        return {key: metrics[key] for key in ("keep_ratio", "group_keep_ratio_mean", "group_keep_ratio_min",
                                              "group_keep_ratio_max", "mean_abs_summed_advantage")}

    estimators = {estimator: run(estimator) for estimator in ESTIMATORS}
    _, group_index = torch.unique(group_ids, return_inverse=True)
    rows_to_groups = group_index[:, None].expand_as(rewards)

    def per_group(reduce):  # [groups, K]
        empty = torch.zeros(int(group_index.max()) + 1, rewards.shape[1], dtype=rewards.dtype)
        return empty.scatter_reduce_(0, rows_to_groups, rewards, reduce, include_self=False)

    group_means, group_max, group_min = per_group("mean"), per_group("amax"), per_group("amin")
    # Each dimension's group-normalised advantage A_k: GDPO on that one column, without whitening.
    per_dim = torch.stack([
        compute_advantages(rewards[:, [k]], group_ids, "gdpo", whiten=False).advantages.double()
        for k in range(rewards.shape[1])
    ], dim=1)
    # A dimension that is constant within a group gives all its rollouts a zero advantage.
    varying = (group_max > group_min).double().mean(dim=0)
    return {
        "rewards": {
            name: {"mean": column.mean().item(), "std": column.std(correction=0).item(),
                   "min": column.min().item(), "max": column.max().item(), "groups_varying": share.item()}
            for name, column, share in zip(names, rewards.T, varying)
        },
        "correlation": {
            "over_rollouts": pearson_matrix(rewards),
            # What group normalisation sees: each rollout's rewards minus its prompt's mean.
            "within_groups": pearson_matrix(rewards - group_means[group_index]),
        },
        # Both depend only on the per-dimension advantages, the same for every estimator.
        "conflict_ratio": estimators["gdpo"]["conflict_ratio"],
        "advantage_cancellation": estimators["gdpo"]["advantage_cancellation"],
        "estimators": {estimator: keep(metrics) for estimator, metrics in estimators.items()},
        "snr_sweep": [{"tau": tau, **keep(run("gd2po_snr", snr_threshold=tau))} for tau in SNR_THRESHOLDS],
        # Per rollout, for the plots: Σ_k A_k and Σ_k |A_k| (consensus = their ratio).
        "rollout_advantages": {"summed": per_dim.sum(dim=1).tolist(), "magnitude": per_dim.abs().sum(dim=1).tolist(),
                               "conflict": ((per_dim > 1e-8).any(dim=1) & (per_dim < -1e-8).any(dim=1)).tolist()},
    }


def pearson_matrix(values: torch.Tensor) -> list[list[float | None]]:
    """Pearson correlation between the columns; None where a column is constant (undefined)."""
    centred = values - values.mean(dim=0)
    norms = centred.norm(dim=0)
    matrix = ((centred.T @ centred) / (norms[:, None] * norms[None, :])).clamp(-1, 1)
    return [[value if math.isfinite(value) else None for value in row] for row in matrix.tolist()]


def format_report(summary: dict) -> str:
    names, config = summary["dimensions"], summary["config"]
    width = max(12, *(len(name) for name in names))
    lines = [
        f"gd2po-analyze: {config['num_prompts']} prompts x {config['n_samples']} samples "
        f"(max {config['max_new_tokens']} new tokens) from {config['model']}",
        f"generation {summary['seconds']['generation']:.0f} s, scoring {summary['seconds']['scoring']:.1f} s, "
        f"total {summary['seconds']['total']:.0f} s on {config['torch_threads']} threads",
        "",
        f"{'reward':<{width}}  {'mean':>8} {'std':>8} {'min':>8} {'max':>8}   groups where it varies",
    ]
    for name, stats in summary["rewards"].items():
        lines.append(
            f"{name:<{width}}  " + " ".join(f"{stats[key]:8.3f}" for key in ("mean", "std", "min", "max"))
            + f"   {stats['groups_varying']:.0%}"
        )
    for key, title in (("over_rollouts", "over all rollouts"), ("within_groups", "within prompt groups")):
        lines += ["", f"Pearson correlation {title} (- = a constant dimension)"]
        lines.append(" " * width + "  " + " ".join(f"{name:>{width}}" for name in names))
        for name, row in zip(names, summary["correlation"][key]):
            lines.append(f"{name:<{width}}  " + " ".join(f"{'-' if v is None else f'{v:.2f}':>{width}}" for v in row))
    # With no reward varying within any group every advantage is 0 and the cancellation share is 0/0.
    if any(stats["groups_varying"] > 0 for stats in summary["rewards"].values()):
        cancellation = f"{summary['advantage_cancellation']:.3f}  (share of sum_k |A_k| that opposite signs cancel)"
    else:
        cancellation = "    -  (no reward varies within any prompt group: every advantage is 0)"
    lines += [
        "",
        f"conflict ratio          {summary['conflict_ratio']:.3f}  "
        "(rollouts whose dimension advantages have both signs)",
        f"advantage cancellation  {cancellation}",
        "",
        f"{'keep ratio':<22} {'kept':>6}   group keep mean / min / max",
    ]
    keep_rows = [(name, summary["estimators"][name]) for name in ("grpo", "gdpo", "gd2po_hard")]
    keep_rows += [(f"gd2po_snr tau={row['tau']:.1f}", row) for row in summary["snr_sweep"]]
    lines[-1] += "   mean |sum_k A_k| of kept rollouts"
    for label, row in keep_rows:
        lines.append(
            f"{label:<22} {row['keep_ratio']:6.3f}   {row['group_keep_ratio_mean']:.3f} / "
            f"{row['group_keep_ratio_min']:.3f} / {row['group_keep_ratio_max']:.3f}"
            f"        {row['mean_abs_summed_advantage']:.3f}"
        )
    lines.append("(|sum_k A_k| before reweighting and whitening; grpo: its one normalised summed reward)")
    return "\n".join(lines)
