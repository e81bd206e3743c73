"""OpenRLHF's PPO actor training step (ActorPPOTrainer) under DeepSpeed ZeRO-3 on CPU, fed with
GD2POExperienceMaker's output experiences.

Run as a script by tests/test_training_step.py, in its own process because it initialises
torch.distributed (gloo, world size 1): `zero3_actor_training_step.py MODEL PORT INPUT.pt [INPUT.pt ...]`.
INPUT.pt holds the trainer args (our real CLI), the experiences of each --gd2po.masked_rollouts
mode and which probes to run. Prints one `REPORT {json}` line per input with what the test asserts.

Everything between the experiences and the weights is OpenRLHF's: DeepspeedStrategy.prepare,
ActorPPOTrainer with its real PolicyLoss, KL loss and entropy, its NaiveReplayBuffer and ppo_train.
OpenRLHF assumes CUDA in a few device look-ups (`torch.cuda.current_device()`, a CUDA sync); those
are pointed at the CPU here, which is the only thing this script changes.
"""

import json
import os
import sys
from unittest import mock

# OpenRLHF's entropy is a torch.compile'd function: on a busy 2-core CPU, Inductor spends minutes
# compiling C++ kernels for every new shape. Eager computes the same values.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
from cpu_deepspeed import init_cpu_distributed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from torch.distributed.device_mesh import init_device_mesh

import openrlhf_gd2po
from openrlhf.trainer.ppo_utils.experience import make_experience_batch, split_experience_batch
from openrlhf.trainer.ray import ppo_actor

KL_COEF = 0.1


def cpu_device_lookups():
    """OpenRLHF builds `cuda:{current_device()}` once (replay buffer) and moves tensors to
    `current_device()` elsewhere; 0 for the former (never used on this path), "cpu" for the latter."""
    return mock.patch.object(torch.cuda, "current_device", return_value="cpu")


def build_trainer(args, model_path):
    from openrlhf.models import Actor
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    strategy = DeepspeedStrategy(seed=0, max_norm=args.actor.max_norm, micro_train_batch_size=args.train.micro_batch_size,
                                 train_batch_size=args.train.batch_size, zero_stage=args.ds.zero_stage, args=args)  # fmt: skip
    # setup_distributed does this with NCCL and a CUDA mesh; the same on gloo and a CPU mesh (main
    # initialises torch.distributed once for all inputs).
    strategy.world_size = 1
    strategy.ds_device_mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp", "sp", "tp"))
    strategy.setup_ring_attn(strategy.ds_device_mesh)
    strategy.accumulated_gradient = args.train.batch_size // args.train.micro_batch_size
    torch.manual_seed(0)
    # sdpa, as the real runs' actor (eager attention on the long ToolRL prompts: 72 -> 42 s for this module's test)
    actor = Actor(model_path, attn_implementation="sdpa", param_dtype="bf16", ds_config=strategy.get_ds_train_config())
    actor_cfg = dict(optim="adam", adam=dict(vars(args.actor.adam)), lr_scheduler="constant", max_norm=args.actor.max_norm,
                     scheduler_steps=100)  # fmt: skip
    # torch's AdamW: DeepSpeed's CPU Adam would first compile a C++ op for a minute.
    strategy.get_ds_train_config = lambda **kw: _with_torch_adam(DeepspeedStrategy.get_ds_train_config(strategy, **kw))
    actor, optimizer, scheduler = strategy.prepare((actor, actor_cfg))
    with mock.patch.object(torch.cuda, "current_device", return_value=0), \
            mock.patch.object(ppo_actor, "torch_dist_barrier_and_cuda_sync"):  # fmt: skip
        trainer = ppo_actor.ActorPPOTrainer(strategy, actor, None, optimizer, scheduler,
                                            micro_train_batch_size=args.train.micro_batch_size,
                                            dataloader_pin_memory=False)  # fmt: skip
    return trainer


def _with_torch_adam(config):
    if "optimizer" in config:
        config["optimizer"]["params"]["torch_adam"] = True
    return config


def full_gradient(trainer):
    engine = trainer.actor.model
    gradient = torch.cat([safe_get_full_grad(p).float().flatten() for p in engine.module.parameters()])
    engine.optimizer.zero_grad()
    return gradient


def weights(trainer):
    return torch.cat([safe_get_full_fp32_param(p).flatten() for p in trainer.actor.model.module.parameters()])


