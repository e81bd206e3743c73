"""Smoke tests: each benchmark script runs in its quick mode and prints its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_advantages_quick():
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_advantages.py", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "speed-up" in completed.stdout
    assert "gd2po_snr    1024" in completed.stdout


def test_learning_efficiency_quick(tmp_path):
    out = tmp_path / "le.png"
    completed = subprocess.run(
        [sys.executable, "benchmarks/learning_efficiency.py", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
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
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_reward_stage.py", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    for row in ("(a) slowest server alone", "client: fetch_rewards, 3 servers", "(b) OpenRLHF pattern, 3 servers"):
        assert row in completed.stdout
    assert "target client <= 1.2x (a)" in completed.stdout
    assert "target (b) >= 10x client" in completed.stdout


def test_bench_streaming_rewards_quick():
    completed = subprocess.run([sys.executable, "benchmarks/bench_streaming_rewards.py", "--quick"],
                               cwd=ROOT, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    for row in ("after: generate all, then fetch_rewards", "stream: score each group as it finishes"):
        assert row in completed.stdout
    assert "target stream adds <= 10% to generation" in completed.stdout


def test_bench_replicas_quick():
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_replicas.py", "--quick", "--samples", "128"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    rows = [line.split()[:2] for line in completed.stdout.splitlines() if line.startswith(("   cpu", " sleep"))]
    assert rows == [["cpu", "1"], ["cpu", "2"], ["sleep", "1"], ["sleep", "2"]]
    assert "control, no servers" in completed.stdout
