"""Learning efficiency of GRPO / GDPO / GD²PO on a tiny multi-reward task, and a map of when masking helps.

Task: 16 prompts (query groups), each with a hidden answer of 2-5 tokens over 8 content tokens.
The policy is a table of per-prompt logits over 8 tokens + EOS at each of 8 positions (positions
are sampled independently); a response is the tokens before the first EOS. Rewards, all in [0, 1]:
  correctness  fraction of the answer's tokens produced at the right positions
  secondary    brevity 1 - length / 8 on "conflicting" prompts; length match 1 - |length - answer
               length| / 8 on the others (it agrees with correctness: both peak at the answer)
  format (K=3) fraction of response tokens that are even (the "allowed alphabet"), 0 if empty;
               about half the answer tokens are odd, so format also conflicts with correctness.
Conflict intensity c (the map's knob) = the share of prompts whose secondary reward is brevity,
i.e. how often the two dimensions pull apart inside a group; c = 1 is the original K=2 task.

Each step samples G=8 rollouts per prompt, turns the K rewards into one advantage per rollout with
`compute_advantages` (the package's code), broadcasts it to the rollout's tokens (EOS included)
and takes one optimiser step (Adam by default; `--optimizer sgd`) on the token-mean REINFORCE loss
(on-policy, so PPO's ratio is 1). Masked rollouts have zero advantage and stay in the token-mean
denominator, as in OpenRLHF's default path and the authors' code; the `exclude` variants leave them
out of it (`--gd2po.masked_rollouts exclude`). `floor` variants pass `group_std_floor=0.1`.

Metrics (fixed before the runs):
  P(exact)   PRIMARY for the map: mean over prompts of the policy's probability of emitting exactly
             the answer followed by EOS, computed from the logits (no sampling noise), averaged over
             the last 10% of steps. On every prompt, for either secondary reward, the exact answer is
             the response where correctness is 1 and the secondary reward is the best it can be with
             correctness 1, and it maximises the plain sum too: every dimension at its target, not
             one dimension traded against another.
  steps      first step at which P(exact) >= 0.5. A seed that never reaches it within the budget is
             censored: it counts as the step budget, so the mean is a lower bound, shown as ">=N".
  p(token)   neutral: mean over prompts and answer positions of the probability of the right token.
  pareto     neutral: distance of the policy's expected (correctness, secondary) point (exact, from
             the logits) to the deterministic Pareto front of that prompt, mean over prompts
             (front: the segment (0, 1)-(1, 1 - m/8) for brevity, the point (1, 1) for length match).
  score      the raw sum, rescaled so the uniform policy is 0 and the best deterministic response 1
             (what GRPO's advantage estimates); "steps to target" on the table = first step where its
             10-step trailing mean reaches 0.8, censored as above.
Each seed draws a new task, initial logits and samples; seeds are paired across estimators.
`train(..., dynamic=mode)` adds DAPO-style dynamic sampling (`draw_groups`); its benchmark, with samples
drawn counted as cost, is benchmarks/dynamic_sampling_efficiency.py.

    python benchmarks/learning_efficiency.py [--quick] [--part table|map|all] [--out benchmarks/learning_efficiency.png]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openrlhf_gd2po.advantages import compute_advantages, group_drop_reason  # noqa: E402

NUM_PROMPTS = 16
GROUP_SIZE = 8
MAX_LEN = 8
NUM_TOKENS = 8  # content tokens 0..7; even ones are the format's allowed alphabet
EOS = NUM_TOKENS
ANSWER_LENGTHS = (2, 5)  # inclusive range
LEARNING_RATE = 0.05
TARGET = 0.8  # normalised score (fraction of the uniform-to-optimal gap)
EXACT_TARGET = 0.5  # P(exact) for the map's steps to target
SMOOTH_WINDOW = 10
STD_FLOOR = 0.1
CONFLICT_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_EXTRA_PROMPTS = 2 * NUM_PROMPTS  # dynamic sampling's refill cap per step (the trainer's default: 3x)

# (name, estimator, snr_threshold, group_std_floor, exclude masked rollouts from the denominator)
TABLE_VARIANTS = [
    ("grpo", "grpo", 0.8, 0.0, False),
    ("gdpo", "gdpo", 0.8, 0.0, False),
    ("gdpo floor", "gdpo", 0.8, STD_FLOOR, False),
    ("gd2po_hard", "gd2po_hard", 0.8, 0.0, False),
    ("gd2po_hard exclude", "gd2po_hard", 0.8, 0.0, True),
    ("gd2po_snr(τ=0.5)", "gd2po_snr", 0.5, 0.0, False),
    ("gd2po_snr(τ=0.8)", "gd2po_snr", 0.8, 0.0, False),
    ("gd2po_snr(τ=0.95)", "gd2po_snr", 0.95, 0.0, False),
    ("gd2po_snr(τ=0.8) floor", "gd2po_snr", 0.8, STD_FLOOR, False),
]
# The map leaves out the table's variants that matched a neighbour there (exclude ~ keep, τ=0.95 ~ hard).
MAP_VARIANTS = [v for v in TABLE_VARIANTS if v[0] not in ("gd2po_hard exclude", "gd2po_snr(τ=0.95)")]


def make_task(seed, conflict=1.0):
    """Random answers [P, MAX_LEN] (padded with -1), their lengths [P] and which prompts use brevity [P]."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    lengths = torch.randint(ANSWER_LENGTHS[0], ANSWER_LENGTHS[1] + 1, (NUM_PROMPTS,), generator=gen)
    answers = torch.randint(0, NUM_TOKENS, (NUM_PROMPTS, MAX_LEN), generator=gen)
    positions = torch.arange(MAX_LEN)
    answers[positions >= lengths[:, None]] = -1
    # A separate generator, so that conflict = 1 draws exactly the original task.
    order = torch.randperm(NUM_PROMPTS, generator=torch.Generator().manual_seed(20_000 + seed))
    brevity = torch.zeros(NUM_PROMPTS, dtype=torch.bool)
    brevity[order[: round(conflict * NUM_PROMPTS)]] = True
    return answers, lengths, brevity


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


