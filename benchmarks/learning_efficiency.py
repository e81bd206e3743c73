"""Learning efficiency of GRPO / GDPO / GD²PO on a tiny multi-reward task with conflicting rewards.

Task: 16 prompts (query groups), each with a hidden answer of 2-5 tokens over 8 content tokens.
The policy is a table of per-prompt logits over 8 tokens + EOS at each of 8 positions; a response
is the tokens before the first EOS. Rewards per rollout, all in [0, 1]:
  correctness  fraction of the answer's tokens produced at the right positions
  brevity      1 - response length / 8                       (conflicts with correctness)
  format (K=3) fraction of response tokens that are even (the "allowed alphabet"), 0 if empty;
               about half the answer tokens are odd, so format also conflicts with correctness.
Each step samples G=8 rollouts per prompt, turns the K rewards into one advantage per rollout with
`compute_advantages` (the package's code, all four estimators), broadcasts it to the rollout's
tokens (EOS included) and takes one Adam step on the token-mean REINFORCE loss (on-policy, so PPO's
ratio is 1). Masked rollouts are dropped from the loss, as an action mask would. Progress is the
combined reward (sum over dimensions) normalised so the uniform policy scores 0 and the best
deterministic response (found by enumeration) scores 1; "steps to target" is the first step where
its 10-step trailing mean reaches the target. Each seed draws a new task, initial logits and samples.

    python benchmarks/learning_efficiency.py [--quick] [--out benchmarks/learning_efficiency.png]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openrlhf_gd2po.advantages import ESTIMATORS, compute_advantages  # noqa: E402

NUM_PROMPTS = 16
GROUP_SIZE = 8
MAX_LEN = 8
NUM_TOKENS = 8  # content tokens 0..7; even ones are the format's allowed alphabet
EOS = NUM_TOKENS
ANSWER_LENGTHS = (2, 5)  # inclusive range
LEARNING_RATE = 0.05
TARGET = 0.8  # normalised score (fraction of the uniform-to-optimal gap)
SMOOTH_WINDOW = 10
SNR_THRESHOLDS = (0.5, 0.8, 0.95)  # 0.8 is the package default


def make_task(seed):
    """Random answers [P, MAX_LEN] (padded with -1) and their lengths [P]."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    lengths = torch.randint(ANSWER_LENGTHS[0], ANSWER_LENGTHS[1] + 1, (NUM_PROMPTS,), generator=gen)
    answers = torch.randint(0, NUM_TOKENS, (NUM_PROMPTS, MAX_LEN), generator=gen)
    positions = torch.arange(MAX_LEN)
    answers[positions >= lengths[:, None]] = -1
    return answers, lengths


def sample_rollouts(logits, prompt_ids, gen):
    """Sample one response per entry of prompt_ids.

    Returns tokens [N, L], response lengths [N] (tokens before the first EOS) and the loss mask
    [N, L] (response tokens plus the EOS that ended it).
    """
    probs = torch.softmax(logits[prompt_ids].detach(), dim=-1)
    tokens = torch.multinomial(probs.reshape(-1, EOS + 1), 1, generator=gen).reshape(len(prompt_ids), MAX_LEN)
    is_eos = tokens == EOS
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.tensor(MAX_LEN))
    loss_mask = torch.arange(MAX_LEN) <= lengths[:, None]
    return tokens, lengths, loss_mask


def score(tokens, lengths, prompt_ids, answers, answer_lengths, num_rewards):
    """Rewards [N, num_rewards]: correctness, brevity and (if 3) format."""
    in_response = torch.arange(MAX_LEN) < lengths[:, None]
    correct = ((tokens == answers[prompt_ids]) & in_response).sum(dim=1)
    correctness = correct / answer_lengths[prompt_ids]
    brevity = 1.0 - lengths / MAX_LEN
    columns = [correctness, brevity]
    if num_rewards == 3:
        allowed = ((tokens % 2 == 0) & (tokens != EOS) & in_response).sum(dim=1)
        columns.append(allowed / lengths.clamp(min=1))
    return torch.stack(columns, dim=1).float()


