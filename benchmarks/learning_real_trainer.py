"""Learning on the real trainer: `train_gd2po_ray` (CPU mode, examples/scripts/train_smollm2_cpu.sh) on
SmolLM2-135M-Instruct, the same prompts and dimensions (correctness, format, length) for every run, one run per
estimator and seed. Prints a table (per estimator: each dimension's mean reward over the first and the last
quarter of the steps, mean over seeds; the keep and conflict ratios; the authors' metrics) naming the CPU, and
writes learning_real_trainer.json and learning_real_trainer.png (per-dimension reward curves, mean over seeds).

  python benchmarks/learning_real_trainer.py --steps 20 --seeds 0 1 --out /tmp/lrt   # about 12 min a run on 2 cores

A finished run (its metrics.jsonl has every step) is read, not run again: the benchmark can be run in pieces.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cluster_steps import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "scripts" / "train_smollm2_cpu.sh"
DIMENSIONS = ["correctness", "format", "length"]
# the authors' metrics (openrlhf_gd2po/advantages.py _authors_metrics) and ours, as the trainer logs them
FILTER_METRICS = ["gd2po/keep_ratio", "gd2po/conflict_ratio", "gd2po/true_conflict_share",
                  "gd2po/consensus_in_conflict_abs_mean", "gd2po/mean_abs_summed_advantage"]  # fmt: skip


def run(estimator: str, seed: int, steps: int, out: Path) -> list[dict]:
    metrics = out / "metrics.jsonl"
    if metrics.exists() and len(metrics.read_text().splitlines()) == steps:
        return [json.loads(line) for line in metrics.read_text().splitlines()]
    start = time.monotonic()
    env = dict(os.environ, STEPS=str(steps))
    result = subprocess.run(["bash", str(SCRIPT), str(out), "--algo.advantage.estimator", estimator, "--train.seed",
                             str(seed)], env=env, capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{estimator} seed {seed} failed:\n{result.stderr[-3000:]}")
    print(f"{estimator} seed {seed}: {time.monotonic() - start:.0f} s", flush=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def mean(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def curve(runs: list[list[dict]], name: str) -> list[float]:
    """Mean over seeds, step by step."""
    return [mean([rows[i].get(name) for rows in runs]) for i in range(min(len(rows) for rows in runs))]


def plot(results: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(DIMENSIONS), figsize=(5 * len(DIMENSIONS), 4), sharex=True)
    for axis, dimension in zip(axes, DIMENSIONS):
        for estimator, runs in results.items():
            values = curve(runs, f"reward/{dimension}")
            axis.plot(range(1, len(values) + 1), values, label=estimator)
        axis.set(title=f"reward/{dimension} (mean over seeds)", xlabel="step")
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimators", nargs="+", default=["gd2po_snr", "gd2po_hard", "gdpo", "group_norm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("learning_real_trainer"))
    args = parser.parse_args()
    results = {e: [run(e, seed, args.steps, args.out / f"{e}_seed{seed}") for seed in args.seeds] for e in args.estimators}
    quarter = max(1, args.steps // 4)
    title = (f"train_gd2po_ray on SmolLM2-135M-Instruct, {args.steps} steps x 16 rollouts, seeds {args.seeds} "
             f"({cpu_name()})")
    print(title)
    print(f"{'estimator':<12}" + "".join(f"{d + ' first/last':>24}" for d in DIMENSIONS)
          + "".join(f"{m.split('/')[1][:18]:>20}" for m in FILTER_METRICS))  # fmt: skip
    summary = {}
    for estimator, runs in results.items():
        row = {}
        for dimension in DIMENSIONS:
            values = curve(runs, f"reward/{dimension}")
            row[dimension] = (mean(values[:quarter]), mean(values[-quarter:]))
        for metric in FILTER_METRICS:
            row[metric] = mean(curve(runs, metric))
        summary[estimator] = row
        print(f"{estimator:<12}" + "".join(f"{row[d][0]:>11.3f} -> {row[d][1]:<9.3f}" for d in DIMENSIONS)
              + "".join(f"{row[m]:>20.3f}" for m in FILTER_METRICS))  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_real_trainer.json").write_text(json.dumps({"title": title, "summary": summary,
                                                                      "runs": results}, indent=1))  # fmt: skip
    plot(results, args.out / "learning_real_trainer.png", title)
    print(f"wrote {args.out / 'learning_real_trainer.json'} and {args.out / 'learning_real_trainer.png'}")


if __name__ == "__main__":
    main()
