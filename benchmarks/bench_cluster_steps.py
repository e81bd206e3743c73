"""Per-step time of the real train_gd2po_ray job on the rehearsal cluster (TINY_NODES=2 TINY_GPUS=2
examples/scripts/train_tiny_cpu.sh: a GPU-less head, two nodes of 2 logical GPUs, a reward host; two vLLM
engines and the actor, not colocated). Three runs, alternated, --rounds times: DP=1 and
DP=2 (ZeRO-3 actor ranks) with gd2po_snr, and OpenRLHF's group_norm at DP=2 on the same four reward
dimensions. 8 prompts: two full steps of 4 prompts x 4 samples. Prints the trainer's own timing/* per
step (mean over the runs' steps), naming the CPU and the load. Root only (network namespaces).

    .venv/bin/python benchmarks/bench_cluster_steps.py --rounds 2
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "scripts" / "train_tiny_cpu.sh"
RUNS = {
    "DP=1 gd2po_snr": ["--actor.num_nodes", "1"],
    "DP=2 gd2po_snr": [],
    "DP=2 group_norm": ["--algo.advantage.estimator", "group_norm"],
}
TIMINGS = ["timing/generation", "timing/make_experience", "timing/ppo_train", "timing/broadcast", "timing/step_total"]


def cpu_name() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def one_run(name: str, flags: list[str], work: Path) -> dict:
    out = work / name.replace(" ", "_").replace("=", "")
    env = dict(os.environ, TINY_NODES="2", TINY_GPUS="2", TINY_PROMPTS="8")
    load = os.getloadavg()[0]
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), str(out), *flags], env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise SystemExit(f"{name}: the job failed:\n{(result.stdout + result.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "wall": time.monotonic() - started, "load": (load, os.getloadavg()[0])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as work:
        for round_ in range(args.rounds):
            for name, flags in RUNS.items():  # alternated, so a change of load falls on all three
                results[name].append(one_run(name, flags, Path(work) / f"r{round_}"))
                print(f"round {round_ + 1}: {name} done ({results[name][-1]['wall']:.0f} s)", flush=True)
    print(f"\n{cpu_name()}; {args.rounds} round(s) of the three runs, alternated; 2 steps per run")
    print("| run | " + " | ".join(t.removeprefix("timing/") for t in TIMINGS) + " | whole run (s) | load avg (1 min) at start–end | policy_loss |")
    print("|---" * (len(TIMINGS) + 4) + "|")
    for name, runs in results.items():
        steps = [row for run in runs for row in run["rows"]]
        cells = [f"{statistics.mean(row[t] for row in steps):.1f}" if all(t in row for row in steps) else "–" for t in TIMINGS]
        loads = ", ".join(f"{a:.1f}–{b:.1f}" for a, b in (run["load"] for run in runs))
        walls = ", ".join(f"{run['wall']:.0f}" for run in runs)
        losses = ", ".join(f"{row['policy_loss']:.3g}" for row in steps)
        print(f"| {name} | " + " | ".join(cells) + f" | {walls} | {loads} | {losses} |")


if __name__ == "__main__":
    main()
