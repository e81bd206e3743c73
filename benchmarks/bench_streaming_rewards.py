"""Rewards fetched after all of generation vs per finished group, through OpenRLHF's real SamplesGenerator.

    python benchmarks/bench_streaming_rewards.py          # 128 prompts x 8 samples, 3 repeats
    python benchmarks/bench_streaming_rewards.py --quick  # 8 prompts x 8, 1 s, 1 repeat: smoke test

Generation: a stand-in vLLM engine (benchmarks/scheduled_engine.py) behind Ray, whose groups finish
on a long-tailed schedule: group i takes `gen_seconds * x_i / max(x)` with x lognormal (sigma 0.6),
so most groups are done well before the last, as RL generation lengths are. Rewards: the three
sleepy servers of bench_reward_stage.py (one request at a time each; the reward model costs
50 ms + 2 ms per sample). Modes, alternating in one run against the same servers and schedule:

  after     OpenRLHF's own SamplesGenerator, then one fetch_rewards over the batch: the path when
            rewards are scored in the experience maker (GD2POExperienceMaker.fetch_multi_rewards).
  stream    GD2POSamplesGenerator: each finished group goes to a RewardStream (batches of up to 256
            samples, --reward.flush_wait 0.5 s), so rewards are fetched while later groups generate.
  openrlhf  OpenRLHF's own scoring while generating (--reward.remote_url): each sample, once generated,
            POSTs its one query to every server in a new session (the engine stand-in does this as
            OpenRLHF's executor does). Timed once: it is the slow one.

"added" is a mode's wall time minus generation alone (the after mode's generation part), as a share
of generation. Target: stream adds <= 10% when rewards are cheaper than generation. Every reward is
checked against the servers' formula before anything is printed.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import ray
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]
import conftest  # noqa: E402,F401  (on CPU: the flash_attn stand-in, which OpenRLHF imports, when it is missing)
from bench_reward_stage import SERVERS, check_rewards, sleepy_servers  # noqa: E402
from openrlhf_gd2po.reward_client import fetch_rewards  # noqa: E402
from scheduled_engine import ScheduledEngine  # noqa: E402
from tiny_models import build_tiny_tokenizer  # noqa: E402

SAMPLES_PER_PROMPT = 8
TARGET_ADDED = 0.10


def trainer_args(servers: str, num_prompts: int):
    """The arguments the generators read, as OpenRLHF's CLI nests them (train_gd2po_ray's defaults)."""
    return SimpleNamespace(
        rollout=SimpleNamespace(batch_size=num_prompts, n_samples_per_prompt=SAMPLES_PER_PROMPT,
                                vllm_generate_batch_size=num_prompts),
        vllm=SimpleNamespace(enable_sleep=False),
        train=SimpleNamespace(seed=42, agent_func_path=None),
        algo=SimpleNamespace(dynamic_filtering_enable=False,
                             advantage=SimpleNamespace(is_correction_level="off", estimator="gd2po_snr")),
        reward=SimpleNamespace(servers=servers, weights=None, batch_size=256, timeout=300.0, retries=3,
                               max_in_flight=8, on_failure="raise", deadline=600.0, flush_wait=0.5),
        gd2po=SimpleNamespace(dynamic_sampling="off", dynamic_sampling_max_extra_prompts=None, snr_threshold=0.8,
                              group_std_floor=0.0),
    )  # fmt: skip


def schedule(num_prompts: int, gen_seconds: float):
    """Prompts, their generation seconds (long-tailed, the slowest exactly gen_seconds) and responses."""
    x = torch.exp(0.6 * torch.randn(num_prompts, generator=torch.Generator().manual_seed(0)))
    prompts = [f"<|im_start|>user\nProblem {i}: add the terms one by one.<|im_end|>\n<|im_start|>assistant\n"
               for i in range(num_prompts)]
    seconds = {p: float(s) for p, s in zip(prompts, gen_seconds * x / x.max())}
    responses = {p: ["Step: add the next term. " * (20 + (i + j) % 13) + f"\\boxed{{{j}}}<|im_end|>"
                     for j in range(SAMPLES_PER_PROMPT)] for i, p in enumerate(prompts)}
    return prompts, seconds, responses


def run(generator_class, args, engine, tokenizer, prompts, seconds, responses, dimensions, per_sample=False):
    """One step's generation and rewards; returns (generation s, total s, requests)."""
    reward_urls = {d.name: d.url for d in dimensions} if per_sample else None
    ray.get(engine.reset.remote(seconds, responses, reward_urls))
    dataloader = [(None, [p], ["0"], [None]) for p in prompts]
    generator = generator_class(strategy=SimpleNamespace(args=args), prompts_dataloader=dataloader,
                                eval_dataloader=None, tokenizer=tokenizer, vllm_engines=[engine])  # fmt: skip
    started = time.perf_counter()
    samples, *_ = generator.generate_samples(max_new_tokens=1024)
    generated = time.perf_counter() - started
    queries = [tokenizer.decode(s.sequences[0], skip_special_tokens=False) for s in samples]
    if "reward/format" in samples[0].info:  # scored while generating
        rewards = torch.stack([torch.cat([s.info[f"reward/{d.name}"] for s in samples]) for d in dimensions], dim=1)
        requests = len(samples) * len(dimensions) if per_sample else (
            int(samples[0].info["gd2po/reward_requests"].item()) * len(dimensions))
    else:
        batch = fetch_rewards(dimensions, queries, [s.prompts[0] for s in samples], ["0"] * len(samples))
        rewards, requests = batch.rewards, -(-len(samples) // 256) * len(dimensions)
    total = time.perf_counter() - started
    check_rewards(rewards, queries, generator_class.__name__)
    return generated, total, requests


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 prompts, 1 s, 1 repeat")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default 128, quick 8)")
    parser.add_argument("--gen-seconds", type=float, default=None, help="the slowest group's seconds (default 20, quick 1)")
    args = parser.parse_args()
    num_prompts = args.prompts or (8 if args.quick else 128)
    gen_seconds = args.gen_seconds or (1.0 if args.quick else 20.0)
    repeats = 1 if args.quick else 3

    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    from openrlhf_gd2po.samples_generator import GD2POSamplesGenerator

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tokenizer = build_tiny_tokenizer()
    prompts, seconds, responses = schedule(num_prompts, gen_seconds)
    engine = ScheduledEngine.remote()
    ray.get(engine.reset.remote())
    started = time.perf_counter()
    with sleepy_servers() as dimensions:
        servers = ",".join(f"{d.name}={d.url}" for d in dimensions)
        trainer = trainer_args(servers, num_prompts)
        fetch_rewards(dimensions, ["warm-up"], ["warm-up"], ["0"])
        after, stream = [], []
        for _ in range(repeats):  # alternating, so a load spike on the shared machine hits both
            after.append(run(SamplesGenerator, trainer, engine, tokenizer, prompts, seconds, responses, dimensions))
            stream.append(run(GD2POSamplesGenerator, trainer, engine, tokenizer, prompts, seconds, responses,
                              dimensions))
        openrlhf = [run(SamplesGenerator, trainer, engine, tokenizer, prompts, seconds, responses, dimensions,
                        per_sample=True)]
    ray.shutdown()

    generation = statistics.median(r[0] for r in after)
    print(f"{num_prompts} prompts x {SAMPLES_PER_PROMPT} samples; groups finish on a lognormal schedule "
          f"(sigma 0.6), the last after {gen_seconds:g} s; median of {repeats} run(s).")
    print("reward servers (one request at a time each): "
          + ", ".join(f"{name} {fixed} ms + {per} ms/sample" for name, fixed, per in SERVERS))
    print(f"generation alone (OpenRLHF's SamplesGenerator): {generation:.2f} s\n")
    print(f"{'mode':48s} {'requests':>8s} {'wall s':>7s} {'added s':>8s} {'added %':>8s}")
    print("-" * 83)
    rows = {"after: generate all, then fetch_rewards": after, "stream: score each group as it finishes": stream,
            "openrlhf: each sample posts as it finishes (x1)": openrlhf}
    added = {}
    for label, runs in rows.items():
        total = statistics.median(r[1] for r in runs)
        added[label] = (total - generation) / generation
        print(f"{label:48s} {runs[0][2]:8d} {total:7.2f} {total - generation:8.2f} {100 * added[label]:7.1f}%")
    streamed = added["stream: score each group as it finishes"]
    print(f"\ntarget stream adds <= {100 * TARGET_ADDED:g}% to generation: {100 * streamed:.1f}% "
          f"{'PASS' if streamed <= TARGET_ADDED else 'FAIL'}")
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