def score(tokens, lengths, prompt_ids, answers, answer_lengths, brevity, num_rewards):
    """Rewards [N, num_rewards]: correctness, secondary (brevity or length match) and (if 3) format."""
    in_response = torch.arange(MAX_LEN) < lengths[:, None]
    correct = ((tokens == answers[prompt_ids]) & in_response).sum(dim=1)
    m = answer_lengths[prompt_ids]
    secondary = torch.where(brevity[prompt_ids], 1.0 - lengths / MAX_LEN, 1.0 - (lengths - m).abs() / MAX_LEN)
    columns = [correct / m, secondary]
    if num_rewards == 3:
        allowed = ((tokens % 2 == 0) & (tokens != EOS) & in_response).sum(dim=1)
        columns.append(allowed / lengths.clamp(min=1))
    return torch.stack(columns, dim=1).float()


def best_combined_reward(answers, answer_lengths, brevity, num_rewards):
    """Mean over prompts of the best combined reward any deterministic response gets.

    For a response of length n, only the number c of odd answer tokens it reproduces matters:
    every other position holds an even token (the right one where the answer's is even).
    """
    best = []
    for answer, m, short in zip(answers.tolist(), answer_lengths.tolist(), brevity.tolist()):
        prompt_best = 0.0
        for n in range(MAX_LEN + 1):
            even_hits = sum(t % 2 == 0 for t in answer[: min(n, m)])
            odd_slots = sum(t % 2 == 1 for t in answer[: min(n, m)])
            choices = range(odd_slots + 1) if num_rewards == 3 else [odd_slots]
            for c in choices:
                reward = (even_hits + c) / m + (1.0 - n / MAX_LEN if short else 1.0 - abs(n - m) / MAX_LEN)
                if num_rewards == 3:
                    reward += (n - c) / n if n else 0.0
                prompt_best = max(prompt_best, reward)
        best.append(prompt_best)
    return sum(best) / len(best)