def best_combined_reward(answers, answer_lengths, num_rewards):
    """Mean over prompts of the best combined reward any deterministic response gets.

    For a response of length n, only the number c of odd answer tokens it reproduces matters:
    every other position holds an even token (the right one where the answer's is even).
    """
    best = []
    for answer, m in zip(answers.tolist(), answer_lengths.tolist()):
        prompt_best = 0.0
        for n in range(MAX_LEN + 1):
            even_hits = sum(t % 2 == 0 for t in answer[: min(n, m)])
            odd_slots = sum(t % 2 == 1 for t in answer[: min(n, m)])
            choices = range(odd_slots + 1) if num_rewards == 3 else [odd_slots]
            for c in choices:
                reward = (even_hits + c) / m + 1.0 - n / MAX_LEN
                if num_rewards == 3:
                    reward += (n - c) / n if n else 0.0
                prompt_best = max(prompt_best, reward)
        best.append(prompt_best)
    return sum(best) / len(best)


def uniform_combined_reward(answers, answer_lengths, num_rewards, gen, num_samples=512):
    """Monte Carlo mean combined reward of the uniform policy (num_samples per prompt)."""
    prompt_ids = torch.arange(NUM_PROMPTS).repeat_interleave(num_samples)
    tokens, lengths, _ = sample_rollouts(torch.zeros(NUM_PROMPTS, MAX_LEN, EOS + 1), prompt_ids, gen)
    return score(tokens, lengths, prompt_ids, answers, answer_lengths, num_rewards).sum(dim=1).mean().item()


