"""OpenRLHF's SamplesGenerator, scoring each prompt's group on every reward dimension as soon as it is
generated, and GD²PO's dynamic sampling (`--gd2po.dynamic_sampling`).

`_generate_vllm` keeps OpenRLHF's loop (dispatch the prompts, take each group as `ray.wait` returns
it, refill a dropped group with the next prompt) and changes two things when `--reward.servers` is set:
- each finished group goes to a RewardStream (merged requests of up to `--reward.batch_size` samples,
  see reward_stream), so rewards are fetched while the other groups still generate;
- a group is kept or dropped when its rewards are back, by `group_drop_reason` on all its dimensions,
  not on the mean of one score; at most `--gd2po.dynamic_sampling_max_extra_prompts` refills per call.
The GD²PO batch step (normalise, mask, reweight, whiten) stays in GD2POExperienceMaker.
"""

import concurrent.futures
import time
from collections import Counter

import ray
import torch

from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator, _collect_prompt_batch
from openrlhf.utils.logging_utils import init_logger
from openrlhf_gd2po.advantages import group_drop_reason
from openrlhf_gd2po.experience_maker import attach_rewards, warn_failed
from openrlhf_gd2po.reward_client import parse_reward_servers
from openrlhf_gd2po.reward_stream import RewardStream

logger = init_logger(__name__)

DROP_REASONS = ("no_signal", "estimator")
POLL_SECONDS = 0.02  # ray.wait cannot also wait on the reward futures, so it polls while both are pending


class GD2POSamplesGenerator(SamplesGenerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        servers = getattr(self.args.reward, "servers", None)
        self.reward_dimensions = parse_reward_servers(servers) if servers else []
        weights = getattr(self.args.reward, "weights", None)
        self.reward_weights = torch.tensor(weights or [1.0] * len(self.reward_dimensions), dtype=torch.float32)

    def _generate_vllm(self, dataloader_iter, num_prompts, dynamic_filtering, **generate_kwargs):
        if not self.reward_dimensions:
            return super()._generate_vllm(dataloader_iter, num_prompts, dynamic_filtering, **generate_kwargs)
        prompts, labels, images, exhausted = _collect_prompt_batch(dataloader_iter, num_prompts)
        if not prompts:
            return [], 0, True
        max_extra = self.args.gd2po.dynamic_sampling_max_extra_prompts
        max_extra = 2 * len(prompts) if max_extra is None else max_extra
        prompts_consumed = len(prompts)
        generating = self._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        scoring = {}  # reward future -> its group's samples
        accepted, drops, failed = [], Counter(), 0
        generation_done = time.perf_counter()
        with self._reward_stream() as stream:
            while generating or scoring:
                if generating:
                    ready, generating = ray.wait(generating, num_returns=1, timeout=POLL_SECONDS if scoring else 10.0)
                    for ref in ready:
                        group = [self._process_response_into_experience(r, **generate_kwargs) for r in ray.get(ref)]
                        queries = [self.tokenizer.decode(s.sequences[0], skip_special_tokens=False) for s in group]
                        scoring[stream.submit(queries, [s.prompts[0] for s in group], [s.labels[0] for s in group])] = group
                    if not generating:
                        stream.flush()
                        generation_done = time.perf_counter()
                else:
                    concurrent.futures.wait(scoring, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in [f for f in scoring if f.done()]:
                    group, batch = scoring.pop(future), future.result()  # on_failure raise: raises here
                    attach_rewards(group, batch, self.reward_dimensions, self.reward_weights)
                    failed += int(batch.failed.sum())
                    reason = None if batch.failed.any() else self._drop_reason(batch.rewards)
                    if reason is None:
                        accepted.extend(group)
                        continue
                    drops[reason] += 1
                    if prompts_consumed - len(prompts) < max_extra and not exhausted:
                        new_prompts, new_labels, new_images, exhausted = _collect_prompt_batch(dataloader_iter, 1)
                        prompts_consumed += len(new_prompts)
                        if new_prompts:
                            generating += self._dispatch_prompts_to_vllm(
                                new_prompts, new_labels, images=new_images, **generate_kwargs
                            )
            reward_wait = time.perf_counter() - generation_done
        warn_failed(failed, stream.submitted)
        groups_scored = len(accepted) // self.args.rollout.n_samples_per_prompt + sum(drops.values())
        if len(accepted) < len(prompts) * self.args.rollout.n_samples_per_prompt:
            logger.warning(
                f"Dynamic sampling kept {len(accepted) // self.args.rollout.n_samples_per_prompt}/{len(prompts)} "
                f"groups after drawing {prompts_consumed} prompts (dropped: {dict(drops)}; "
                f"--gd2po.dynamic_sampling_max_extra_prompts {max_extra}); this step trains on what was kept"
            )
        metrics = {
            "gd2po/dynamic_sampling_pass_rate": (groups_scored - sum(drops.values())) / groups_scored,
            "gd2po/prompts_consumed": prompts_consumed,
            **{f"gd2po/dynamic_sampling_drop_{r}": drops[r] / groups_scored for r in DROP_REASONS},
            # Not under timing/ (OpenRLHF sums those into step_total): inside timing/generation.
            "reward_seconds/wait_after_generation": reward_wait,
            **{f"reward_seconds/{name}": seconds for name, seconds in stream.seconds.items()},
            "gd2po/reward_requests": stream.requests,
        }
        for sample in accepted:
            sample.info.update({key: torch.tensor([float(value)]) for key, value in metrics.items()})
        return accepted, prompts_consumed, exhausted

    def _reward_stream(self):
        args = self.args.reward
        return RewardStream(
            self.reward_dimensions, batch_size=args.batch_size, timeout=args.timeout, retries=args.retries,
            max_in_flight=args.max_in_flight, on_failure=args.on_failure, deadline=args.deadline,
            flush_wait=args.flush_wait,
        )

    def _drop_reason(self, rewards):
        """A fully fetched group's reason to be dropped (group_drop_reason), or None. A group with a failed
        rollout is never dropped: the experience maker masks what failed, and the warning says so."""
        gd2po = self.args.gd2po
        return group_drop_reason(
            rewards, self.args.algo.advantage.estimator, gd2po.dynamic_sampling, snr_threshold=gd2po.snr_threshold,
            reward_weights=self.reward_weights, group_std_floor=gd2po.group_std_floor,
        )