def uniform_combined_reward(answers, answer_lengths, brevity, num_rewards, gen, num_samples=512):
    """Monte Carlo mean combined reward of the uniform policy (num_samples per prompt)."""
    prompt_ids = torch.arange(NUM_PROMPTS).repeat_interleave(num_samples)
    tokens, lengths, _ = sample_rollouts(torch.zeros(NUM_PROMPTS, MAX_LEN, EOS + 1), prompt_ids, gen)
    return score(tokens, lengths, prompt_ids, answers, answer_lengths, brevity, num_rewards).sum(dim=1).mean().item()


@torch.no_grad()
def neutral_metrics(logits, answers, answer_lengths, brevity):
    """P(exact), p(token) and Pareto distance, exactly from the logits (see the module docstring)."""
    probs = torch.softmax(logits, dim=-1)  # [P, L, V]
    positions = torch.arange(MAX_LEN)
    in_answer = positions < answer_lengths[:, None]
    right = probs.gather(2, answers.clamp(min=0)[:, :, None])[:, :, 0]  # [P, L]
    p_eos = probs[:, :, EOS]
    exact = torch.where(in_answer, right, 1.0).prod(dim=1) * p_eos.gather(1, answer_lengths[:, None])[:, 0]
    token = (right * in_answer).sum(dim=1) / answer_lengths
    # P(no EOS before position i) = P(length >= i); expected length = Σ_i P(length > i).
    alive = torch.cat([torch.ones(NUM_PROMPTS, 1), (1 - p_eos).cumprod(dim=1)], dim=1)  # [P, L+1]
    expected_correctness = (right * alive[:, :-1] * in_answer).sum(dim=1) / answer_lengths
    expected_length = alive[:, 1:].sum(dim=1)
    m = answer_lengths.double()
    # E|length - m| needs the length distribution: P(length = n) = alive[n] * p_eos[n] (n < L), alive[L].
    length_dist = torch.cat([alive[:, :-1] * p_eos, alive[:, -1:]], dim=1)
    expected_match = 1.0 - (length_dist * (torch.arange(MAX_LEN + 1) - m[:, None]).abs()).sum(dim=1) / MAX_LEN
    point = torch.stack([expected_correctness.double(),
                         torch.where(brevity, 1.0 - expected_length.double() / MAX_LEN, expected_match.double())], 1)
    # Brevity front: segment from (0, 1) to (1, 1 - m/8); length-match front: the point (1, 1).
    start = torch.tensor([0.0, 1.0]).expand(NUM_PROMPTS, 2)
    end = torch.stack([torch.ones_like(m), 1.0 - m / MAX_LEN], dim=1)
    start = torch.where(brevity[:, None], start, torch.ones(NUM_PROMPTS, 2, dtype=torch.float64))
    segment = end - start
    t = ((point - start) * segment).sum(dim=1) / (segment * segment).sum(dim=1).clamp(min=1e-12)
    nearest = start + t.clamp(0, 1)[:, None] * segment
    pareto = (point - nearest).norm(dim=1)
    return exact.mean().item(), token.mean().item(), pareto.mean().item()


