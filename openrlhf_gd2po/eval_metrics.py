"""OpenRLHF's eval logs (`--eval.dataset`) on every reward dimension, per data source.

OpenRLHF's `compute_eval_metrics` (ppo_trainer; the async trainer imports it too) logs pass@k of one
scalar per data source. `install()` swaps it, in both trainer modules, for `compute_eval_metrics` here:
OpenRLHF's keys, and for each data source `<ds>`:
- `eval_<ds>_reward/<dimension>` and `eval_<ds>_reward` (the weighted sum): means over the rollouts whose
  rewards were fetched; `eval_<ds>_reward_fetch_failed`: the share that failed (`--reward.on_failure mask`),
  which is left out of every mean, OpenRLHF's `pass1`/`pass<n>` included, never scored as 0;
- with `--eval.n_samples_per_prompt` >= 2, `eval_<ds>_gd2po/{conflict_ratio,advantage_cancellation,keep_ratio}`:
  compute_advantages on the eval groups under the run's estimator (gdpo's for OpenRLHF's own estimators,
  which mask nothing), as the training step logs them.

A row's data source is its `datasource` (OpenRLHF's key) or, without one, its `data_source` (verl's, the
GD²PO authors' files): `PromptDataset` reads both, `datasource` first.
"""

import torch

from openrlhf.datasets import PromptDataset as OpenRLHFPromptDataset
from openrlhf.trainer.ppo_trainer import compute_eval_metrics as openrlhf_eval_metrics
from openrlhf_gd2po.advantages import ESTIMATORS, compute_advantages
from openrlhf_gd2po.experience_maker import reward_dimensions

DIAGNOSTICS = ("conflict_ratio", "advantage_cancellation", "keep_ratio")


class PromptDataset(OpenRLHFPromptDataset):
    """OpenRLHF's PromptDataset; a row without `datasource` takes its `data_source`."""

    def __init__(self, dataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        if "data_source" in (getattr(dataset, "column_names", None) or ()):
            self.datasources = [row.get("datasource") or row.get("data_source") or "default" for row in dataset]


def compute_eval_metrics(eval_dataloader, samples_list, n_samples_per_prompt):
    """OpenRLHF's eval logs plus ours (module docstring). The run's args come from the eval dataset, which
    OpenRLHF's PromptDataset builds with the strategy: this function has OpenRLHF's signature."""
    logs = openrlhf_eval_metrics(eval_dataloader, samples_list, n_samples_per_prompt)
    if not samples_list or "reward_fetch_failed" not in samples_list[0].info:  # not scored by --reward.servers
        return logs
    args = eval_dataloader.dataset.strategy.args
    datasource = {}
    for sources, prompts, _labels, _images in eval_dataloader:
        datasource.update(zip(prompts, sources))
    sources = [datasource.get(s.prompts[0], "unknown") for s in samples_list]
    dimensions, weights = reward_dimensions(args)
    for source in dict.fromkeys(sources):
        for key in ("pass1", f"pass{n_samples_per_prompt}"):  # OpenRLHF's count a failed rollout as 0; ours replace them
            logs.pop(f"eval_{source}_{key}", None)
        rows = [s for s, name in zip(samples_list, sources) if name == source]
        metrics = source_metrics(rows, [d.name for d in dimensions], weights, args, n_samples_per_prompt)
        logs.update({f"eval_{source}_{key}": value for key, value in metrics.items()})
    return logs


def source_metrics(samples, names, weights, args, n):
    """One data source's samples (whole groups of n, in order) → its metrics, keys without the prefix."""
    rewards = torch.stack([torch.cat([s.info[f"reward/{name}"] for s in samples]) for name in names], dim=1)
    fetched = torch.cat([s.info["reward_fetch_failed"] for s in samples]) == 0
    metrics = {"reward_fetch_failed": (~fetched).double().mean().item()}
    if not fetched.any():
        return metrics
    summed = rewards.double() @ weights.double()
    metrics.update({f"reward/{name}": rewards[fetched, k].double().mean().item() for k, name in enumerate(names)})
    metrics["reward"] = summed[fetched].mean().item()
    # OpenRLHF's pass1 / pass<n> over the fetched rollouts of each group (a group with none is left out).
    groups = torch.arange(len(samples)) // n
    per_group = [summed[fetched & (groups == g)] for g in range(len(samples) // n)]
    per_group = [values for values in per_group if len(values)]
    metrics["pass1"] = sum(values.mean().item() for values in per_group) / len(per_group)
    if n > 1:
        metrics[f"pass{n}"] = sum(values.max().item() for values in per_group) / len(per_group)
        estimator = args.algo.advantage.estimator if args.algo.advantage.estimator in ESTIMATORS else "gdpo"
        result = compute_advantages(
            rewards[fetched], groups[fetched], estimator, snr_threshold=args.gd2po.snr_threshold,
            reward_weights=weights, group_std_floor=args.gd2po.group_std_floor,
        )
        metrics.update({f"gd2po/{key}": result.metrics[key] for key in DIAGNOSTICS})
    return metrics
