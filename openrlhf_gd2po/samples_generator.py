"""OpenRLHF's SamplesGenerator, scoring each prompt's group on every reward dimension as soon as it is
generated, and GD²PO's dynamic sampling (`--gd2po.dynamic_sampling`).

`_generate_vllm` keeps OpenRLHF's loop (dispatch the prompts, take each group as `ray.wait` returns
it, refill a dropped group with the next prompt) and changes two things when `--reward.servers` is set:
- each finished group goes to a RewardStream (merged requests of up to `--reward.batch_size` samples,
  see reward_stream), so rewards are fetched while the other groups still generate;
- a group is kept or dropped when its rewards are back, by `group_drop_reason` on all its dimensions,
  not on the mean of one score; at most `--gd2po.dynamic_sampling_max_extra_prompts` refills per call.
Evaluation (`generate_eval_samples`, OpenRLHF's `--eval.*`) goes through the same loop and the same
RewardStream, with --eval.n_samples_per_prompt and --eval.temperature, but never drops, refills or cuts
a group: every eval prompt is measured (eval_metrics turns the samples into the logged keys).
The GD²PO batch step (normalise, mask, reweight, whiten) stays in GD2POExperienceMaker.
"""

import concurrent.futures
import math
import time
from collections import Counter
from types import SimpleNamespace

import ray
import torch

from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator, _collect_prompt_batch
from openrlhf.utils.logging_utils import init_logger
from openrlhf_gd2po.advantages import group_drop_reason
from openrlhf_gd2po.agent_rewards import request_columns
from openrlhf_gd2po.experience_maker import CALL_TOTALS, attach_rewards, reward_dimensions, warn_failed
from openrlhf_gd2po.reward_stream import RewardStream

logger = init_logger(__name__)

DROP_REASONS = ("no_signal", "estimator")
CARRIED_KEY = "gd2po_carried_groups"  # in the prompt loader's checkpoint state
POLL_SECONDS = 0.02  # ray.wait cannot also wait on the reward futures, so it polls while both are pending


def seed_prompt_order(dataloader, seed):
    """Seed the prompt loader's shuffle with --train.seed. OpenRLHF's trainer actor has no process group, so
    its loader shuffles with a RandomSampler seeded from torch's unseeded global generator: every run drew
    the prompts in another order, and a resumed run could not match an uninterrupted one. (In a process
    group OpenRLHF's DistributedSampler is seeded already and has no generator to seed.) A resumed run
    restores this generator's state from the checkpoint's data_loader_state_dict."""
    generator = getattr(getattr(dataloader, "sampler", None), "generator", None)
    if generator is not None:
        generator.manual_seed(seed)


def checkpoint_carried_groups(generator):
    """Save the carried groups in the checkpoint with the prompt loader's position (OpenRLHF saves and
    restores `prompts_dataloader.state_dict()`): their prompts count as drawn there, so a resumed run
    without them would never train them, and would not match an uninterrupted one."""
    loader = generator.prompts_dataloader
    if not hasattr(loader, "state_dict"):  # a plain list of batches (tests)
        return
    save, load = loader.state_dict, loader.load_state_dict

    def load_state_dict(state):
        state = dict(state)
        generator.carried = state.pop(CARRIED_KEY, [])
        load(state)

    loader.state_dict = lambda: {**save(), CARRIED_KEY: generator.carried}
    loader.load_state_dict = load_state_dict


def move_call_totals(source, target):
    """The call totals (CALL_TOTALS) on samples left out of this step go to one it trains: the step that
    trains a call's samples logs what the call drew and fetched, as when nothing is left out."""
    for sample in source:
        for key in [k for k in sample.info if k.startswith(CALL_TOTALS)]:
            target.info[key] = target.info.get(key, 0) + sample.info[key]
            sample.info[key] = torch.zeros_like(sample.info[key])


