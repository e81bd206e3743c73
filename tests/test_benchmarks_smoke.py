"""Smoke tests: each benchmark script runs in its quick mode and prints its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(script, *args, timeout=120):
    """`python benchmarks/SCRIPT ARGS...` from the repository root; it must exit 0 (stderr shown if not)."""
    completed = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True,
                               text=True, timeout=timeout)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return completed


def test_bench_advantages_quick():
    completed = run_benchmark("bench_advantages.py", "--quick")
    assert "speed-up" in completed.stdout
    assert "gd2po_snr    1024" in completed.stdout


def test_learning_efficiency_quick(tmp_path):
    out = tmp_path / "le.png"
    completed = run_benchmark("learning_efficiency.py", "--quick", "--out", str(out))
    assert "steps to target" in completed.stdout
    for estimator in ("grpo", "gdpo", "gd2po_hard", "gd2po_snr"):
        assert estimator in completed.stdout
    assert out.stat().st_size > 0
    assert "results" in (tmp_path / "le.json").read_text()
    # The conflict-intensity map: its primary metric, the neutral ones, and the paired comparison with gdpo.
    for text in ("conflict map", "P(exact), final (PRIMARY)", "Pareto distance", "p(token)", "beats gdpo"):
        assert text in completed.stdout
    cells = json.loads((tmp_path / "le_map.json").read_text())
    assert {cell["conflict"] for cell in cells["cells"]} == {0.0, 1.0}
    assert set(cells["paired_wins_over_gdpo"]) >= {"grpo", "gd2po_hard", "gdpo floor"}
    assert (tmp_path / "le_map.png").stat().st_size > 0


def test_bench_reward_stage_quick():
    completed = run_benchmark("bench_reward_stage.py", "--quick")
    for row in ("(a) slowest server alone", "client: fetch_rewards, 3 servers", "(b) OpenRLHF pattern, 3 servers"):
        assert row in completed.stdout
    assert "target client <= 1.2x (a)" in completed.stdout
    assert "target (b) >= 10x client" in completed.stdout


def test_bench_streaming_rewards_quick():
    completed = run_benchmark("bench_streaming_rewards.py", "--quick", timeout=180)
    for row in ("after: generate all, then fetch_rewards", "stream: score each group as it finishes"):
        assert row in completed.stdout
    assert "target stream adds <= 10% to generation" in completed.stdout


def test_bench_replicas_quick():
    completed = run_benchmark("bench_replicas.py", "--quick", "--samples", "128")
    rows = [line.split()[:2] for line in completed.stdout.splitlines() if line.startswith(("   cpu", " sleep"))]
    assert rows == [["cpu", "1"], ["cpu", "2"], ["sleep", "1"], ["sleep", "2"]]
    assert "control, no servers" in completed.stdout


def test_dynamic_sampling_refill_loop():
    """draw_groups keeps refilling up to the cap (3x the prompts), and keeps the first draw when nothing is dropped."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning_efficiency as le
    import torch

    logits = torch.zeros(le.NUM_PROMPTS, le.MAX_LEN, le.EOS + 1)
    answers, lengths, brevity = le.make_task(0)

    def reward_fn(tokens, response_lengths, prompt_ids):
        return le.score(tokens, response_lengths, prompt_ids, answers, lengths, brevity, 2)

    def draw(drop_reason):
        return le.draw_groups(logits, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
                              reward_fn, drop_reason)

    (tokens, *_), drawn, reasons = draw(lambda group: None)
    assert len(tokens) == len(drawn) == le.NUM_PROMPTS * le.GROUP_SIZE and reasons == [None] * le.NUM_PROMPTS
    (tokens, *_), drawn, reasons = draw(lambda group: "no_signal")
    assert len(tokens) == 0 and len(reasons) == le.NUM_PROMPTS + le.MAX_EXTRA_PROMPTS
    assert len(drawn) == len(reasons) * le.GROUP_SIZE
    every_other = iter(range(10**6))
    (tokens, *_), drawn, reasons = draw(lambda group: None if next(every_other) % 2 else "estimator")
    assert len(tokens) == le.NUM_PROMPTS * le.GROUP_SIZE  # 16 kept after 8 + 4 + 2 + 1 + 1 replacements
    assert reasons.count(None) == le.NUM_PROMPTS and len(reasons) == 32


def test_dynamic_sampling_efficiency_quick(tmp_path):
    out = tmp_path / "ds.json"
    completed = run_benchmark("dynamic_sampling_efficiency.py", "--quick", "--out", str(out))
    for text in ("original task (c = 1)", "conflict map", "samples@0.5", "gdpo ds=no_signal",
                 "gd2po_snr(τ=0.8) ds=estimator"):
        assert text in completed.stdout
    result = json.loads(out.read_text())
    rows = {(row["num_rewards"], row["conflict"], row["name"]): row["summary"] for row in result["table"]["rows"]}
    assert len(rows) == 12 and {c for _, c, _ in rows} == {1.0}
    assert {row["conflict"] for row in result["map"]["rows"]} == {0.0, 1.0}
    # 30 steps x 128 rollouts at least; the off rows draw exactly that and keep every group.
    assert all(s["samples_total"][0] >= 30 * 128 for s in rows.values())
    assert rows[(2, 1.0, "gdpo ds=off")]["samples_total"][0] == 30 * 128
    assert rows[(2, 1.0, "gdpo ds=off")]["pass_rate"] == 1.0
    # gd2po masks whole groups early on at K=3: the estimator mode drops and refills some.
    assert rows[(3, 1.0, "gd2po_snr(τ=0.8) ds=estimator")]["dropped_estimator"] > 0
