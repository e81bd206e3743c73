"""`gd2po-analyze`'s plots (matplotlib, from the `analyze` extra)."""

import math
from pathlib import Path


def write_plots(summary: dict, out: Path) -> None:
    """reward_histograms.png, keep_ratio_vs_tau.png, correlation.png and conflict.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["dimensions"]
    figure, axes = plt.subplots(1, len(names), figsize=(3.5 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names):
        axis.hist([r["rewards"][name] for r in summary["rollouts"]], bins=20)
        axis.set_title(name)
        axis.set_xlabel("reward")
    axes[0][0].set_ylabel("rollouts")
    figure.tight_layout()
    figure.savefig(out / "reward_histograms.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 3.5))
    taus = [row["tau"] for row in summary["snr_sweep"]]
    axis.plot(taus, [row["keep_ratio"] for row in summary["snr_sweep"]], "o-", label="gd2po_snr keep ratio")
    axis.plot(taus, [row["group_keep_ratio_min"] for row in summary["snr_sweep"]], "s--", label="gd2po_snr worst group")
    axis.axhline(summary["estimators"]["gd2po_hard"]["keep_ratio"], color="gray", linestyle=":", label="gd2po_hard")
    axis.set_xlabel("SNR threshold tau")
    axis.set_ylabel("kept fraction")
    axis.set_ylim(-0.02, 1.02)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "keep_ratio_vs_tau.png", dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(
        1, 2, figsize=(3 + 2 * len(names), 2 + 0.8 * len(names)), sharey=True, layout="constrained"
    )
    for axis, (key, title) in zip(axes, (("over_rollouts", "over rollouts"), ("within_groups", "within groups"))):
        matrix = [[math.nan if v is None else v for v in row] for row in summary["correlation"][key]]
        image = axis.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_yticks(range(len(names)), names)
        axis.set_title(f"Pearson {title}")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                axis.text(j, i, "-" if math.isnan(value) else f"{value:.2f}", ha="center", va="center")
    figure.colorbar(image, ax=list(axes))
    figure.savefig(out / "correlation.png", dpi=100)
    plt.close(figure)

    # conflict.png: how far apart the dimensions pull on each conflicted rollout, and what is left of the
    # summed advantage on the rollouts each estimator keeps (the paper's "preserved magnitude").
    advantages = summary["rollout_advantages"]
    consensus = [abs(summed) / magnitude for summed, magnitude, conflict
                 in zip(advantages["summed"], advantages["magnitude"], advantages["conflict"]) if conflict]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.hist(consensus, bins=[i / 20 for i in range(21)], color="tab:red")
    left.axvline(0.8, color="black", linestyle=":", label="gd2po_snr default tau 0.8")
    left.set_title(f"{len(consensus)} of {len(advantages['summed'])} rollouts have mixed-sign A_k")
    left.set_xlabel("consensus |sum_k A_k| / sum_k |A_k| (0 = cancels fully)")
    left.set_ylabel("conflicted rollouts")
    left.set_xlim(0, 1)
    left.legend(fontsize=8)
    labels = ["grpo", "gdpo", "gd2po_hard"] + [f"snr tau={row['tau']:.1f}" for row in summary["snr_sweep"]]
    rows = [summary["estimators"][name] for name in ("grpo", "gdpo", "gd2po_hard")] + summary["snr_sweep"]
    right.bar(labels, [row["mean_abs_summed_advantage"] for row in rows], color="tab:blue")
    for x, row in enumerate(rows):
        right.text(x, row["mean_abs_summed_advantage"], f"keep\n{row['keep_ratio']:.2f}", ha="center", va="bottom",
                   fontsize=7)
    right.set_title("mean |sum_k A_k| over kept rollouts")
    right.tick_params(axis="x", rotation=45)
    right.margins(y=0.2)
    figure.tight_layout()
    figure.savefig(out / "conflict.png", dpi=100)
    plt.close(figure)
