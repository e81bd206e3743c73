"""OpenRLHF's actor training step, made safe for micro-batches without a single action token and
for non-finite losses and advantages.

`--gd2po.masked_rollouts exclude` zeroes the action_mask of masked rollouts, and OpenRLHF 0.11.2's
`ActorPPOTrainer.training_step` divides by action-token counts in three places that then hit 0:
the loss normalisers (`batch_num_tokens`, `global_batch_size`: 0/0 = NaN loss and NaN weights when a
whole optimizer step is excluded), its masked-mean metrics (`ppo_kl`, `ppo_clip_ratio`,
`logprobs_diff`: NaN in the logs), and `ppo_train`'s token-weighted log average (a float
ZeroDivisionError when a micro-batch has no token). We wrap the step rather than copy it.

A non-finite loss or advantage on any rank makes every rank skip that optimizer update, with a
warning and the `gd2po/skipped_updates` metric.
"""

import logging

import torch

from openrlhf.utils.loss_utils import get_loss_batch_info

logger = logging.getLogger(__name__)

# Weight of a token-less micro-batch in ppo_train's token-weighted log average: non-zero so the
# average never divides by 0, negligible next to any real token count.
EMPTY_MICRO_BATCH_TOKENS = 1e-6
SKIPPED_UPDATES = "gd2po/skipped_updates"


def wrap_training_step(training_step):
    """Return `ActorPPOTrainer.training_step` that gives zero loss, zero gradient and zero metrics
    where there is no action token, skips updates with a non-finite loss or advantage, and is
    exactly the original step everywhere else."""

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
        with skipping_non_finite_updates(self, experience, step):
            status = training_step(self, experience, kl_ctl, step, loss_batch_info)
        if status["num_action_tokens"] == 0:
            for key, weight in status["weights"].items():
                if weight == "token":
                    status["metrics"][key] = torch.zeros(())
            status["num_action_tokens"] = EMPTY_MICRO_BATCH_TOKENS
        return status

    training_step_without_empty_divisions.wrapped = training_step
    return training_step_without_empty_divisions


class skipping_non_finite_updates:
    """For one `training_step`: sees the loss it backpropagates and, at the micro-batch that ends an
    optimizer step (gradient accumulation boundary), skips the update if any micro-batch of that
    step had a non-finite loss or advantage on any rank. Every rank runs one all-reduce per
    micro-batch, so all ranks agree and ZeRO-3's collectives stay matched.

    The skip is DeepSpeed's own (>= 0.19.8, every ZeRO stage): an update whose gradient norm is not
    finite is discarded, its gradients cleared, the LR schedule held. A NaN loss can still have a
    finite gradient (a NaN at a masked position), so the loss of the step's last micro-batch is made NaN."""

    def __init__(self, trainer, experience, step):
        self.trainer, self.strategy, self.step = trainer, trainer.strategy, step
        self.non_finite = {"advantages": not bool(torch.isfinite(experience.advantages).all())}
        self.skipping = None

    def __enter__(self):
        strategy = self.strategy
        own = vars(strategy)
        self.overridden = {name: own[name] for name in ("backward", "optimizer_step") if name in own}
        backward, optimizer_step = strategy.backward, strategy.optimizer_step

        def backward_or_skip(loss, model, *args, **kwargs):
            self.non_finite["loss"] = not bool(torch.isfinite(loss).all())
            flags = strategy.all_reduce(torch.tensor([float(v) for v in self.non_finite.values()]), op="max")
            seen = getattr(self.trainer, "_gd2po_non_finite", set())
            seen = self.trainer._gd2po_non_finite = seen | {name for name, bad in zip(self.non_finite, flags) if bad}
            engine = model.model  # OpenRLHF's Actor holds the DeepSpeed engine
            if seen and engine.is_gradient_accumulation_boundary():
                self.skip(engine, seen)
                loss = loss * float("nan")
            return backward(loss, model, *args, **kwargs)

        def optimizer_step_checked(optimizer, model, *args, **kwargs):
            result = optimizer_step(optimizer, model, *args, **kwargs)
            if self.skipping is not None and model.model.skipped_steps != self.skipping + 1:
                raise RuntimeError("DeepSpeed applied an update whose gradient is not finite: needs deepspeed>=0.19.8")
            return result

        strategy.backward, strategy.optimizer_step = backward_or_skip, optimizer_step_checked
        return self

    def skip(self, engine, names):
        self.skipping = engine.skipped_steps
        self.trainer._gd2po_non_finite = set()
        self.trainer._gd2po_skipped_updates = getattr(self.trainer, "_gd2po_skipped_updates", 0) + 1
        if self.strategy.is_rank_0():
            logger.warning(
                "Skipping optimizer update %d (micro-batch %d of this training step): non-finite %s on at "
                "least one rank", engine.global_steps + 1, self.step, " and ".join(sorted(names)),
            )  # fmt: skip

    def __exit__(self, *exc):
        for name in ("backward", "optimizer_step"):  # back to the class's methods, or what a caller had set
            if name in self.overridden:
                setattr(self.strategy, name, self.overridden[name])
            else:
                delattr(self.strategy, name)


def wrap_ppo_train(ppo_train):
    """Return `ActorPPOTrainer.ppo_train` whose status has `gd2po/skipped_updates`: how many of this
    training step's optimizer updates were skipped for a non-finite loss or advantage."""

    def ppo_train_counting_skips(self, kl_ctl):
        self._gd2po_skipped_updates = 0
        status = ppo_train(self, kl_ctl)
        status[SKIPPED_UPDATES] = float(self._gd2po_skipped_updates)
        return status

    ppo_train_counting_skips.wrapped = ppo_train
    return ppo_train_counting_skips
