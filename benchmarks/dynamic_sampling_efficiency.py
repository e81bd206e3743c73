"""Dynamic sampling (DAPO-style refill) for GDPO and GD²PO on learning_efficiency.py's task, samples counted as cost.

Each step still trains on NUM_PROMPTS=16 groups of GROUP_SIZE=8 rollouts, but a group that
`group_drop_reason` rejects is dropped and a replacement prompt (uniform over the 16 task prompts) is
drawn, until 16 groups are kept or 2 x 16 extra prompts were drawn in the step; at that cap the step
trains on what was kept (nothing kept: no update). See `learning_efficiency.draw_groups`. Modes:
  off        every group is kept (exactly learning_efficiency.py's runs)
  no_signal  drop groups in which every reward dimension is constant
  estimator  also drop groups the estimator gives no non-zero advantage (gd2po: all rollouts masked)
Cost is the number of rollouts (samples) drawn. Metrics, per row (seeds paired across modes):
  P(exact)        final, as in learning_efficiency.py (primary)
  samples@0.5     cumulative samples at the first step where P(exact) >= 0.5 (EXACT_TARGET); a seed that
                  never reaches it counts as all its samples, and the mean is then shown ">="
  P@budget        P(exact) at equal cost: final (last 10%) over the steps that fit in the off rows' budget
                  (steps x 16 x 8 samples); for the off rows it is their final P(exact)
  samples         total samples drawn; pass = kept groups / groups drawn; no_sig / est = share of the
                  groups drawn dropped for that reason; skip = steps with nothing kept (mean per seed)
  vs off          paired seeds where the row beats its "ds=off" row: higher P(exact) / higher P@budget /
                  fewer samples@0.5 (the row reaches the target, with fewer samples than the off row took
                  to reach it or, where off never did, than all the off row drew)
The table part is the original task (c = 1) at K = 2 and 3, the map part K = 2 at each conflict level.

    python benchmarks/dynamic_sampling_efficiency.py [--quick] [--part table|map|all] [--seeds 10] [--map-seeds 6]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_efficiency import (  # noqa: E402
    CONFLICT_LEVELS,
    EXACT_TARGET,
    GROUP_SIZE,
    LEARNING_RATE,
    MAX_EXTRA_PROMPTS,
    NUM_PROMPTS,
    TABLE_VARIANTS,
    censored_steps,
    final,
    mean_std,
    summarise,
    train,
)

MODES = ("off", "no_signal", "estimator")
VARIANTS = [v for v in TABLE_VARIANTS if v[0] in ("gdpo", "gd2po_snr(τ=0.8)")]


def samples_to_exact(run):
    """(cumulative samples at the first step with P(exact) >= EXACT_TARGET, or all samples; reached?)."""
    step, reached = censored_steps(run["exact"], EXACT_TARGET)
    return sum(run["samples"][:step]), reached


def exact_at_off_budget(run):
    """Final P(exact) over the steps whose cumulative samples fit in the off rows' budget."""
    budget, spent, steps = len(run["samples"]) * NUM_PROMPTS * GROUP_SIZE, 0, 0
    for samples in run["samples"]:
        spent += samples
        if spent > budget:
            break
        steps += 1
    return final({"exact": run["exact"][:steps]}, "exact")


def group_shares(run):
    """Shares of the groups drawn over the run: kept, dropped for no_signal, dropped for estimator."""
    reasons = [reason for step in run["reasons"] for reason in step]
    return [sum(r == key for r in reasons) / len(reasons) for key in (None, "no_signal", "estimator")]


def ds_summary(runs):
    to_exact = [samples_to_exact(run) for run in runs]
    shares = [group_shares(run) for run in runs]
    return summarise(runs) | {
        "samples_total": mean_std([sum(run["samples"]) for run in runs]),
        "samples_to_exact": mean_std([samples for samples, _ in to_exact]),
        "exact_at_off_budget": mean_std([exact_at_off_budget(run) for run in runs]),
        "pass_rate": statistics.fmean(s[0] for s in shares),
        "dropped_no_signal": statistics.fmean(s[1] for s in shares),
        "dropped_estimator": statistics.fmean(s[2] for s in shares),
        "skipped_steps": statistics.fmean(sum(all(r is not None for r in step) for step in run["reasons"])
                                          for run in runs),
    }


