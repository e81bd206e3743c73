"""Vectorised compute_advantages vs a straightforward per-group Python loop.

    python benchmarks/bench_advantages.py          # N in {1k, 16k, 65k} x K in {2, 3, 8}
    python benchmarks/bench_advantages.py --quick  # N = 1k only, smoke test

Both implementations are checked to agree (torch.allclose) before anything is timed.
Times are medians over a few repeats; the loop gets fewer repeats at large N.
One torch thread by default: the loop is single-threaded anyway, and on a small shared
machine a second intra-op thread that is descheduled stalls each parallel kernel ~16 ms.
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch

from openrlhf_gd2po.advantages import compute_advantages

GROUP_SIZE = 8
TARGET_SPEEDUP = 100  # at N = 65k


def loop_advantages(rewards, group_ids, estimator, response_lengths, snr_threshold=0.8):
    """Reference: the same math written group by group, the way one would first code it."""
    rewards = rewards.double()
    rows_by_group = defaultdict(list)
    for row, group in enumerate(group_ids.tolist()):
        rows_by_group[group].append(row)

    summed = torch.zeros(len(rewards), dtype=torch.float64)
    keep_mask = torch.ones(len(rewards), dtype=torch.bool)
    for rows in rows_by_group.values():
        group_rewards = rewards[rows]
        if estimator == "grpo":
            group_rewards = group_rewards.sum(dim=1, keepdim=True)
        if len(rows) == 1:
            per_dim = group_rewards  # a singleton keeps its raw value
        else:
            per_dim = (group_rewards - group_rewards.mean(dim=0)) / (group_rewards.std(dim=0) + 1e-6)
        group_summed = per_dim.sum(dim=1)
        group_keep = torch.ones(len(rows), dtype=torch.bool)
        if estimator.startswith("gd2po"):
            for i in range(len(rows)):
                conflicted = bool((per_dim[i] > 1e-8).any() and (per_dim[i] < -1e-8).any())
                snr = group_summed[i] / (per_dim[i].abs().sum() + 1e-8)
                if estimator == "gd2po_hard":
                    group_keep[i] = not conflicted
                else:
                    group_keep[i] = not (conflicted and abs(snr) < snr_threshold)
            group_summed = group_summed * group_keep.double().mean()
        summed[rows] = group_summed
        keep_mask[rows] = group_keep

    if estimator == "grpo":
        return summed
    # Whitening is one global step over the kept rollouts' tokens.
    tokens = response_lengths.double() * keep_mask
    mean = (summed * tokens).sum() / tokens.sum()
    var = ((summed - mean).square() * tokens).sum() / (tokens.sum() - 1)
    whitened = (summed - mean) / torch.sqrt(var + 1e-8)
    return torch.where(tokens > 0, whitened, torch.zeros_like(whitened))


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_batch(n, k, seed=0):
    # Rewards in {0, 0.5, 1} give ties and sign conflicts, like verifiable rewards do.
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (n, k), generator=generator).float() / 2
    group_ids = torch.arange(n) // GROUP_SIZE
    lengths = torch.randint(1, 512, (n,), generator=generator)
    return rewards, group_ids, lengths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1k only (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [1024] if args.quick else [1024, 16384, 65536]
    dims = [2, 3, 8]
    estimators = ["gd2po_snr", "gdpo"]

    print(f"compute_advantages: vectorised vs per-group loop, group size {GROUP_SIZE}, "
          f"{torch.get_num_threads()} torch thread(s); target >= {TARGET_SPEEDUP}x at N = 65k")
    print(f"{'estimator':<10} {'N':>6} {'K':>2} {'vectorised ms':>14} {'loop ms':>10} {'speed-up':>9}")
    for estimator in estimators:
        for n in sizes:
            for k in dims:
                rewards, group_ids, lengths = make_batch(n, k)
                vectorised = lambda: compute_advantages(rewards, group_ids, estimator, response_lengths=lengths)
                loop = lambda: loop_advantages(rewards, group_ids, estimator, lengths)
                expected = loop()
                actual = vectorised().advantages.double()
                assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5), f"mismatch {estimator} N={n} K={k}"
                fast = median_seconds(vectorised, repeats=9)
                slow = median_seconds(loop, repeats=3 if n >= 65536 else 5)
                print(f"{estimator:<10} {n:>6} {k:>2} {fast * 1e3:>14.2f} {slow * 1e3:>10.1f} {slow / fast:>8.0f}x")


if __name__ == "__main__":
    main()
