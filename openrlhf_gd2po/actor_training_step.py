"""OpenRLHF's actor training step, made safe for micro-batches without a single action token.

`--gd2po.masked_rollouts exclude` zeroes the action_mask of masked rollouts, and OpenRLHF 0.11.2's
`ActorPPOTrainer.training_step` divides by action-token counts in three places that then hit 0:
the loss normalisers (`batch_num_tokens`, `global_batch_size`: 0/0 = NaN loss and NaN weights when a
whole optimizer step is excluded), its masked-mean metrics (`ppo_kl`, `ppo_clip_ratio`,
`logprobs_diff`: NaN in the logs), and `ppo_train`'s token-weighted log average (a float
ZeroDivisionError when a micro-batch has no token). We wrap the step rather than copy it.
"""

import torch

from openrlhf.utils.loss_utils import get_loss_batch_info

# Weight of a token-less micro-batch in ppo_train's token-weighted log average: non-zero so the
# average never divides by 0, negligible next to any real token count.
EMPTY_MICRO_BATCH_TOKENS = 1e-6


def wrap_training_step(training_step):
    """Return `ActorPPOTrainer.training_step` that gives zero loss, zero gradient and zero metrics
    where there is no action token, and exactly the original step everywhere else."""

    def training_step_without_empty_divisions(self, experience, kl_ctl, step, loss_batch_info=None):
        if loss_batch_info is None:  # the dynamic-batch path: computed as OpenRLHF does, then guarded
            loss_batch_info = get_loss_batch_info(
                self.strategy, experience.action_mask, replay_buffer=self.replay_buffer, step=step,
                dynamic_batch=self.args.train.dynamic_batch_enable,
            )  # fmt: skip
        # With no token in the whole step every masked sum is exactly 0, so any non-zero divisor gives 0.
        loss_batch_info = {
            key: torch.where(value > 0, value, torch.ones_like(value)) if torch.is_tensor(value) else value
            for key, value in loss_batch_info.items()
        }
        status = training_step(self, experience, kl_ctl, step, loss_batch_info)
        if status["num_action_tokens"] == 0:
            for key, weight in status["weights"].items():
                if weight == "token":
                    status["metrics"][key] = torch.zeros(())
            status["num_action_tokens"] = EMPTY_MICRO_BATCH_TOKENS
        return status

    training_step_without_empty_divisions.wrapped = training_step
    return training_step_without_empty_divisions
