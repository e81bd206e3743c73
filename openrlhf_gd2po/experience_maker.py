"""OpenRLHF's RemoteExperienceMaker with multi-server rewards and the GD²PO advantage step.

Traceability: `--reward.servers` → `RewardStream` in GD2POSamplesGenerator (or `fetch_rewards` here, for a
batch scored after generation) → `experience.info["reward/<name>"]` →
`compute_advantages` → token-level `experience.advantages` → `experience.info["gd2po/*"]`,
which OpenRLHF's actor averages per sample into its wandb/tensorboard logs.

KL (a documented choice): kept rollouts are treated exactly like OpenRLHF's `group_norm`: the
scalar advantage sits on the last response token and, unless `--algo.kl.use_loss`, the per-token
KL penalty is added before the cumulative return. With `--algo.kl.use_loss` (KL as a loss term, as
GRPO has it; the GD²PO authors use no KL) the advantage is the same scalar on every response token.
Advantages are never clipped.

Masked rollouts (`--gd2po.masked_rollouts`): `zero_advantage` (default, the authors' code) gives
them advantage 0 on every token, so no policy gradient, but OpenRLHF's KL loss and entropy bonus
still act on them and their tokens count in the loss denominators. `exclude` also zeroes their
`action_mask`: no policy, KL or entropy gradient and no place in any denominator.
"""

import torch

from openrlhf.models.utils import compute_reward
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.utils.logging_utils import init_logger
from openrlhf_gd2po.advantages import ESTIMATORS, compute_advantages
from openrlhf_gd2po.agent_rewards import request_columns
from openrlhf_gd2po.reward_client import fetch_rewards
from openrlhf_gd2po.reward_spec import parse_reward_servers

logger = init_logger(__name__)

# GD2POSamplesGenerator's totals of one generation call, and its per-step counts of samples carried over
# or dropped (counts and seconds, not rates): key prefixes.
CALL_TOTALS = ("gd2po/prompts_consumed", "gd2po/reward_requests", "reward_seconds/", "gd2po/samples_")


