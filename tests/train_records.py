"""What tests/test_train_tiny_cpu.py reads of the real train_gd2po_ray job, recorded from inside its
Ray workers: `install()` runs there through $GD2PO_WORKER_SETUP (examples/scripts/train_tiny_cpu.sh
names it beside the CPU CUDA aid). Test-only, like the aid: it changes no OpenRLHF logic, it only
writes down what OpenRLHF's own objects hold. Each record is on when its variable names a path:

$GD2PO_METRICS_LOG   one JSON line per training step: the status dict PPOTrainer hands to
                     save_logs_and_checkpoints (its own metric names: gd2po/*, reward/*, timing/*...)
                     with "global_step".
$GD2PO_EVAL_LOG      one JSON line per evaluation (--eval.dataset): the eval logs BasePPOTrainer hands to
                     save_best_checkpoint (the sync and the async trainer do), with "global_step".
$GD2PO_REPLAY_DUMP   a folder: every Experience appended to the actor's replay buffer, as a torch file
                     (advantages, action_mask, index, info), named by process and call.
$GD2PO_VLLM_PROBE    one JSON line per weight sync: vLLM's log-probs of PROBE_TOKENS (prompt_logprobs)
                     right after PPOTrainer.broadcast_to_vllm, with "sync" (1 after step 1, ...).
"""

import itertools
import json
import os

METRICS_ENV, REPLAY_ENV, PROBE_ENV = "GD2PO_METRICS_LOG", "GD2PO_REPLAY_DUMP", "GD2PO_VLLM_PROBE"
EVAL_ENV = "GD2PO_EVAL_LOG"
PROBE_TOKENS = list(range(40, 104))  # byte tokens of the tiny test tokenizer: "()*+,-./0123..." and letters


def install():
    from openrlhf_gd2po import patch_after_import

    if os.environ.get(METRICS_ENV) or os.environ.get(PROBE_ENV) or os.environ.get(EVAL_ENV):
        patch_after_import("openrlhf.trainer.ppo_trainer", _record_trainer)
    if os.environ.get(REPLAY_ENV):
        patch_after_import("openrlhf.trainer.ppo_utils.replay_buffer", _record_replay_buffer)


def _plain(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    return value


def _record_trainer(module):
    base = module.BasePPOTrainer
    if getattr(base, "_gd2po_records", False):
        return
    base._gd2po_records = True
    # @ray.remote copied BasePPOTrainer's methods onto the actor class it built (ray/actor.py
    # _modify_class) when this module ran, so that class is wrapped too. The driver's copy is what Ray
    # pickles for the PPOTrainer actor, wrappers included; they read the variables where they run.
    ray_class = getattr(getattr(module.PPOTrainer, "__ray_metadata__", None), "modified_class", None)
    for cls in filter(None, [base, ray_class]):
        cls.save_logs_and_checkpoints = _logging_metrics(cls.__dict__["save_logs_and_checkpoints"])
        cls.broadcast_to_vllm = _probing_vllm(cls.__dict__["broadcast_to_vllm"])
        cls.save_best_checkpoint = _logging_eval(cls.__dict__["save_best_checkpoint"])


def _logging_metrics(save):
    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        path = os.environ.get(METRICS_ENV)
        if path and logs_dict:
            row = {"global_step": global_step}
            row.update({k: _plain(v) for k, v in logs_dict.items() if k != "generated_samples"})
            with open(path, "a") as log:
                log.write(json.dumps(row) + "\n")
        return save(self, global_step, logs_dict, client_states)

    return save_logs_and_checkpoints


def _logging_eval(save_best):
    def save_best_checkpoint(self, eval_metrics, global_step, client_states=None):
        path = os.environ.get(EVAL_ENV)
        if path:
            with open(path, "a") as log:
                log.write(json.dumps({"global_step": global_step, **eval_metrics}) + "\n")
        return save_best(self, eval_metrics, global_step, client_states)

    return save_best_checkpoint


def _probing_vllm(broadcast):
    syncs = [0]

    def broadcast_to_vllm(self):
        broadcast(self)
        path = os.environ.get(PROBE_ENV)
        if path and self.vllm_engines:
            import ray
            from vllm import SamplingParams

            syncs[0] += 1
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            output = ray.get(self.vllm_engines[0].generate.remote(PROBE_TOKENS, params))
            pairs = zip(PROBE_TOKENS[1:], output.prompt_logprobs[1:])  # the first token has none
            logprobs = [None] + [entry[token].logprob for token, entry in pairs]
            with open(path, "a") as log:
                log.write(json.dumps({"sync": syncs[0], "tokens": PROBE_TOKENS, "logprobs": logprobs}) + "\n")

    return broadcast_to_vllm


def _record_replay_buffer(module):
    buffer = module.NaiveReplayBuffer
    if getattr(buffer, "_gd2po_records", False):
        return
    buffer._gd2po_records = True
    append = buffer.append
    calls = itertools.count()

    def record_append(self, experience):
        import torch

        folder = os.environ[REPLAY_ENV]
        os.makedirs(folder, exist_ok=True)
        record = {
            "advantages": experience.advantages,
            "action_mask": experience.action_mask,
            "index": torch.as_tensor(experience.index),
            "sequences": experience.sequences,
            "attention_mask": experience.attention_mask,
            "info": {k: v for k, v in experience.info.items() if isinstance(v, torch.Tensor)},
        }
        torch.save(record, os.path.join(folder, f"{os.getpid()}_{next(calls)}.pt"))
        return append(self, experience)

    buffer.append = record_append