def train(estimator, num_rewards, seed, steps, snr_threshold=0.8, learning_rate=LEARNING_RATE):
    """One training run; returns per-step normalised score, combined reward, keep and conflict ratio."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    answers, answer_lengths = make_task(seed)
    best = best_combined_reward(answers, answer_lengths, num_rewards)
    uniform = uniform_combined_reward(answers, answer_lengths, num_rewards, gen)

    logits = (0.1 * torch.randn(NUM_PROMPTS, MAX_LEN, EOS + 1)).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=learning_rate)
    prompt_ids = torch.arange(NUM_PROMPTS).repeat_interleave(GROUP_SIZE)
    history = {"score": [], "combined": [], "per_dim": [], "keep_ratio": [], "conflict_ratio": []}
    for _ in range(steps):
        tokens, lengths, loss_mask = sample_rollouts(logits, prompt_ids, gen)
        rewards = score(tokens, lengths, prompt_ids, answers, answer_lengths, num_rewards)
        result = compute_advantages(
            rewards, prompt_ids, estimator, response_lengths=loss_mask.sum(dim=1), snr_threshold=snr_threshold
        )
        # Token-mean over the tokens of kept rollouts: each token's log-prob times its rollout's advantage.
        token_weights = loss_mask & result.keep_mask[:, None]
        log_probs = torch.log_softmax(logits[prompt_ids], dim=-1).gather(2, tokens[:, :, None])[:, :, 0]
        loss = -(result.advantages[:, None] * log_probs * token_weights).sum() / token_weights.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        combined = rewards.sum(dim=1).mean().item()
        history["combined"].append(combined)
        history["per_dim"].append(rewards.mean(dim=0).tolist())
        history["score"].append((combined - uniform) / (best - uniform))
        history["keep_ratio"].append(result.metrics["keep_ratio"])
        history["conflict_ratio"].append(result.metrics["conflict_ratio"])
    return history


def trailing_mean(values, window=SMOOTH_WINDOW):
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def steps_to_target(scores):
    """1-based step at which the trailing mean score first reaches TARGET, or None."""
    for step, value in enumerate(trailing_mean(scores), start=1):
        if value >= TARGET:
            return step
    return None


def mean_std(values):
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values)


def summarise(runs):
    """Table row numbers over a list of per-seed histories."""
    reached = [s for s in (steps_to_target(run["score"]) for run in runs) if s is not None]
    tail = max(1, len(runs[0]["score"]) // 10)  # final = mean of the last 10% of steps
    return {
        "seeds": len(runs),
        "reached": len(reached),
        "steps_to_target": mean_std(reached),
        "final_score": mean_std([statistics.fmean(run["score"][-tail:]) for run in runs]),
        "final_combined": mean_std([statistics.fmean(run["combined"][-tail:]) for run in runs]),
        "mean_score": mean_std([statistics.fmean(run["score"]) for run in runs]),
        "final_per_dim": [statistics.fmean(step[k] for run in runs for step in run["per_dim"][-tail:])
                          for k in range(len(runs[0]["per_dim"][0]))],
        "keep_ratio": statistics.fmean(v for run in runs for v in run["keep_ratio"]),
        "conflict_ratio": statistics.fmean(v for run in runs for v in run["conflict_ratio"]),
    }


def format_table(rows):
    header = (
        f"{'K':>2} {'estimator':<18} {'reached':>7} {'steps to target':>15} {'final score':>13} "
        f"{'final reward':>13} {'corr/brev/fmt':>14} {'mean score':>12} {'keep':>6} {'conflict':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        s = row["summary"]
        steps = "-" if not s["reached"] else f"{s['steps_to_target'][0]:.0f}±{s['steps_to_target'][1]:.0f}"
        lines.append(
            f"{row['num_rewards']:>2} {row['name']:<18} {s['reached']:>3}/{s['seeds']:<3} {steps:>15} "
            f"{s['final_score'][0]:>7.3f}±{s['final_score'][1]:.3f} "
            f"{s['final_combined'][0]:>7.3f}±{s['final_combined'][1]:.3f} "
            f"{'/'.join(f'{v:.2f}' for v in s['final_per_dim']):>14} "
            f"{s['mean_score'][0]:>6.3f}±{s['mean_score'][1]:.3f} "
            f"{s['keep_ratio']:>6.3f} {s['conflict_ratio']:>8.3f}"
        )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({row["num_rewards"] for row in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.2), squeeze=False)
    for ax, num_rewards in zip(axes[0], settings):
        for row in (r for r in rows if r["num_rewards"] == num_rewards):
            curves = torch.tensor([trailing_mean(run["score"]) for run in row["runs"]])
            mean, std = curves.mean(dim=0), curves.std(dim=0, correction=0)
            steps = range(1, len(mean) + 1)
            style = "--" if row["estimator"] == "gd2po_snr" and row["snr_threshold"] != 0.8 else "-"
            (line,) = ax.plot(steps, mean, style, label=row["name"], linewidth=1.5)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.12)
        ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"K={num_rewards} rewards ({len(rows[0]['runs'])} seed(s), mean ± std)")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"normalised combined reward ({SMOOTH_WINDOW}-step mean)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps: smoke test")
    parser.add_argument("--out", default="benchmarks/learning_efficiency.png", help="PNG path; JSON goes beside it")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help="Adam learning rate")
    args = parser.parse_args()
    seeds, steps, thresholds = (1, 30, (0.8,)) if args.quick else (args.seeds, args.steps, SNR_THRESHOLDS)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine

    start = time.perf_counter()
    rows = []
    for num_rewards in (2, 3):
        variants = [(name, 0.8) for name in ESTIMATORS if name != "gd2po_snr"]
        variants += [("gd2po_snr", tau) for tau in thresholds]
        for estimator, tau in variants:
            name = f"gd2po_snr(τ={tau})" if estimator == "gd2po_snr" else estimator
            runs = [train(estimator, num_rewards, seed, steps, tau, args.lr) for seed in range(seeds)]
            rows.append({"num_rewards": num_rewards, "name": name, "estimator": estimator, "snr_threshold": tau,
                         "runs": runs, "summary": summarise(runs)})
    elapsed = time.perf_counter() - start

    print(f"{seeds} seed(s) x {steps} steps, {NUM_PROMPTS} prompts x {GROUP_SIZE} rollouts, Adam lr {args.lr}, "
          f"target score {TARGET}")
    print(format_table(rows))
    print(f"elapsed {elapsed:.1f}s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out)
    config = {"seeds": seeds, "steps": steps, "num_prompts": NUM_PROMPTS, "group_size": GROUP_SIZE,
              "max_len": MAX_LEN, "num_tokens": NUM_TOKENS, "learning_rate": args.lr, "target": TARGET,
              "smooth_window": SMOOTH_WINDOW, "elapsed_s": round(elapsed, 1)}
    results = []
    for row in rows:
        mean_curve = [statistics.fmean(scores) for scores in zip(*(run["score"] for run in row["runs"]))]
        results.append({k: v for k, v in row.items() if k != "runs"} | {"mean_curve": mean_curve})
    out.with_suffix(".json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
