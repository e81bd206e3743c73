"""`gd2po-cpu-demo` end to end on CPU with a tiny local model: real reward servers, DeepSpeed ZeRO-3."""

import json
import math
import subprocess
import sys

import pytest
import torch
from tiny_models import build_tiny_chat_model

from openrlhf_gd2po.cli.cpu_demo import main, policy_batch
from openrlhf_gd2po.cli.generation import fast_bf16


def test_demo_trains_with_deepspeed_zero3_and_logs_every_step(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_chat_model(tmp_path / "tiny")
    # Its own process: the demo initialises torch.distributed. PYTHONPATH (set by conftest) carries
    # the flash_attn stand-in that OpenRLHF's model classes import.
    result = subprocess.run(
        [sys.executable, "-m", "openrlhf_gd2po.cli.cpu_demo", "--model", str(model), "--steps", "2",
         "--prompts-per-step", "2", "--n-samples", "3", "--max-new-tokens", "12", "--target-chars", "6",
         "--lr", "1e-2", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # bf16 only where the CPU multiplies it natively: elsewhere one bf16 update of SmolLM2 took over 8 min.
    assert f"DeepSpeed ZeRO-3 in {'bfloat16' if fast_bf16() else 'float32'}" in result.stdout
    # A clean terminal: no dependency warnings or bars (pynvml, torch.distributed, DeepSpeed, transformers).
    for noise in ("Warning", "Setting accelerator to CPU", "Loading weights", "torch_dtype", "generating", "[MoE]",
                  "built successfully"):
        assert noise not in result.stdout + result.stderr, noise
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert all(math.isfinite(value) for value in row.values())
        # Random bytes: never a correct or boxed answer; their lengths vary, so `length` drives the update.
        assert row["reward/correctness"] == 0 and row["reward/format"] == 0
        assert -1 <= row["reward/length"] <= 1
        assert row["reward"] == pytest.approx(row["reward/length"])
        assert 0 <= row["gd2po/keep_ratio"] <= 1 and 0 <= row["gd2po/conflict_ratio"] <= 1
        assert 1 <= row["response_length"] <= 12
        assert row["grad_norm"] > 0
        # Only `length` varies, so nothing conflicts: every estimator keeps all rollouts and the same |Σ_k A_k|.
        assert row["gd2po/mean_abs_summed_advantage"] == pytest.approx(row["gdpo/mean_abs_summed_advantage"])


def test_policy_batch_puts_response_tokens_under_the_action_mask():
    rollouts = [
        {"prompt_ids": [1, 2, 3], "response_ids": [7, 8]},
        {"prompt_ids": [4], "response_ids": [9, 9, 9]},
    ]
    sequences, attention_mask, action_mask = policy_batch(rollouts, pad_id=0)
    assert sequences.tolist() == [[1, 2, 3, 7, 8, 0], [0, 0, 4, 9, 9, 9]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert action_mask.tolist() == [[True, True, False], [True, True, True]]
    # The Actor's log-probs cover the last action_mask.shape[1] positions of sequences[:, 1:].
    targets = sequences[:, 1:][:, -action_mask.shape[1]:]
    assert targets[action_mask].tolist() == [7, 8, 9, 9, 9]
    assert torch.equal(attention_mask[:, 1:][:, -action_mask.shape[1]:].bool() & action_mask, action_mask)


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "absent")])
    assert f"--model {tmp_path / 'absent'}: not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--snr-threshold", "1.5"])
    assert "--snr-threshold must be in [0, 1], got 1.5" in capsys.readouterr().err