def gradient_of(trainer, experience, entropy_coef, guarded=True):
    """The gradient one real training step accumulates (its optimizer step held back), and its status."""
    trainer.args.actor.entropy_coef = entropy_coef
    step = ppo_actor.ActorPPOTrainer.training_step
    step = step if guarded else step.wrapped
    with mock.patch.object(trainer.strategy, "optimizer_step"), cpu_device_lookups():
        status = step(trainer, experience, KL_COEF, 0)
    return full_gradient(trainer), status


def with_new_responses(experience, rows):
    """A copy whose `rows` have other response tokens: what those rows contribute changes."""
    changed = make_experience_batch(split_experience_batch(experience))
    for row in rows:
        tokens = changed.attention_mask[row].bool()
        tokens[0] = False
        generator = torch.Generator().manual_seed(row)
        changed.sequences[row, tokens] = torch.randint(0, 250, (int(tokens.sum()),), generator=generator)
    return changed


def keep_of(experience):
    return torch.stack(list(experience.info["gd2po/keep"])).bool()


def finite_metrics(status):
    values = [v for v in status["metrics"].values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(v.float()).all()) for v in values) and all(
        v == v for v in status["metrics"].values() if isinstance(v, float)
    )


def gradient_probes(trainer, batches, entropy_coef):
    """Per mode: does changing the masked rows change the gradient (KL/entropy) or not (exclude)."""
    report = {}
    # Variants first: a training step adds batch-level entries to experience.info, which split cannot take.
    keep = keep_of(batches["exclude"])
    only_excluded = make_experience_batch([item for item, kept in zip(split_experience_batch(batches["exclude"]), keep)
                                           if not kept])  # fmt: skip
    zero_advantage = batches["zero_advantage"]
    zero_advantage_masked = (~keep_of(zero_advantage)).nonzero().flatten().tolist()
    policy_only = with_new_responses(zero_advantage, []), with_new_responses(zero_advantage, zero_advantage_masked)
    for mode, batch in batches.items():
        kept = keep_of(batch)
        masked, kept_rows = (~kept).nonzero().flatten().tolist(), kept.nonzero().flatten().tolist()
        masked_variant, kept_variant = with_new_responses(batch, masked), with_new_responses(batch, kept_rows[:1])
        # zero_advantage with the KL loss only: what reaches masked rows is the KL gradient.
        entropy = entropy_coef if mode == "exclude" else None
        reference, status = gradient_of(trainer, batch, entropy)
        masked_changed, _ = gradient_of(trainer, masked_variant, entropy)
        kept_changed, _ = gradient_of(trainer, kept_variant, entropy)
        report[mode] = {
            "masked_rows": masked,
            "gradient_norm": reference.norm().item(),
            "masked_changed_max_diff": (masked_changed - reference).abs().max().item(),
            "kept_changed_max_diff": (kept_changed - reference).abs().max().item(),
            "num_action_tokens": status["num_action_tokens"],
        }
    # zero_advantage with the KL loss and the entropy bonus off: only the policy gradient is left, and
    # masked rollouts (advantage 0 on every token) contribute exactly nothing to it.
    trainer.args.algo.kl.use_loss = False
    reference, _ = gradient_of(trainer, policy_only[0], None)
    masked_changed, _ = gradient_of(trainer, policy_only[1], None)
    trainer.args.algo.kl.use_loss = True
    report["zero_advantage_policy_only"] = {
        "gradient_norm": reference.norm().item(),
        "masked_changed_max_diff": (masked_changed - reference).abs().max().item(),
    }
    # A micro-batch, and optimizer step, made only of excluded rollouts.
    gradient, status = gradient_of(trainer, only_excluded, entropy_coef)
    unguarded, _ = gradient_of(trainer, only_excluded, entropy_coef, guarded=False)
    report["only_excluded"] = {
        "rows": len(only_excluded.sequences),
        "gradient_max_abs": gradient.abs().max().item(),
        "gradient_finite": bool(torch.isfinite(gradient).all()),
        "metrics_finite": finite_metrics(status),
        "unguarded_gradient_finite": bool(torch.isfinite(unguarded).all()),
    }
    return report


