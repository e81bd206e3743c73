"""`gd2po-cpu-demo`: a small real GD²PO training run on a CPU, in one process, in minutes.

OpenRLHF's Ray trainer needs GPUs (vLLM engines, actors that ask `num_gpus=1`), so on a CPU this
runs the same steps one after another: sample responses (Hugging Face `generate`), score them on
real reward servers over HTTP (`fetch_rewards`, as training does), compute advantages
(`compute_advantages`), and update OpenRLHF's `Actor` with OpenRLHF's `PolicyLoss` under
DeepSpeed ZeRO-3 (CPU accelerator, gloo). One update per batch, so the sampling policy is the
policy being updated (ratio 1, as OpenRLHF with one epoch and one mini-batch); no KL term.

The task: two-digit additions, scored on three dimensions that pull apart: `correctness` and
`format` (a `\\boxed{}` answer) from `reward_servers math`, and `length` (close to
`--target-chars` characters) from `reward_servers length`. Each step prints one row and appends
the same metrics, under the names the trainer logs, to `<out>/metrics.jsonl`.

Sampling runs on a plain copy of the model that gets the updated weights after every step, as
OpenRLHF broadcasts them to its vLLM engines: generating through the ZeRO-3 module itself would
run DeepSpeed's parameter hooks on every decoding step: from the third step on, generation went
from 6-7 s to over a minute a step (measured).
"""

from openrlhf_gd2po.cli.quiet import quiet_dependencies

quiet_dependencies()  # before torch and DeepSpeed are imported: some warn at import

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from openrlhf_gd2po.advantages import ESTIMATORS, compute_advantages  # noqa: E402
from openrlhf_gd2po.cli.analyze import at_least_two, local_reward_server, positive_float, positive_int  # noqa: E402
from openrlhf_gd2po.cli.generation import (  # noqa: E402
    fast_bf16, keep_freed_memory, load_model, sample_rollouts, smollm2_checkpoint,
)
from openrlhf_gd2po.reward_client import fetch_rewards, parse_reward_servers  # noqa: E402
from reward_servers.local import exit_on_sigterm  # noqa: E402

