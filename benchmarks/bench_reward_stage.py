"""Reward stage: fetch_rewards against 3 reward servers vs the slowest server alone and vs OpenRLHF's pattern.

    python benchmarks/bench_reward_stage.py          # 4,096 samples; (b) timed on 1,024 and extrapolated
    python benchmarks/bench_reward_stage.py --quick  # 256 samples; (b) timed on 64, smoke test (~15 s)

Three real HTTP servers run on 127.0.0.1 (benchmarks/sleepy_reward_server.py: the real reward_servers
app around a sleep). Each serves one request at a time and a request of n samples costs
`fixed_ms + n * per_sample_ms` (see SERVERS). Modes, all in the same run against the same servers:

  (a)    fetch_rewards with the slowest server only: the floor for scoring all dimensions at once.
  client fetch_rewards with all 3 servers (defaults: batches of 256, 8 in flight per server).
  (b)    OpenRLHF's pattern (SingleTurnAgentExecutor._fetch_rewards_via_http): each generated sample,
         once its generation ends, POSTs its one query to a server through a new aiohttp.ClientSession.
         Scoring 3 dimensions this way is one such POST per server, the three sent together.
         Concurrency: one sample per in-flight generation. OpenRLHF builds its vLLM engines with
         AsyncLLMEngine.from_engine_args and does not set max_num_seqs, so an engine runs vLLM's
         default of 128 sequences; we allow 128 samples (384 requests) in flight, one engine's worth.
         As every server serves one request at a time, any concurrency of a few or more gives the
         same wall time: the servers' queues, not the client, set it.

Targets: client within 1.2x of (a), and (b) at least 10x slower than the client. When (b) would take
over ~2 minutes it is timed on a subset and scaled linearly to all samples (said so in the table):
its time is the sum of per-request costs on a one-at-a-time server, so it grows linearly in samples.
(a) and the client are timed `repeats` times, alternating, and the median is reported. The rewards
every mode returns are checked against the servers' formula before anything is reported.
The exit status is 0 unless something breaks; a missed target is printed as FAIL, not raised.
"""

import argparse
import asyncio
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from openrlhf_gd2po.reward_client import fetch_rewards
from openrlhf_gd2po.reward_spec import RewardDimension
from reward_servers.local import running_process

HERE = Path(__file__).resolve().parent
SERVERS = [  # dimension, fixed ms per request, ms per sample
    ("format", 20, 0.5),  # rule-based: a few regexes over the response
    ("correctness", 20, 1.0),  # rule-based: parse and verify the final answer
    ("reward_model", 50, 2.0),  # a reward model's forward pass: the slowest server
]
BATCH_SIZE = 256  # fetch_rewards' defaults
MAX_IN_FLIGHT = 8
OPENRLHF_CONCURRENCY = 128  # vLLM's default max_num_seqs for one AsyncLLMEngine
TARGET_VS_SLOWEST = 1.2
TARGET_VS_OPENRLHF = 10.0

from scheduled_engine import post_one_sample  # noqa: E402  (benchmarks/ is on the path when run as a script)
from sleepy_reward_server import reward_for  # noqa: E402


def make_samples(n: int) -> tuple[list[str], list[str], list[str]]:
    """Chat-formatted queries of about 1.5 KB (a prompt and a reasoned answer), of varying length."""
    prompts, queries, labels = [], [], []
    for i in range(n):
        prompt = f"<|im_start|>user\nProblem {i}: " + "compute the sum of the series term by term. " * 6
        prompt += "<|im_end|>\n<|im_start|>assistant\n"
        response = "Step: add the next term and simplify. " * (25 + i % 13) + f"\\boxed{{{i % 50}}}<|im_end|>"
        prompts.append(prompt)
        queries.append(prompt + response)
        labels.append(str(i % 50))
    return queries, prompts, labels


@contextlib.contextmanager
def sleepy_servers():
    """Start one sleepy server per entry of SERVERS; yield their RewardDimensions in that order."""
    with contextlib.ExitStack() as stack:
        dimensions = []
        for name, fixed_ms, per_sample_ms in SERVERS:
            command = [sys.executable, str(HERE / "sleepy_reward_server.py"), "--dimension", name,
                       "--fixed-ms", str(fixed_ms), "--per-sample-ms", str(per_sample_ms)]
            url, _ = stack.enter_context(running_process(command))
            dimensions.append(RewardDimension(name, f"{url}/get_reward", None))
        yield dimensions


def check_rewards(rewards: torch.Tensor, queries: list[str], mode: str) -> None:
    """Every column must hold reward_for(query): a fast run that scored nothing proves nothing."""
    expected = torch.tensor([reward_for(query) for query in queries]).unsqueeze(1).expand_as(rewards)
    if not torch.allclose(rewards, expected):
        raise AssertionError(f"{mode}: rewards differ from what the servers compute")


def time_fetch_rewards(dimensions, samples, batch_size: int = BATCH_SIZE) -> float:
    """Wall seconds of one fetch_rewards call; its rewards are then checked."""
    queries, prompts, labels = samples
    started = time.perf_counter()
    batch = fetch_rewards(dimensions, queries, prompts, labels, batch_size=batch_size, max_in_flight=MAX_IN_FLIGHT)
    seconds = time.perf_counter() - started
    check_rewards(batch.rewards, queries, f"fetch_rewards on {[d.name for d in dimensions]}")
    return seconds


