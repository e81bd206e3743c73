"""OpenRLHF's PolicyModelActor (DeepSpeed ZeRO-3, bf16) on 2 gloo ranks on CPU, fed the recorded step-1
experiences of the DP=2 NaN case (tests/data/dp2_nan_case, README there).

Run by tests/test_training_step.py as two processes: `dp2_actor_training_step.py RANK PORT INPUT.pt OUT.json`.
INPUT.pt holds the trainer args (our real CLI). Each rank writes OUT.json.RANK with what the test asserts:

- `late_all_gathers_load`: the model loaded under ZeRO-3 holds the checkpoint's weights even when
  each async all-gather lands as late as gloo allows (LateAllGathers). DeepSpeed 0.19.6 waited only
  for the last all-gather of a module's parameters, so the first one (the weight of Qwen2's q/k/v
  projections, which have a bias) could land after rank 0 had copied the checkpoint in, and the
  buffer's old bytes were broadcast and kept: the DP=2 NaN. `load`: the same, as it happened here.
- `guard`: ppo_train with one non-finite advantage or log-prob on one rank skips the update on both
  ranks; then clean data trains. Without the guard, the NaN log-prob (at a prompt position: a NaN
  loss, a finite gradient) updates the weights in silence.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # eager, as in zero3_actor_training_step.py

import torch

CASE = Path(__file__).resolve().parent / "data" / "dp2_nan_case"


class LateAllGathers:
    """DeepSpeed's async all-gathers (deepspeed.comm) landing as late as gloo allows: at the handle's
    wait(), or, never waited, when the next broadcast starts (gloo runs each on a worker thread, in
    no order). Their output holds whatever the buffer held until then."""

    def __init__(self, comm):
        self.comm, self.pending = comm, []
        self.all_gather_into_tensor, self.broadcast = comm.all_gather_into_tensor, comm.broadcast

    def __enter__(self):
        self.comm.all_gather_into_tensor, self.comm.broadcast = self.late_all_gather, self.landing_broadcast

    def __exit__(self, *exc):
        self.comm.all_gather_into_tensor, self.comm.broadcast = self.all_gather_into_tensor, self.broadcast

    def late_all_gather(self, output, *args, async_op=False, **kwargs):
        if not async_op:
            return self.all_gather_into_tensor(output, *args, **kwargs)
        gathered = torch.empty_like(output)
        self.all_gather_into_tensor(gathered, *args, **kwargs)
        handle = LateHandle(output, gathered, self.pending)
        self.pending.append(handle)
        return handle

    def landing_broadcast(self, *args, **kwargs):
        for handle in list(self.pending):
            handle.wait()
        return self.broadcast(*args, **kwargs)


class LateHandle:
    def __init__(self, output, gathered, pending):
        self.output, self.gathered, self.pending = output, gathered, pending

    def wait(self, *args, **kwargs):
        if self in self.pending:
            self.output.copy_(self.gathered)
            self.pending.remove(self)
        return True

    def is_completed(self):
        return self not in self.pending


def build_actor(rank, port, args):
    from openrlhf_gd2po import cpu

    os.environ[cpu.ENV] = "1"  # the opt-in: without it OpenRLHF's DeepSpeed setup stops on a CPU machine
    cpu.install()  # CPU mode: the CPU meaning of OpenRLHF's torch.cuda calls, as in the tiny runs
    import openrlhf_gd2po

    openrlhf_gd2po.install()
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    from openrlhf.utils import get_strategy

    actor = PolicyModelActor.__ray_metadata__.modified_class(2, rank, "127.0.0.1", port)  # the Ray actor's class
    actor.init_model_from_pretrained(get_strategy(args), str(CASE / "model"), max_steps=3)
    return actor


def load_with_late_all_gathers(strategy):
    """OpenRLHF's Actor loaded under ZeRO-3 (transformers' zero3 loader: DeepSpeed's GatheredParameters
    gathers a module's parameters, rank 0 copies the checkpoint in, a broadcast and a partition follow)."""
    from deepspeed import comm
    from openrlhf.models import Actor

    with LateAllGathers(comm):
        return Actor(str(CASE / "model"), attn_implementation=strategy.args.ds.attn_implementation,
                     param_dtype="bf16", ds_config=strategy.get_ds_train_config())  # fmt: skip


def wrong_partitions(model, rank):
    """Parameters whose ZeRO-3 partition on this rank differs from the checkpoint (in bf16)."""
    from safetensors.torch import load_file

    checkpoint = load_file(CASE / "model" / "model.safetensors")
    wrong = []
    for name, param in model.named_parameters():
        part = param.ds_tensor.float()
        full = checkpoint[name].flatten().to(torch.bfloat16).float()
        expected = torch.zeros_like(part)
        mine = full[rank * part.numel() : (rank + 1) * part.numel()]
        expected[: mine.numel()] = mine
        if not torch.equal(part, expected):
            wrong.append(name)
    return wrong


def experiences(actor, rank, poison=None):
    """This rank's recorded step-1 Experience, its log-probs from the actor as the experience maker
    computes them; `poison` ("advantages" or "action_log_probs") makes one of its values NaN."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    record = torch.load(CASE / f"rank{rank}_step1.pt", weights_only=False)
    log_probs = actor.forward(record["sequences"], record["action_mask"], record["attention_mask"])
    experience = Experience(
        sequences=record["sequences"], attention_mask=record["attention_mask"],
        action_mask=record["action_mask"].bool(), action_log_probs=log_probs,
        advantages=record["advantages"].clone(), returns=record["advantages"].clone(),
        index=record["index"].tolist(), info=dict(record["info"]),
    )  # fmt: skip
    if poison:
        getattr(experience, poison)[0, 0] = float("nan")
    return experience


def partitions(actor):
    return torch.cat([p.ds_tensor.float().flatten() for p in actor.actor.model.module.parameters()])


def train(actor, rank, poison_rank=None, poison=None, guarded=True):
    from openrlhf.trainer.ray import ppo_actor

    trainer_class = ppo_actor.ActorPPOTrainer
    steps = trainer_class.training_step, trainer_class.ppo_train
    if not guarded:  # OpenRLHF's own (getattr: this script also runs against code without the guard)
        trainer_class.training_step, trainer_class.ppo_train = (getattr(step, "wrapped", step) for step in steps)
    try:
        actor.append(experiences(actor, rank, poison if rank == poison_rank else None))
        before = partitions(actor)
        status = actor.fit()
    finally:
        trainer_class.training_step, trainer_class.ppo_train = steps
    after = partitions(actor)
    return {
        "skipped_updates": status.get("gd2po/skipped_updates"),
        "unchanged": bool(torch.equal(before, after)),
        "weights_finite": bool(torch.isfinite(after).all()),
    }


def main():
    rank, port, inputs, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    args = torch.load(inputs, weights_only=False)["args"]
    actor = build_actor(rank, port, args)
    report = {
        "load": {"wrong_partitions": wrong_partitions(actor.actor.model.module, rank)},
        "late_all_gathers_load": {
            "wrong_partitions": wrong_partitions(load_with_late_all_gathers(actor.strategy).model, rank),
        },
        "guard": {
            "nan_advantage_on_rank1": train(actor, rank, poison_rank=1, poison="advantages"),
            "nan_log_prob_on_rank0": train(actor, rank, poison_rank=0, poison="action_log_probs"),
            "clean": train(actor, rank),
            "nan_log_prob_unguarded": train(actor, rank, poison_rank=0, poison="action_log_probs", guarded=False),
        },
    }
    Path(f"{out}.{rank}").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