# SmolLM2-135M boxes its answer in about a third of its replies to this wording, so `format` varies.
QUESTION = (
    "What is {a} + {b}? End your reply with the answer in the form \\boxed{{number}}, "
    "for example \\boxed{{12}}."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gd2po-cpu-demo",
        description="A few real GD²PO training steps on CPU: reward servers, advantages, a DeepSpeed ZeRO-3 update.",
    )
    parser.add_argument("--model", default=None,
                        help="local causal LM checkpoint with a chat template (default: SmolLM2-135M-Instruct, "
                             "as gd2po-analyze)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="gd2po_snr", help="default: %(default)s")
    parser.add_argument("--snr-threshold", type=float, default=0.8, help="tau of gd2po_snr (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=4,
                        help="default: %(default)s (keeps the README main job within 10 minutes on 2 cores)")
    parser.add_argument("--prompts-per-step", type=positive_int, default=4, help="default: %(default)s")
    parser.add_argument("--n-samples", type=at_least_two, default=4, help="responses per prompt (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48, help="default: %(default)s")
    parser.add_argument("--target-chars", type=positive_int, default=40,
                        help="response length the length reward prefers (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=1e-5, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--reward-servers", default=None,
                        help="reward dimensions as training's --reward.servers (servers, replicas, .py reward files; "
                             "default: start the math and length servers described above)")
    parser.add_argument("--out", default="gd2po_cpu_demo", help="folder for metrics.jsonl (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.snr_threshold <= 1.0:
        parser.error(f"--snr-threshold must be in [0, 1], got {args.snr_threshold}")
    if args.model is not None and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: not a directory (a local checkpoint is needed; no model hub)")
    try:
        given_dimensions = parse_reward_servers(args.reward_servers) if args.reward_servers else None
    except ValueError as error:
        parser.error(str(error))

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    keep_freed_memory()
    exit_on_sigterm()
    torch.manual_seed(args.seed)
    model_path = Path(args.model) if args.model else smollm2_checkpoint()
    sampler, tokenizer = load_model(model_path)
    engine = zero3_actor(model_path, args.lr)
    questions = random.Random(args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    metrics_file.write_text("")
    with contextlib.ExitStack() as stack:
        dimensions = given_dimensions or (
            stack.enter_context(local_reward_server(["math"]))
            + stack.enter_context(local_reward_server(["length", "--target-length", str(args.target_chars)]))
        )
        names = [d.name for d in dimensions]
        print(f"gd2po-cpu-demo: {args.estimator} on {model_path.name}, {args.prompts_per_step} prompts x "
              f"{args.n_samples} samples a step, rewards {', '.join(names)}, "
              f"DeepSpeed ZeRO-{engine.zero_optimization_stage()} in {training_dtype(engine)}")
        print(f"{'step':>4} " + " ".join(f"{name:>11}" for name in names)
              + f" {'conflict':>8} {'keep':>6} {'|ΣA| kept':>9} {'gdpo |ΣA|':>9} {'grad norm':>9} {'resp len':>8}"
              f" {'seconds':>7}")
        for step in range(1, args.steps + 1):
            metrics = train_step(engine, sampler, tokenizer, dimensions, questions, args)
            with metrics_file.open("a") as file:
                file.write(json.dumps({"step": step, **metrics}) + "\n")
            print(f"{step:>4} " + " ".join(f"{metrics[f'reward/{name}']:>11.3f}" for name in names)
                  + f" {metrics['gd2po/conflict_ratio']:>8.3f} {metrics['gd2po/keep_ratio']:>6.3f}"
                  f" {metrics['gd2po/mean_abs_summed_advantage']:>9.3f}"
                  f" {metrics['gdpo/mean_abs_summed_advantage']:>9.3f}"
                  f" {metrics['grad_norm']:>9.3f} {metrics['response_length']:>8.1f} {metrics['seconds']:>7.1f}")
    # Left to interpreter exit, gloo's worker threads can be torn down while still joinable, which
    # aborts the process ("terminate called without an active exception"; seen once in CI's tests).
    torch.distributed.destroy_process_group()
    print(f"\nwrote {metrics_file}")


def zero3_actor(model_path: Path, lr: float):
    """OpenRLHF's Actor in a DeepSpeed ZeRO-3 engine on the CPU accelerator (one gloo process)."""
    import deepspeed

    try:
        from openrlhf.models import Actor
    except ModuleNotFoundError as error:  # OpenRLHF imports flash_attn at module level; no CPU build exists
        raise SystemExit(
            f"gd2po-cpu-demo: error: cannot import OpenRLHF's models ({error}). On a CPU machine, put the "
            "import-only stand-ins on the path: PYTHONPATH=tests/cpu_stand_ins (see tests/cpu_stand_ins/README.md)"
        ) from None

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    # DeepSpeed compiles its shared-memory collectives (a C++ op) on the first CPU init: 52 s on a fresh
    # machine (measured). One process never uses them, and DeepSpeed has no switch for it, so mark the
    # op unusable here; DeepSpeed then uses plain gloo, as it does on platforms without the op.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,  # unused: we call backward and step ourselves
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        # torch's AdamW: DeepSpeed's fused CPU Adam would first compile a C++ op for a minute.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "gradient_clipping": 1.0,
        # bf16 only where the CPU multiplies it natively (one bf16 update took over 8 minutes elsewhere).
        # With bf16 off, ZeRO-3's parameter init makes every weight fp32 though the Actor loads bf16.
        "bf16": {"enabled": fast_bf16()},
    }
    # OpenRLHF's Actor prints "[MoE] experts_implementation (resolved): eager" for every model; the
    # demo's terminal shows only its own table, so that one print is dropped (errors go to stderr).
    with contextlib.redirect_stdout(io.StringIO()):
        actor = Actor(str(model_path), attn_implementation="eager", param_dtype="bf16", ds_config=ds_config)
    engine, *_ = deepspeed.initialize(model=actor, config=ds_config, model_parameters=actor.parameters())
    return engine


def training_dtype(engine) -> str:
    """The dtype of the weights ZeRO-3 trains: each rank's partition of every parameter."""
    return str(next(engine.module.parameters()).ds_tensor.dtype).removeprefix("torch.")


def train_step(engine, sampler, tokenizer, dimensions, questions, args) -> dict:
    """Sample, score, compute advantages, one ZeRO-3 update, weights to the sampler; the step's metrics."""
    import deepspeed
    from openrlhf.models import PolicyLoss

    started = time.perf_counter()
    pairs = [(questions.randint(10, 99), questions.randint(10, 99)) for _ in range(args.prompts_per_step)]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": QUESTION.format(a=a, b=b)}], tokenize=False,
                                      add_generation_prompt=True)
        for a, b in pairs
    ]
    labels = [str(a + b) for a, b in pairs]
    # No progress bar: the step's table row is the progress.
    rollouts = sample_rollouts(sampler, tokenizer, prompts, args.n_samples, args.max_new_tokens, 1.0,
                               show_progress=False)
    generated = time.perf_counter()
    rewards = fetch_rewards(
        dimensions, [r["query"] for r in rollouts], [prompts[r["prompt_index"]] for r in rollouts],
        [labels[r["prompt_index"]] for r in rollouts],
    ).rewards
    scored = time.perf_counter()
    group_ids = torch.tensor([r["prompt_index"] for r in rollouts])
    lengths = torch.tensor([r["response_length"] for r in rollouts])
    result = compute_advantages(rewards, group_ids, args.estimator, response_lengths=lengths,
                                snr_threshold=args.snr_threshold)
    # GDPO on the same rollouts keeps every one: the paper's claim is that masking keeps |Σ_k A_k| larger.
    gdpo = compute_advantages(rewards, group_ids, "gdpo", response_lengths=lengths)
    sequences, attention_mask, action_mask = policy_batch(rollouts, tokenizer.pad_token_id)
    log_probs = engine(sequences, action_mask, attention_mask)
    advantages = result.advantages[:, None] * action_mask  # one scalar per rollout on each response token
    loss = PolicyLoss()(log_probs, log_probs.detach(), advantages, action_mask=action_mask)[0]
    engine.backward(loss)
    engine.step()
    for name, param in engine.module.model.named_parameters():  # one at a time, as OpenRLHF's vLLM sync
        with deepspeed.zero.GatheredParameters([param]):
            sampler.get_parameter(name).data.copy_(param.data)

    names = [d.name for d in dimensions]
    return {
        **{f"reward/{name}": rewards[:, k].mean().item() for k, name in enumerate(names)},
        "reward": rewards.sum(dim=1).mean().item(),
        **{f"gd2po/{key}": value for key, value in result.metrics.items() if not key.startswith("reward_dim")},
        "gdpo/mean_abs_summed_advantage": gdpo.metrics["mean_abs_summed_advantage"],
        # With one update per batch the ratio is 1 and the loss is -mean(advantage), about 0 after
        # whitening; the gradient norm (before clipping) shows how much the step moved.
        "policy_loss": loss.item(),
        "grad_norm": float(engine.get_global_grad_norm()),
        "response_length": lengths.double().mean().item(),
        "timing/generate": generated - started,
        "timing/reward": scored - generated,
        "timing/update": time.perf_counter() - scored,  # advantages, forward, backward, step, weight sync
        "seconds": time.perf_counter() - started,
    }


def policy_batch(rollouts, pad_id):
    """OpenRLHF's layout: left-padded prompt, then the response, right-padded; `action_mask` marks
    the response tokens, aligned with the last columns of the Actor's log-probs."""
    prompt_width = max(len(r["prompt_ids"]) for r in rollouts)
    response_width = max(len(r["response_ids"]) for r in rollouts)
    sequences = torch.full((len(rollouts), prompt_width + response_width), pad_id)
    attention_mask = torch.zeros_like(sequences)
    action_mask = torch.zeros(len(rollouts), response_width, dtype=torch.bool)
    for row, rollout in enumerate(rollouts):
        prompt, response = rollout["prompt_ids"], rollout["response_ids"]
        start, end = prompt_width - len(prompt), prompt_width + len(response)
        sequences[row, start:end] = torch.tensor(prompt + response)
        attention_mask[row, start:end] = 1
        action_mask[row, : len(response)] = True
    return sequences, attention_mask, action_mask


if __name__ == "__main__":
    main()