def draw_groups(logits, gen, prompt_gen, reward_fn, drop_reason):
    """One step's groups with DAPO-style dynamic sampling (the trainer's refill loop).

    Draws the 16 prompts, drops each group `drop_reason` (its [G, K] rewards -> reason or None) rejects
    and draws as many replacement prompts (uniform over the task's prompts, from `prompt_gen`) as groups
    are missing, until 16 are kept or MAX_EXTRA_PROMPTS extra prompts were drawn. A prompt drawn twice is
    two groups. Returns the kept rollouts (tokens, lengths, loss mask, prompt ids, rewards), the rewards
    of every rollout drawn and the reasons (None = kept) of every group drawn.
    """
    prompts, kept, drawn_rewards, reasons, extra = torch.arange(NUM_PROMPTS), [], [], [], 0
    while True:
        prompt_ids = prompts.repeat_interleave(GROUP_SIZE)
        tokens, lengths, loss_mask = sample_rollouts(logits, prompt_ids, gen)
        rewards = reward_fn(tokens, lengths, prompt_ids)
        round_reasons = [drop_reason(group) for group in rewards.split(GROUP_SIZE)]
        keep = torch.tensor([reason is None for reason in round_reasons]).repeat_interleave(GROUP_SIZE)
        kept.append([x[keep] for x in (tokens, lengths, loss_mask, prompt_ids, rewards)])
        drawn_rewards.append(rewards)
        reasons += round_reasons
        missing = NUM_PROMPTS - sum(reason is None for reason in reasons)
        if missing == 0 or extra == MAX_EXTRA_PROMPTS:
            return [torch.cat(x) for x in zip(*kept)], torch.cat(drawn_rewards), reasons
        prompts = torch.randint(0, NUM_PROMPTS, (min(missing, MAX_EXTRA_PROMPTS - extra),), generator=prompt_gen)
        extra += len(prompts)