class GD2POSamplesGenerator(SamplesGenerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_dimensions, self.reward_weights = reward_dimensions(self.args)
        self.evaluating = False
        self.carried = []  # whole groups left over from the last batch, trained first in the next one
        seed_prompt_order(self.prompts_dataloader, self.args.train.seed)
        checkpoint_carried_groups(self)

    @torch.no_grad()
    def generate_eval_samples(self, **generate_kwargs):
        """OpenRLHF's pass over the whole eval set; `_generate_vllm` scores each group as in training (same
        servers, stream, timeouts, deadline and on_failure) and, while `evaluating`, keeps every group."""
        self.evaluating = True
        try:
            return super().generate_eval_samples(**generate_kwargs)
        finally:
            self.evaluating = False

    @torch.no_grad()
    def generate_samples(self, **generate_kwargs):
        """OpenRLHF's batch, after the groups carried over from the last one. A batch that is not OpenRLHF's
        full one (the episode's last prompts, dynamic sampling at its cap, a carried remainder) trains whole
        optimizer steps only (_short_batch_unit); the groups drawn last wait for the next batch, and what is
        left when the prompts run out is dropped. OpenRLHF's trainers skip an empty batch."""
        samples, pass_rate, prompts_consumed, exhausted = super().generate_samples(**generate_kwargs)
        samples = self.carried + samples  # drawn before this batch: trained first
        unit = self.args.rollout.batch_size * self.args.rollout.n_samples_per_prompt  # OpenRLHF's full batch
        if len(samples) != unit:
            unit = self._short_batch_unit()
        trained = len(samples) // unit * unit
        left, samples = samples[trained:], samples[:trained]
        self.carried = [] if exhausted else left
        dropped = len(left) if exhausted else 0
        if dropped:
            logger.warning(
                f"The prompts ran out with {dropped} samples that make no whole optimizer step (a multiple of "
                f"{unit} samples = lcm(--rollout.n_samples_per_prompt, --train.batch_size, "
                f"--rollout.micro_batch_size x data-parallel ranks)): they are dropped"
            )
        if samples:
            move_call_totals(left, samples[0])
            counts = {"gd2po/samples_carried_over": len(self.carried), "gd2po/samples_dropped": dropped}
            for i, sample in enumerate(samples):  # step totals, on its first sample (sum_call_totals)
                sample.info.update({key: torch.tensor([0.0 if i else float(n)]) for key, n in counts.items()})
        return samples, pass_rate, prompts_consumed, exhausted

    def _generate_vllm(self, dataloader_iter, num_prompts, dynamic_filtering, **generate_kwargs):
        if not self.reward_dimensions:
            return super()._generate_vllm(dataloader_iter, num_prompts, dynamic_filtering, **generate_kwargs)
        prompts, labels, images, exhausted = _collect_prompt_batch(dataloader_iter, num_prompts)
        if not prompts:
            return [], 0, True
        max_extra = self.args.gd2po.dynamic_sampling_max_extra_prompts
        step = SimpleNamespace(accepted=[], drops=Counter(), failed=0, prompts_consumed=len(prompts),
                               exhausted=exhausted, reward_wait=0.0)
        with self._reward_stream() as stream:
            self._score_while_generating(step, stream, dataloader_iter, prompts, labels, images,
                                         2 * len(prompts) if max_extra is None else max_extra, generate_kwargs)
        if self.evaluating:  # nothing dropped, so nothing to refill or log per step
            if step.failed:
                logger.warning(f"Reward fetch failed for {step.failed}/{stream.submitted} eval rollouts; they are "
                               "left out of the eval means and counted in eval_<source>_reward_fetch_failed")
            return step.accepted, step.prompts_consumed, step.exhausted
        warn_failed(step.failed, stream.submitted)
        n = self.args.rollout.n_samples_per_prompt
        groups_scored = len(step.accepted) // n + sum(step.drops.values())
        if step.drops and len(step.accepted) < len(prompts) * n:  # at the cap, or out of prompts
            logger.warning(
                f"Dynamic sampling kept {len(step.accepted) // n}/{len(prompts)} groups after drawing "
                f"{step.prompts_consumed} prompts (dropped: {dict(step.drops)}; "
                f"--gd2po.dynamic_sampling_max_extra_prompts {max_extra})"
            )
        metrics = {
            "gd2po/dynamic_sampling_pass_rate": 1 - sum(step.drops.values()) / groups_scored,
            "gd2po/prompts_consumed": step.prompts_consumed,
            **{f"gd2po/dynamic_sampling_drop_{r}": step.drops[r] / groups_scored for r in DROP_REASONS},
            # Not under timing/ (OpenRLHF sums those into step_total): inside timing/generation.
            "reward_seconds/wait_after_generation": step.reward_wait,
            **{f"reward_seconds/{name}": seconds for name, seconds in stream.seconds.items()},
            "gd2po/reward_requests": stream.requests,
        }
        # One call can feed several steps (async over-sampling): its first sample carries the call's totals
        # (CALL_TOTALS), the others 0, and the experience maker gives each step the sum over its samples.
        for i, sample in enumerate(step.accepted):
            sample.info.update({key: torch.tensor([0.0 if i and key.startswith(CALL_TOTALS) else float(value)])
                                for key, value in metrics.items()})
        return step.accepted, step.prompts_consumed, step.exhausted

    def _score_while_generating(self, step, stream, dataloader_iter, prompts, labels, images, max_extra,
                                generate_kwargs):
        """OpenRLHF's loop: each group from ray.wait goes to the stream; each group whose rewards are back
        is kept, or dropped and replaced by the next prompt while fewer than max_extra were drawn."""
        generating = self._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        # Groups are kept in the order their prompts were drawn, not finished: a short batch leaves out
        # the groups drawn last, never the slowest (the longest responses).
        drawn = {ref: i for i, ref in enumerate(generating)}
        kept = []  # (draw number, group)
        scoring = {}  # reward future -> its group's draw number and samples
        generation_done = time.perf_counter()
        while generating or scoring:
            if generating:
                ready, generating = ray.wait(generating, num_returns=1, timeout=POLL_SECONDS if scoring else 10.0)
                for ref in ready:
                    group = [self._process_response_into_experience(r, **generate_kwargs) for r in ray.get(ref)]
                    queries = [self.tokenizer.decode(s.sequences[0], skip_special_tokens=False) for s in group]
                    agent = request_columns(self.args, group, self.reward_dimensions, self.tokenizer)
                    group_prompts, group_labels = [s.prompts[0] for s in group], [s.labels[0] for s in group]
                    scoring[stream.submit(queries, group_prompts, group_labels, **agent)] = drawn[ref], group
                if not generating:
                    stream.flush()
                    generation_done = time.perf_counter()
            else:
                concurrent.futures.wait(scoring, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in [f for f in scoring if f.done()]:
                (number, group), batch = scoring.pop(future), future.result()  # on_failure raise: raises here
                attach_rewards(group, batch, self.reward_dimensions, self.reward_weights)
                step.failed += int(batch.failed.sum())
                reason = None if batch.failed.any() or self.evaluating else self._drop_reason(batch.rewards)
                if reason is None:
                    kept.append((number, group))
                    continue
                step.drops[reason] += 1
                if step.prompts_consumed - len(prompts) < max_extra and not step.exhausted:
                    new_prompts, new_labels, new_images, step.exhausted = _collect_prompt_batch(dataloader_iter, 1)
                    step.prompts_consumed += len(new_prompts)
                    if new_prompts:
                        for ref in self._dispatch_prompts_to_vllm(new_prompts, new_labels, images=new_images,
                                                                  **generate_kwargs):  # fmt: skip
                            drawn[ref] = len(drawn)
                            generating.append(ref)
        step.reward_wait = time.perf_counter() - generation_done
        step.accepted = [sample for _, group in sorted(kept, key=lambda k: k[0]) for sample in group]

    def _short_batch_unit(self):
        """A short batch is cut to a multiple of this many samples: whole groups, whole optimizer steps
        (--train.batch_size; a partial one would leave its gradients accumulated into the next step) and the
        same number of micro-batches on every data-parallel rank (ZeRO-3 hangs otherwise)."""
        args = self.args
        ranks = args.actor.num_nodes * args.actor.num_gpus_per_node // args.ds.ring_attn_size // args.ds.tensor_parallel_size
        return math.lcm(args.rollout.n_samples_per_prompt, args.train.batch_size, args.rollout.micro_batch_size * ranks)

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
