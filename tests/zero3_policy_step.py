"""One DeepSpeed ZeRO-3 optimizer step of OpenRLHF's Actor + PolicyLoss on CPU, with GD²PO advantages.

Run as a script by tests/test_openrlhf_integration.py, in its own process because it initialises
torch.distributed (gloo, world size 1). Prints one JSON line with what the test asserts:
masked rollouts contribute exactly zero gradient, kept rollouts do not, and the step moves weights.
"""

import json
import sys

import deepspeed
import torch
from cpu_deepspeed import init_cpu_distributed
from deepspeed.utils import safe_get_full_grad

from openrlhf.models import Actor, PolicyLoss
from openrlhf_gd2po.advantages import compute_advantages

ZERO_STAGE = 3


def main(model_path, port):
    init_cpu_distributed(port)
    torch.manual_seed(0)
    ds_config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": ZERO_STAGE},
        # torch's AdamW: DeepSpeed's fused CPU Adam would first compile a C++ op for a minute.
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "bf16": {"enabled": True},
    }
    actor = Actor(model_path, attn_implementation="sdpa", param_dtype="bf16", ds_config=ds_config)
    engine, *_ = deepspeed.initialize(model=actor, config=ds_config, model_parameters=actor.parameters())

    # Two queries x 4 rollouts; rollouts 1, 2 (query 0) and 5 (query 1) have mixed-sign dimensions.
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0],
                            [1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    result = compute_advantages(rewards, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), "gd2po_hard")
    masked = ~result.keep_mask
    sequences = torch.randint(0, 250, (8, 16))
    action_mask = torch.zeros(8, 15, dtype=torch.bool)
    action_mask[:, 8:] = True
    advantages = result.advantages[:, None] * action_mask

    def policy_loss(sequences):
        log_probs = engine(sequences, action_mask, torch.ones_like(sequences))
        return PolicyLoss()(log_probs, log_probs.detach(), advantages, action_mask=action_mask)[0]

    def full_gradient(sequences):
        engine.backward(policy_loss(sequences))
        gradient = torch.cat([safe_get_full_grad(p).float().flatten() for p in engine.module.parameters()])
        engine.optimizer.zero_grad()
        return gradient

    reference = full_gradient(sequences)
    repeat = full_gradient(sequences)
    masked_changed, kept_changed = sequences.clone(), sequences.clone()
    masked_changed[masked] = torch.randint(0, 250, (int(masked.sum()), 16))
    kept_changed[result.keep_mask.nonzero()[0]] = torch.randint(0, 250, (16,))
    masked_changed_diff = (full_gradient(masked_changed) - reference).abs().max().item()
    kept_changed_diff = (full_gradient(kept_changed) - reference).abs().max().item()

    weights_before = torch.cat([deepspeed.utils.safe_get_full_fp32_param(p).flatten() for p in engine.module.parameters()])
    engine.backward(policy_loss(sequences))
    engine.step()
    weights_after = torch.cat([deepspeed.utils.safe_get_full_fp32_param(p).flatten() for p in engine.module.parameters()])
    print(json.dumps({
        "zero_stage": engine.zero_optimization_stage(),
        "masked_rollouts": masked.nonzero().flatten().tolist(),
        "gradient_norm": reference.norm().item(),
        "repeat_max_diff": (repeat - reference).abs().max().item(),
        "masked_changed_max_diff": masked_changed_diff,
        "kept_changed_max_diff": kept_changed_diff,
        "weight_change": (weights_after - weights_before).abs().max().item(),
    }))
    # Left to interpreter exit, gloo's worker threads were once torn down while still joinable,
    # which aborts the process ("terminate called without an active exception").
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