def train(variant, num_rewards, seed, steps, conflict=1.0, learning_rate=LEARNING_RATE, optimizer_name="adam",
          dynamic="off"):
    """One training run; returns per-step score, combined reward and the metrics of the module docstring.

    `dynamic` is the dynamic-sampling mode of `group_drop_reason` ("off": every step trains on the 16
    prompts' groups, as before); each step also records the rollouts drawn ("samples") and its groups' reasons.
    """
    _, estimator, snr_threshold, std_floor, exclude_masked = variant
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    answers, answer_lengths, brevity = make_task(seed, conflict)
    best = best_combined_reward(answers, answer_lengths, brevity, num_rewards)
    uniform = uniform_combined_reward(answers, answer_lengths, brevity, num_rewards, gen)

    logits = (0.1 * torch.randn(NUM_PROMPTS, MAX_LEN, EOS + 1)).requires_grad_()
    optimizer = (torch.optim.Adam if optimizer_name == "adam" else torch.optim.SGD)([logits], lr=learning_rate)
    prompt_gen = torch.Generator().manual_seed(30_000 + seed)  # replacement prompts; unused when dynamic="off"

    def reward_fn(tokens, lengths, prompt_ids):
        return score(tokens, lengths, prompt_ids, answers, answer_lengths, brevity, num_rewards)

    def drop_reason(group_rewards):
        return group_drop_reason(group_rewards, estimator, dynamic, snr_threshold=snr_threshold,
                                 group_std_floor=std_floor)

    history = {key: [] for key in ("score", "combined", "per_dim", "keep_ratio", "conflict_ratio", "exact",
                                   "token_prob", "pareto", "summed_advantage", "samples", "reasons")}
    for _ in range(steps):
        (tokens, _, loss_mask, prompt_ids, rewards), drawn_rewards, reasons = draw_groups(
            logits, gen, prompt_gen, reward_fn, drop_reason)
        if len(prompt_ids):  # at the refill cap with nothing kept: no update, the samples still count
            group_ids = torch.arange(len(prompt_ids) // GROUP_SIZE).repeat_interleave(GROUP_SIZE)
            result = compute_advantages(rewards, group_ids, estimator, response_lengths=loss_mask.sum(dim=1),
                                        snr_threshold=snr_threshold, group_std_floor=std_floor)
            # Token mean: masked rollouts (advantage 0) count in the denominator unless excluded.
            denominator_mask = loss_mask & result.keep_mask[:, None] if exclude_masked else loss_mask
            log_probs = torch.log_softmax(logits[prompt_ids], dim=-1).gather(2, tokens[:, :, None])[:, :, 0]
            loss = -(result.advantages[:, None] * log_probs * loss_mask).sum() / denominator_mask.sum().clamp(min=1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for key, name in (("keep_ratio", "keep_ratio"), ("conflict_ratio", "conflict_ratio"),
                              ("summed_advantage", "mean_abs_summed_advantage")):
                history[key].append(result.metrics[name])

        combined = drawn_rewards.sum(dim=1).mean().item()  # every rollout drawn: all come from the policy
        exact, token_prob, pareto = neutral_metrics(logits, answers, answer_lengths, brevity)
        for key, value in (("combined", combined), ("per_dim", drawn_rewards.mean(dim=0).tolist()),
                           ("score", (combined - uniform) / (best - uniform)),
                           ("exact", exact), ("token_prob", token_prob), ("pareto", pareto),
                           ("samples", len(drawn_rewards)), ("reasons", reasons)):
            history[key].append(value)
    return history


def trailing_mean(values, window=SMOOTH_WINDOW):
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def censored_steps(curve, target):
    """(first 1-based step where `curve` reaches target, or the step budget; reached?)."""
    for step, value in enumerate(curve, start=1):
        if value >= target:
            return step, True
    return len(curve), False


def mean_std(values):
    return statistics.fmean(values), statistics.pstdev(values)


def final(run, key):
    tail = max(1, len(run[key]) // 10)  # final = mean of the last 10% of steps
    return statistics.fmean(run[key][-tail:])


def summarise(runs):
    """Numbers over a list of per-seed histories (steps are censored at the budget, see the docstring)."""
    score_steps = [censored_steps(trailing_mean(run["score"]), TARGET) for run in runs]
    exact_steps = [censored_steps(run["exact"], EXACT_TARGET) for run in runs]
    return {
        "seeds": len(runs),
        "reached": sum(reached for _, reached in score_steps),
        "steps_to_target": mean_std([step for step, _ in score_steps]),
        "exact_reached": sum(reached for _, reached in exact_steps),
        "steps_to_exact": mean_std([step for step, _ in exact_steps]),
        **{name: mean_std([final(run, key) for run in runs]) for name, key in (
            ("final_score", "score"), ("final_combined", "combined"), ("final_exact", "exact"),
            ("final_token_prob", "token_prob"), ("final_pareto", "pareto"))},
        "final_per_dim": [statistics.fmean(final({"v": [step[k] for step in run["per_dim"]]}, "v") for run in runs)
                          for k in range(len(runs[0]["per_dim"][0]))],
        **{key: statistics.fmean(v for run in runs for v in run[key])
           for key in ("keep_ratio", "conflict_ratio", "summed_advantage")},
    }


def steps_text(mean, seeds, reached):
    return f"{'>=' if reached < seeds else ''}{mean:.0f}"


def format_table(rows):
    header = (
        f"{'K':>2} {'estimator':<23} {'reached':>7} {'steps':>6} {'final score':>12} {'corr/2nd/fmt':>14} "
        f"{'P(exact)':>12} {'p(token)':>8} {'pareto':>6} {'|ΣA|':>5} {'keep':>5} {'conflict':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        s = row["summary"]
        lines.append(
            f"{row['num_rewards']:>2} {row['name']:<23} {s['reached']:>3}/{s['seeds']:<3} "
            f"{steps_text(s['steps_to_target'][0], s['seeds'], s['reached']):>6} "
            f"{s['final_score'][0]:>6.3f}±{s['final_score'][1]:.3f} "
            f"{'/'.join(f'{v:.2f}' for v in s['final_per_dim']):>14} "
            f"{s['final_exact'][0]:>6.3f}±{s['final_exact'][1]:.3f} {s['final_token_prob'][0]:>8.3f} "
            f"{s['final_pareto'][0]:>6.3f} {s['summed_advantage']:>5.2f} {s['keep_ratio']:>5.2f} "
            f"{s['conflict_ratio']:>8.3f}"
        )
    return "\n".join(lines)


def paired_wins(rows, name, against, key="exact"):
    """Seeds (paired) where variant `name` ends above `against` on `key` (below, for pareto)."""
    a, b = (next(r for r in rows if r["name"] == n) for n in (name, against))
    sign = -1 if key == "pareto" else 1
    return sum(sign * (final(x, key) - final(y, key)) > 0 for x, y in zip(a["runs"], b["runs"]))


def format_map(cells):
    lines = []
    levels = sorted({cell["conflict"] for cell in cells})
    names = list(dict.fromkeys(cell["name"] for cell in cells))
    for title, key, fmt in (("P(exact), final (PRIMARY)", "final_exact", "{:.3f}"),
                            ("steps to P(exact) >= 0.5 (censored at the budget)", "steps_to_exact", None),
                            ("p(token), final", "final_token_prob", "{:.3f}"),
                            ("Pareto distance, final (lower is better)", "final_pareto", "{:.3f}"),
                            ("score (raw sum, normalised), final", "final_score", "{:.3f}"),
                            ("mean |Σ_k A_k| over kept rollouts", "summed_advantage", "{:.2f}"),
                            ("keep ratio", "keep_ratio", "{:.2f}")):
        lines += ["", f"{title}; columns: conflict intensity c"]
        lines.append(f"{'estimator':<23} " + " ".join(f"{c:>11}" for c in levels))
        for name in names:
            texts = []
            for c in levels:
                s = next(cell for cell in cells if cell["name"] == name and cell["conflict"] == c)["summary"]
                if key == "steps_to_exact":
                    texts.append(steps_text(s[key][0], s["seeds"], s["exact_reached"]) + f" ({s['exact_reached']})")
                elif isinstance(s[key], tuple):
                    texts.append(fmt.format(s[key][0]) + f"±{s[key][1]:.2f}")
                else:
                    texts.append(fmt.format(s[key]))
            lines.append(f"{name:<23} " + " ".join(f"{t:>11}" for t in texts))
    lines += ["", "paired seeds where the variant beats gdpo on P(exact) / p(token) / pareto"]
    lines.append(f"{'estimator':<23} " + " ".join(f"{c:>11}" for c in levels))
    for name in names:
        if name == "gdpo":
            continue
        texts = []
        for c in levels:
            rows = [cell for cell in cells if cell["conflict"] == c]
            wins = (paired_wins(rows, name, "gdpo", key) for key in ("exact", "token_prob", "pareto"))
            texts.append("/".join(map(str, wins)))
        lines.append(f"{name:<23} " + " ".join(f"{t:>11}" for t in texts))
    return "\n".join(lines)


def plot_curves(rows, path):
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
            style = "--" if "floor" in row["name"] or "exclude" in row["name"] else "-"
            (line,) = ax.plot(steps, mean, style, label=row["name"], linewidth=1.2)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.08)
        ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"K={num_rewards} rewards ({len(rows[0]['runs'])} seed(s), mean ± std)")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"normalised combined reward ({SMOOTH_WINDOW}-step mean)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_map(cells, path, optimizer_text):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(cell["name"] for cell in cells))
    panels = (("final_exact", "P(exact answer) — primary"), ("final_token_prob", "p(right token)"),
              ("final_pareto", "Pareto distance (lower better)"), ("final_score", "raw-sum score"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4))
    for ax, (key, title) in zip(axes, panels):
        for name in names:
            mine = sorted((c for c in cells if c["name"] == name), key=lambda c: c["conflict"])
            xs = [c["conflict"] for c in mine]
            means = [c["summary"][key][0] for c in mine]
            stds = [c["summary"][key][1] for c in mine]
            style = "--" if "floor" in name or "exclude" in name else "-"
            ax.errorbar(xs, means, yerr=stds, fmt=style + "o", markersize=3, capsize=2, linewidth=1.2, label=name)
        ax.set_title(title)
        ax.set_xlabel("conflict intensity c (share of prompts with brevity)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"K=2, final values (last 10% of steps), mean ± std over {cells[0]['summary']['seeds']} seeds; "
                 f"{optimizer_text}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps, few variants: smoke test")
    parser.add_argument("--part", choices=("table", "map", "all"), default="all",
                        help="table: the original K=2/K=3 task; map: the conflict-intensity sweep (default: all)")
    parser.add_argument("--out", default="benchmarks/learning_efficiency.png",
                        help="PNG path of the table's curves; the map goes to <stem>_map.png, JSON beside them")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    args = parser.parse_args()
    seeds, steps = (1, 30) if args.quick else (args.seeds, args.steps)
    table_variants = TABLE_VARIANTS[:4] + TABLE_VARIANTS[6:7] if args.quick else TABLE_VARIANTS
    map_variants = table_variants if args.quick else MAP_VARIANTS
    levels = (0.0, 1.0) if args.quick else CONFLICT_LEVELS
    optimizer_text = f"{'Adam' if args.optimizer == 'adam' else 'SGD'} lr {args.lr}"
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"seeds": seeds, "steps": steps, "num_prompts": NUM_PROMPTS, "group_size": GROUP_SIZE,
              "max_len": MAX_LEN, "num_tokens": NUM_TOKENS, "optimizer": args.optimizer,
              "learning_rate": args.lr, "target": TARGET, "exact_target": EXACT_TARGET,
              "smooth_window": SMOOTH_WINDOW, "std_floor": STD_FLOOR}
    print(f"{seeds} seed(s) x {steps} steps, {NUM_PROMPTS} prompts x {GROUP_SIZE} rollouts, {optimizer_text}")
    if args.part in ("table", "all"):
        start = time.perf_counter()
        rows = []
        for num_rewards in (2, 3):
            for variant in table_variants:
                runs = [train(variant, num_rewards, seed, steps, 1.0, args.lr, args.optimizer) for seed in range(seeds)]
                rows.append({"num_rewards": num_rewards, "name": variant[0], "runs": runs, "summary": summarise(runs)})
        elapsed = time.perf_counter() - start
        print(f"\noriginal task (c = 1): target score {TARGET}; steps to target censored at {steps} (>=)")
        print(format_table(rows))
        print(f"elapsed {elapsed:.1f}s")
        plot_curves(rows, out)
        results = [{k: v for k, v in row.items() if k != "runs"}
                   | {"mean_curve": [statistics.fmean(s) for s in zip(*(run["score"] for run in row["runs"]))]}
                   for row in rows]
        out.with_suffix(".json").write_text(json.dumps(
            {"config": config | {"elapsed_s": round(elapsed, 1)}, "results": results}, indent=1))
        print(f"wrote {out} and {out.with_suffix('.json')}")
    if args.part in ("map", "all"):
        start = time.perf_counter()
        cells = []
        for conflict in levels:
            for variant in map_variants:
                runs = [train(variant, 2, seed, steps, conflict, args.lr, args.optimizer) for seed in range(seeds)]
                cells.append({"conflict": conflict, "name": variant[0], "runs": runs, "summary": summarise(runs)})
            print(f"conflict {conflict} done ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
        elapsed = time.perf_counter() - start
        print(f"\nconflict map, K=2 (correctness + brevity on a share c of prompts, length match on the rest)")
        print(format_map(cells))
        print(f"elapsed {elapsed:.1f}s")
        map_path = out.with_name(out.stem + "_map.png")
        plot_map(cells, map_path, optimizer_text)
        wins = {name: {str(c): {key: paired_wins([x for x in cells if x["conflict"] == c], name, "gdpo", key)
                                for key in ("exact", "token_prob", "pareto")} for c in levels}
                for name in dict.fromkeys(cell["name"] for cell in cells) if name != "gdpo"}
        map_path.with_suffix(".json").write_text(json.dumps(
            {"config": config | {"conflict_levels": list(levels), "elapsed_s": round(elapsed, 1)},
             "cells": [{k: v for k, v in cell.items() if k != "runs"} for cell in cells],
             "paired_wins_over_gdpo": wins}, indent=1))
        print(f"wrote {map_path} and {map_path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