def ppo_train(trainer, experiences, entropy_coef, guarded=True):
    """OpenRLHF's ppo_train over the replay buffer, as PolicyModelActor.fit runs it."""
    trainer.args.actor.entropy_coef = entropy_coef
    for experience in experiences:
        trainer.replay_buffer.append(experience)
    before = weights(trainer)
    original = ppo_actor.ActorPPOTrainer.training_step
    step = original if guarded else original.wrapped
    try:
        with mock.patch.object(ppo_actor.ActorPPOTrainer, "training_step", step), cpu_device_lookups():
            status = trainer.ppo_train(KL_COEF)
        error = None
    except Exception as exception:  # reported, so the test can show what the unguarded step does
        status, error = {}, f"{type(exception).__name__}: {exception}"
    finally:
        trainer.replay_buffer.clear()
    after = weights(trainer)
    return {
        "error": error,
        "status_finite": all(v == v for v in status.values() if isinstance(v, float)),
        "policy_loss": status.get("policy_loss"),
        "weights_finite": bool(torch.isfinite(after).all()),
        "weight_change": (after - before).abs().max().item(),
    }


def sequence_log_probs(trainer, experience):
    return sequence_token_log_probs(trainer, experience).sum(dim=-1)


def direction(trainer, experiences):
    """One real optimizer step (ppo_train over the maker's experiences, KL and entropy off)."""
    batch = make_experience_batch([item for e in experiences for item in split_experience_batch(e)])
    advantage = torch.stack([a[m].mean() if m.any() else a.new_zeros(()) for a, m in
                             zip(batch.advantages, batch.action_mask)])  # fmt: skip
    before = sequence_log_probs(trainer, batch)
    use_loss, trainer.args.algo.kl.use_loss = trainer.args.algo.kl.use_loss, False
    trainer.args.actor.entropy_coef = None
    for experience in experiences:
        trainer.replay_buffer.append(experience)
    with cpu_device_lookups():
        trainer.ppo_train(0.0)
    trainer.replay_buffer.clear()
    trainer.args.algo.kl.use_loss = use_loss
    after = sequence_log_probs(trainer, batch)
    return {"advantage": advantage.tolist(), "log_prob_change": (after - before).tolist()}


def shorten_prompts(trainer, experiences, keep=48):
    """Keep the last `keep` prompt tokens of every row, then recompute the old log-probs on what is
    left with the untrained actor (as the maker did on the full rows). ToolRL prompts are thousands
    of byte tokens; with them one ZeRO-3 step of the tiny model takes minutes on a busy 2-core CPU."""
    for experience in experiences:
        prompt_length = experience.total_length - experience.response_length  # action_mask may be zeroed
        cut = max(int(prompt_length.min()) - 1 - keep, 0)
        for name, value in vars(experience).items():
            if torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == len(experience.sequences):
                setattr(experience, name, value[:, cut:].contiguous())
        experience.action_log_probs = sequence_token_log_probs(trainer, experience)


def sequence_token_log_probs(trainer, experience):
    trainer.actor.eval()
    with torch.no_grad():
        return trainer.actor(experience.sequences, experience.action_mask, experience.attention_mask)


def main(model_path, port, *input_paths):
    openrlhf_gd2po.install()  # as the Ray worker hook does in the policy actor's process
    init_cpu_distributed(port)
    for input_path in input_paths:
        print("REPORT", json.dumps(run_probes(model_path, torch.load(input_path, weights_only=False))), flush=True)
    # Left to interpreter exit, gloo's worker threads were once torn down while still joinable.
    torch.distributed.destroy_process_group()


def run_probes(model_path, inputs):
    """A fresh trainer for one input file's args, and the report of its probes."""
    args = inputs["args"]
    trainer = build_trainer(args, model_path)
    report = {"zero_stage": trainer.actor.model.zero_optimization_stage()}
    for experiences in inputs["experiences"].values():
        shorten_prompts(trainer, experiences)
    batches = {mode: make_experience_batch([i for e in exps for i in split_experience_batch(e)])
               for mode, exps in inputs["experiences"].items()}  # fmt: skip
    # Direction first (fresh weights), the unguarded step last (it may leave NaN weights behind).
    if "direction" in inputs["probes"]:
        report["direction"] = direction(trainer, inputs["experiences"]["zero_advantage"])
    if "gradients" in inputs["probes"]:
        report["gradients"] = gradient_probes(trainer, batches, inputs["entropy_coef"])
    if "ppo_train" in inputs["probes"]:
        excluded = inputs["experiences"]["exclude"]
        report["ppo_train"] = ppo_train(trainer, excluded, inputs["entropy_coef"])
        report["ppo_train_unguarded"] = ppo_train(trainer, excluded, inputs["entropy_coef"], guarded=False)
    return report


if __name__ == "__main__":
    main(*sys.argv[1:])