def paired_vs_off(row, off):
    """Seeds with higher final P(exact), higher P@budget and fewer samples to P(exact) >= 0.5 than the off row."""
    exact = sum(final(a, "exact") > final(b, "exact") for a, b in zip(row["runs"], off["runs"]))
    budget = sum(exact_at_off_budget(a) > final(b, "exact") for a, b in zip(row["runs"], off["runs"]))
    fewer = 0
    for a, b in zip(row["runs"], off["runs"]):
        (sa, ra), (sb, _) = samples_to_exact(a), samples_to_exact(b)
        fewer += ra and sa < sb  # an off seed that never got there counts as its total (a lower bound)
    return exact, budget, fewer


def samples_text(samples, seeds, reached):
    return f"{'>=' if reached < seeds else ''}{samples / 1000:.1f}k"


def format_rows(rows):
    header = (f"{'K':>2} {'c':>4} {'variant':<30} {'P(exact)':>12} {'P@budget':>8} {'reached':>7} {'samples@0.5':>11} "
              f"{'samples':>8} {'pass':>5} {'no_sig':>6} {'est':>5} {'skip':>5} {'vs off':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        s, seeds = row["summary"], row["summary"]["seeds"]
        off = next(r for r in rows if r["variant"] == row["variant"] and r["mode"] == "off"
                   and r["num_rewards"] == row["num_rewards"] and r["conflict"] == row["conflict"])
        versus = "" if row is off else "{}/{}/{}".format(*paired_vs_off(row, off))
        lines.append(
            f"{row['num_rewards']:>2} {row['conflict']:>4} {row['name']:<30} "
            f"{s['final_exact'][0]:>6.3f}±{s['final_exact'][1]:.3f} {s['exact_at_off_budget'][0]:>8.3f} "
            f"{s['exact_reached']:>3}/{seeds:<3} "
            f"{samples_text(s['samples_to_exact'][0], seeds, s['exact_reached']):>11} "
            f"{s['samples_total'][0] / 1000:>7.1f}k {s['pass_rate']:>5.2f} {s['dropped_no_signal']:>6.2f} "
            f"{s['dropped_estimator']:>5.2f} {s['skipped_steps']:>5.1f} {versus:>8}")
    return "\n".join(line.rstrip() for line in lines)


def run_rows(settings, seeds, steps, args):
    rows = []
    for num_rewards, conflict in settings:
        for variant in VARIANTS:
            for mode in MODES:
                runs = [train(variant, num_rewards, seed, steps, conflict, args.lr, args.optimizer, dynamic=mode)
                        for seed in range(seeds)]
                rows.append({"num_rewards": num_rewards, "conflict": conflict, "name": f"{variant[0]} ds={mode}",
                             "variant": variant[0], "mode": mode, "runs": runs, "summary": ds_summary(runs)})
        print(f"K={num_rewards} c={conflict} done", file=sys.stderr)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps, c in {0, 1}: smoke test")
    parser.add_argument("--part", choices=("table", "map", "all"), default="all")
    parser.add_argument("--out", default="benchmarks/dynamic_sampling_efficiency.json")
    parser.add_argument("--seeds", type=int, default=10, help="seeds of the table part")
    parser.add_argument("--map-seeds", type=int, default=6, help="seeds of the map part")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    args = parser.parse_args()
    seeds, map_seeds, steps = (1, 1, 30) if args.quick else (args.seeds, args.map_seeds, args.steps)
    levels = (0.0, 1.0) if args.quick else CONFLICT_LEVELS
    torch.set_num_threads(1)
    print(f"{steps} steps, {NUM_PROMPTS} groups kept per step, refill cap {MAX_EXTRA_PROMPTS} extra prompts, "
          f"{'Adam' if args.optimizer == 'adam' else 'SGD'} lr {args.lr}")
    parts = {}
    for part, settings, n in (("table", [(2, 1.0), (3, 1.0)], seeds), ("map", [(2, c) for c in levels], map_seeds)):
        if args.part not in (part, "all"):
            continue
        start = time.perf_counter()
        rows = run_rows(settings, n, steps, args)
        elapsed = time.perf_counter() - start
        title = ("original task (c = 1), K = 2 and 3" if part == "table"
                 else "conflict map, K = 2 (c = share of prompts with brevity)")
        print(f"\ndynamic sampling, {title}, {n} seed(s); samples@0.5 censored (>=)")
        print(format_rows(rows))
        print(f"elapsed {elapsed:.1f}s")
        parts[part] = {"seeds": n, "elapsed_s": round(elapsed, 1),
                       "rows": [{k: v for k, v in row.items() if k != "runs"} for row in rows]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {"steps": steps, "max_extra_prompts": MAX_EXTRA_PROMPTS,
                                          "optimizer": args.optimizer, "learning_rate": args.lr,
                                          "exact_target": EXACT_TARGET}} | parts, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