class GD2POExperienceMaker(RemoteExperienceMaker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_dimensions, self.reward_weights = reward_dimensions(self.args)

    @torch.no_grad()
    def make_experience_batch(self, rollout_samples):
        # GD2POSamplesGenerator scores each group while the step generates; a batch built elsewhere
        # (another generator, a test) is scored here, the same way, in one fetch.
        if self.reward_dimensions and "reward_fetch_failed" not in rollout_samples[0].info:
            self.fetch_multi_rewards(rollout_samples)
        sum_call_totals(rollout_samples)
        return super().make_experience_batch(rollout_samples)

    @torch.no_grad()
    def fetch_multi_rewards(self, rollout_samples):
        """Score every rollout on every dimension in one fetch_rewards call; see attach_rewards."""
        args = self.args.reward
        queries = [self.tokenizer.decode(s.sequences[0], skip_special_tokens=False) for s in rollout_samples]
        batch = fetch_rewards(
            self.reward_dimensions,
            queries,
            [s.prompts[0] for s in rollout_samples],
            [s.labels[0] for s in rollout_samples],
            batch_size=args.batch_size,
            timeout=args.timeout,
            retries=args.retries,
            max_in_flight=args.max_in_flight,
            on_failure=args.on_failure,
            deadline=args.deadline,
            **request_columns(self.args, rollout_samples, self.reward_dimensions, self.tokenizer),
        )
        attach_rewards(rollout_samples, batch, self.reward_dimensions, self.reward_weights)
        warn_failed(int(batch.failed.sum()), len(rollout_samples))
        for sample in rollout_samples:
            for dim in self.reward_dimensions:
                # Not under timing/: OpenRLHF sums every timing/* key into timing/step_total, and this
                # time is already inside timing/make_experience.
                sample.info[f"reward_seconds/{dim.name}"] = torch.tensor([batch.seconds[dim.name]])

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        if self.advantage_estimator not in ESTIMATORS:
            return super().compute_advantages_and_returns(experiences)
        args = self.args
        names = [d.name for d in self.reward_dimensions]
        rewards = torch.cat([torch.stack([e.info[f"reward/{n}"] for n in names], dim=1) for e in experiences])
        fetched = torch.cat([e.info["reward_fetch_failed"] for e in experiences]) == 0
        # OpenRLHF's prompt grouping: samples keep their rollout index, n per prompt in order.
        group_ids = torch.cat([torch.as_tensor(e.index) for e in experiences]) // args.rollout.n_samples_per_prompt
        lengths = torch.cat([e.action_mask.sum(dim=-1) for e in experiences])

        advantages = torch.zeros(len(rewards))
        keep_mask = torch.zeros(len(rewards), dtype=torch.bool)
        group_keep_ratio = torch.zeros(len(rewards))
        metrics = {}
        if fetched.any():
            result = compute_advantages(
                rewards[fetched],
                group_ids[fetched],
                self.advantage_estimator,
                response_lengths=lengths[fetched],
                snr_threshold=args.gd2po.snr_threshold,
                group_reweight=not args.gd2po.no_group_reweight,
                whiten=not args.gd2po.no_whiten,
                group_std_floor=args.gd2po.group_std_floor,
                reward_weights=self.reward_weights,
            )
            advantages[fetched], keep_mask[fetched] = result.advantages, result.keep_mask
            group_keep_ratio[fetched] = result.group_keep_ratio
            metrics = {k: v for k, v in result.metrics.items() if not k.startswith("reward_dim")}

        start = 0
        for experience in experiences:
            rows = slice(start, start + len(experience.index))
            start = rows.stop
            kept = keep_mask[rows]
            # No --reward.clip_range: whitening over many all-zero groups legitimately pushes the few
            # informative rollouts past |A| = 10, and a range like (0, 1) would erase every negative
            # advantage. The authors do not clip; OpenRLHF's own estimators still do.
            token_rewards = compute_reward(
                advantages[rows], self.kl_ctl.value, experience.kl, action_mask=experience.action_mask
            )
            returns = self.get_cumulative_returns(token_rewards, experience.action_mask, 1.0)
            # Only the model's tokens carry an advantage: the cumulative return also runs through the prompt and,
            # in an agent rollout, the environment's text between turns, which action_mask leaves out.
            experience.returns = returns * (kept[:, None] & experience.action_mask.bool())
            experience.advantages = experience.returns.clone()
            if args.gd2po.masked_rollouts == "exclude":
                # OpenRLHF's policy, KL and entropy losses are sums over action_mask divided by the
                # step's action_mask token (or sequence) count, so an all-zero row is in no loss and no
                # denominator. Micro-batches with no token left are handled in actor_training_step.
                experience.action_mask = experience.action_mask & kept[:, None]
            experience.info["return"] = token_rewards.sum(dim=-1) * kept
            experience.info["gd2po/keep"] = kept.float()
            experience.info["gd2po/group_keep_ratio"] = group_keep_ratio[rows]
            for key, value in metrics.items():  # batch-level: the same value on every sample
                experience.info[f"gd2po/{key}"] = torch.full((len(kept),), value)
            experience.kl = None
        return experiences


def reward_dimensions(args):
    """`--reward.servers` as RewardDimensions ([] without it) and `--reward.weights` as a tensor (default 1s)."""
    servers = getattr(args.reward, "servers", None)
    dimensions = parse_reward_servers(servers) if servers else []
    weights = getattr(args.reward, "weights", None)
    return dimensions, torch.tensor(weights or [1.0] * len(dimensions), dtype=torch.float32)


def attach_rewards(samples, batch, dimensions, weights):
    """Fill each sample's `rewards` (the weighted sum) and its info: `reward`, `reward/<dimension>` and
    `reward_fetch_failed`, which compute_advantages_and_returns reads back."""
    # Failed rollouts never reach an advantage (they are masked); 0 only keeps the logs finite.
    rewards = torch.nan_to_num(batch.rewards, nan=0.0)
    combined = rewards @ weights
    # Each value is a tensor of its own, stride (1,): the async trainer sends samples through a Ray
    # queue, whose zero-copy serializer (OpenRLHF sets RAY_ENABLE_ZERO_COPY_TORCH_TENSORS) refuses a
    # column slice (stride (K,)), and plain pickling of a slice would carry the whole batch's storage.
    for i, sample in enumerate(samples):
        sample.rewards = combined[i : i + 1].clone()
        sample.info["reward"] = combined[i : i + 1].clone()
        sample.info["reward_fetch_failed"] = batch.failed[i : i + 1].float()
        for k, dim in enumerate(dimensions):
            sample.info[f"reward/{dim.name}"] = rewards[i, k : k + 1].clone()


def sum_call_totals(samples):
    """Every sample of this step gets the step's sum of each generation-call total, so OpenRLHF's mean over
    samples logs the step's own share. A call's first sample carries the call's totals and its other samples
    0, so a call that feeds several steps (async, --rollout.vllm_generate_batch_size > --rollout.batch_size)
    counts once, in the step that trains its first sample, as OpenRLHF's own prompts_consumed and
    timing/generation count it; rates (pass rate, drop shares) stay per sample, a mean over the step's calls."""
    for key in [k for k in samples[0].info if k.startswith(CALL_TOTALS)]:
        total = float(sum(sample.info[key].sum() for sample in samples))
        for sample in samples:
            sample.info[key] = torch.tensor([total])


def warn_failed(num_failed, num_samples):
    if num_failed:
        logger.warning(
            f"Reward fetch failed for {num_failed}/{num_samples} rollouts; "
            "they are masked out of this step (--reward.on_failure mask)"
        )