async def openrlhf_pattern(urls: list[str], samples, concurrency: int) -> torch.Tensor:
    """Each sample POSTs its one query to every server, each POST in a new session (as OpenRLHF's
    _post_request does; its retries are left out, nothing fails here). `concurrency` samples at a time."""
    queries, prompts, labels = samples
    generations_in_flight = asyncio.Semaphore(concurrency)

    async def score_sample(i):
        async with generations_in_flight:
            return await asyncio.gather(*(post_one_sample(url, queries[i], prompts[i], labels[i]) for url in urls))

    return torch.tensor(await asyncio.gather(*(score_sample(i) for i in range(len(queries)))))


def time_openrlhf_pattern(dimensions, samples) -> float:
    started = time.perf_counter()
    rewards = asyncio.run(openrlhf_pattern([d.url for d in dimensions], samples, OPENRLHF_CONCURRENCY))
    seconds = time.perf_counter() - started
    check_rewards(rewards, samples[0], "OpenRLHF pattern")
    return seconds


def slowest_server_floor(n: int) -> float:
    """Cost-model seconds for the slowest server to score n samples in batches: no mode can beat it."""
    _, fixed_ms, per_sample_ms = SERVERS[-1]
    batches = [min(BATCH_SIZE, n - start) for start in range(0, n, BATCH_SIZE)]
    return sum(fixed_ms + size * per_sample_ms for size in batches) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 samples, (b) on 64, one repeat")
    parser.add_argument("--samples", type=int, help="samples per mode (default 4096, quick 256)")
    parser.add_argument("--openrlhf-samples", type=int, help="samples (b) is timed on (default 1024, quick 64)")
    args = parser.parse_args()
    n = args.samples or (256 if args.quick else 4096)
    n_openrlhf = min(n, args.openrlhf_samples or (64 if args.quick else 1024))
    repeats = 1 if args.quick else 3

    samples = make_samples(n)
    run_started = time.perf_counter()
    with sleepy_servers() as dimensions:
        slowest = dimensions[-1:]
        fetch_rewards(dimensions, *make_samples(1))  # warm-up: first connection, lazy imports
        slowest_times, client_times = [], []
        for _ in range(repeats):  # alternating, so a load spike on the shared machine hits both
            slowest_times.append(time_fetch_rewards(slowest, samples))
            client_times.append(time_fetch_rewards(dimensions, samples))
        openrlhf_seconds = time_openrlhf_pattern(dimensions, tuple(part[:n_openrlhf] for part in samples))
    slowest_seconds = statistics.median(slowest_times)
    client_seconds = statistics.median(client_times)
    openrlhf_all = openrlhf_seconds * n / n_openrlhf

    batches = math.ceil(n / BATCH_SIZE)
    print(f"{n} samples, {len(SERVERS)} servers (one request at a time each; cost per request):")
    for name, fixed_ms, per_sample_ms in SERVERS:
        print(f"  {name:13s} {fixed_ms} ms + {per_sample_ms} ms/sample")
    print(f"fetch_rewards: batch_size {BATCH_SIZE}, max_in_flight {MAX_IN_FLIGHT}; median of {repeats} run(s).")
    print(f"OpenRLHF pattern: one POST per sample per server, new session each, "
          f"{OPENRLHF_CONCURRENCY} samples in flight.")
    print(f"Cost-model floor for the slowest server: {slowest_server_floor(n):.2f} s\n")
    print(f"{'mode':44s} {'requests':>9s} {'wall s':>8s} {'vs (a)':>7s} {'(b)/client':>10s}")
    print("-" * 82)
    print(f"{'(a) slowest server alone (fetch_rewards)':44s} {batches:9d} {slowest_seconds:8.2f} {1:7.2f}")
    print(f"{'client: fetch_rewards, 3 servers':44s} {batches * len(SERVERS):9d} {client_seconds:8.2f} "
          f"{client_seconds / slowest_seconds:7.2f}")
    label = "(b) OpenRLHF pattern, 3 servers"
    if n_openrlhf < n:
        label += f" [x{n / n_openrlhf:g} of {n_openrlhf}]"
    print(f"{label:44s} {n * len(SERVERS):9d} {openrlhf_all:8.2f} {openrlhf_all / slowest_seconds:7.2f} "
          f"{openrlhf_all / client_seconds:10.1f}")
    if n_openrlhf < n:
        print(f"(b) timed on {n_openrlhf} samples ({openrlhf_seconds:.2f} s) and scaled linearly to {n}.")

    vs_slowest, vs_openrlhf = client_seconds / slowest_seconds, openrlhf_all / client_seconds
    print(f"\ntarget client <= {TARGET_VS_SLOWEST}x (a): {vs_slowest:.2f}x "
          f"{'PASS' if vs_slowest <= TARGET_VS_SLOWEST else 'FAIL'}")
    print(f"target (b) >= {TARGET_VS_OPENRLHF:g}x client: {vs_openrlhf:.1f}x "
          f"{'PASS' if vs_openrlhf >= TARGET_VS_OPENRLHF else 'FAIL'}")
    print(f"benchmark wall time (servers up to down): {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
