"""`gd2po-analyze` end to end on CPU with a tiny local model: seconds, no model hub."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from servers import running_server

from openrlhf_gd2po.advantages import ESTIMATORS, compute_advantages
from openrlhf_gd2po.cli import analyze
from openrlhf_gd2po.cli.analyze import TASKS, main
from openrlhf_gd2po.cli.analyze_report import SNR_THRESHOLDS
from openrlhf_gd2po.reward_client import RewardServerError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_analyze(model, out, *extra):
    main(["--model", str(model), "--num-prompts", "3", "--n-samples", "4", "--max-new-tokens", "16",
          "--out", str(out), *extra])
    return json.loads((out / "summary.json").read_text())


def test_toolcall_task_servers_score_every_rollout(tiny_model, tmp_path, capsys, monkeypatch):
    sent, fetch_rewards = [], analyze.fetch_rewards

    def recording_fetch_rewards(dimensions, queries, prompts, labels, **kwargs):
        sent.extend(zip(queries, prompts, labels))
        return fetch_rewards(dimensions, queries, prompts, labels, **kwargs)

    monkeypatch.setattr(analyze, "fetch_rewards", recording_fetch_rewards)
    summary = run_analyze(tiny_model, tmp_path / "out", "--task", "toolcall")

    assert summary["dimensions"] == ["correctness", "format", "length"]
    assert summary["config"]["task"] == "toolcall"
    rows = [json.loads(line) for line in TASKS["toolcall"]["prompts"].read_text().splitlines()[:3]]
    assert [p["label"] for p in summary["prompts"]] == [row["label"] for row in rows]
    rollouts = summary["rollouts"]
    assert [r["prompt_index"] for r in rollouts] == [0] * 4 + [1] * 4 + [2] * 4
    assert len(sent) == len(rollouts)
    for rollout, (query, prompt, label) in zip(rollouts, sent):
        # What OpenRLHF sends: the chat-templated prompt and prompt + response with special tokens.
        assert prompt == summary["prompts"][rollout["prompt_index"]]["prompt"]
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert query == prompt + rollout["response"]
        assert label == rows[rollout["prompt_index"]]["label"]
        assert 1 <= rollout["response_length"] <= 16
        # Random bytes are never a tool call: the lowest correctness, unless the label has none.
        expected_correctness = -3.0 if "<tool_call>" in label else 0.0
        assert rollout["rewards"] == {"correctness": expected_correctness, "format": 0.0, "length": 0.0}
    assert "groups where it varies" in capsys.readouterr().out
    for name in ("reward_histograms.png", "keep_ratio_vs_tau.png", "correlation.png", "conflict.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_SIGNATURE)


def test_default_task_is_arithmetic_scored_by_math_and_length(tiny_model, tmp_path, capsys):
    summary = run_analyze(tiny_model, tmp_path / "out")

    assert summary["config"]["task"] == "math"
    # Two servers: `reward_servers math` (correctness, format) and `reward_servers length`.
    assert summary["dimensions"] == ["correctness", "format", "length"]
    servers = summary["config"]["reward_servers"]
    assert servers["correctness"].rsplit("#")[0] == servers["format"].rsplit("#")[0] != servers["length"].rsplit("#")[0]
    rows = [json.loads(line) for line in TASKS["math"]["prompts"].read_text().splitlines()]
    assert len(rows) == 80 and all(int(row["label"]) == sum(map(int, row["prompt"][8:15].split(" + "))) for row in rows)
    assert [p["label"] for p in summary["prompts"]] == [row["label"] for row in rows[:3]]
    chat = f"<|im_start|>user\n{rows[0]['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    assert summary["prompts"][0]["prompt"] == chat
    for rollout in summary["rollouts"]:  # random bytes: no right or boxed answer, a length reward
        assert rollout["rewards"]["correctness"] == rollout["rewards"]["format"] == 0.0
        assert -1.0 <= rollout["rewards"]["length"] <= 1.0
    report = capsys.readouterr().out
    assert "mean |sum_k A_k| of kept rollouts" in report
    assert (tmp_path / "out" / "conflict.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("module", ["openrlhf_gd2po.cli.analyze"])
def test_commands_start_without_dependency_warnings(module):
    # torch warns about pynvml at import; our commands filter that where they start.
    completed = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "Warning" not in completed.stderr, completed.stderr


def test_conflicting_dimensions_match_compute_advantages(tiny_model, tmp_path):
    # Responses of 6 to 18 characters: `short` falls and `long` rises with the length, so the two
    # dimensions disagree in sign whenever two samples of a prompt differ in length.
    # The user's own prompts: a string becomes one user message; labels may be null.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "Say something.", "label": None},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]},
        {"prompt": "Count to three.", "label": "1 2 3"},
    ]))
    with running_server(["length", "--target-length", "6"]) as short, \
            running_server(["length", "--target-length", "1000"]) as long:
        summary = run_analyze(
            tiny_model, tmp_path / "out", "--prompts", str(prompts), "--reward-servers", f"short={short},long={long}"
        )
    assert summary["prompts"][0] == {
        "prompt": "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n", "label": None
    }
    assert summary["prompts"][1]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert [p["label"] for p in summary["prompts"]] == [None, None, "1 2 3"]

    rollouts = summary["rollouts"]
    rewards = torch.tensor([[r["rewards"]["short"], r["rewards"]["long"]] for r in rollouts], dtype=torch.float64)
    group_ids = torch.tensor([r["prompt_index"] for r in rollouts])
    lengths = torch.tensor([r["response_length"] for r in rollouts], dtype=torch.float64)

    def metrics(estimator, **kwargs):
        return compute_advantages(rewards, group_ids, estimator, response_lengths=lengths, **kwargs).metrics

    assert summary["conflict_ratio"] > 0
    assert summary["conflict_ratio"] == pytest.approx(metrics("gdpo")["conflict_ratio"])
    assert summary["advantage_cancellation"] == pytest.approx(metrics("gdpo")["advantage_cancellation"])
    assert summary["estimators"]["gd2po_hard"]["keep_ratio"] == pytest.approx(1 - summary["conflict_ratio"])
    for estimator in ESTIMATORS:
        expected = metrics(estimator)
        assert "mean_abs_summed_advantage" in summary["estimators"][estimator]
        for key, value in summary["estimators"][estimator].items():
            assert value == pytest.approx(expected[key]), (estimator, key)
    assert [row["tau"] for row in summary["snr_sweep"]] == list(SNR_THRESHOLDS)
    for row in summary["snr_sweep"]:
        expected = metrics("gd2po_snr", snr_threshold=row["tau"])
        assert row["keep_ratio"] == pytest.approx(expected["keep_ratio"])
        assert row["group_keep_ratio_min"] == pytest.approx(expected["group_keep_ratio_min"])
    assert summary["snr_sweep"][0]["keep_ratio"] == 1.0  # tau = 0 keeps every rollout

    groups = [rewards[group_ids == index] for index in range(3)]
    for column, name in enumerate(["short", "long"]):
        stats = summary["rewards"][name]
        assert stats["mean"] == pytest.approx(rewards[:, column].mean().item())
        assert stats["std"] == pytest.approx(rewards[:, column].std(correction=0).item())
        assert stats["max"] == rewards[:, column].max().item()
        assert stats["groups_varying"] == pytest.approx(sum(len(g[:, column].unique()) > 1 for g in groups) / 3)
    assert summary["correlation"]["over_rollouts"][0][1] == pytest.approx(torch.corrcoef(rewards.T)[0, 1].item())
    within = rewards - torch.stack([g.mean(dim=0) for g in groups])[group_ids]
    assert summary["correlation"]["within_groups"][0][1] == pytest.approx(torch.corrcoef(within.T)[0, 1].item())
    assert summary["correlation"]["within_groups"][0][1] < 0
    report = {key: value for key, value in summary.items() if key not in ("config", "rollouts")}
    assert all(math.isfinite(number) for number in numbers(report))


def numbers(value):
    """Every number in a JSON value; None (an undefined correlation) is not one."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from numbers(item)
    elif isinstance(value, (int, float)):
        yield value


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "fine", "label": "x"}\n{"prompt": 5, "label": "x"}\n', "line 2: field 'prompt'"),
        ('{"prompt": [{"role": "user"}], "label": "x"}\n', "line 1: field 'prompt'"),
        ('{"prompt": "fine", "label": 3}\n', "line 1: field 'label'"),
        ("not json\n", "line 1: not a JSON object"),
        ("\n", "no prompts"),
    ],
)
def test_bad_prompts_file_names_file_line_and_field(tmp_path, capsys, content, message):
    prompts = tmp_path / "my_prompts.jsonl"
    prompts.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompts", str(prompts), "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--prompts {prompts}" in error and message in error
    assert not (tmp_path / "out").exists()


def test_missing_prompts_file_and_bad_server_spec_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--prompts", str(tmp_path / "absent.jsonl"), "--model", str(tmp_path)])
    assert f"--prompts {tmp_path / 'absent.jsonl'}: cannot read it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--reward-servers", "correctness=localhost:1"])
    assert "'correctness=localhost:1'" in capsys.readouterr().err


def test_unreachable_reward_server_raises_instead_of_scoring_zero(tiny_model, tmp_path):
    with pytest.raises(RewardServerError, match="127.0.0.1:9"):
        main(["--model", str(tiny_model), "--num-prompts", "1", "--n-samples", "2", "--max-new-tokens", "2",
              "--reward-servers", "correctness=http://127.0.0.1:9", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_sigterm_stops_the_reward_server_it_started(tiny_model, tmp_path):
    """A scheduler's SIGTERM must not leave the toolcall server running (Python skips `finally` on it by default)."""
    analyze_process = subprocess.Popen(
        [sys.executable, "-m", "openrlhf_gd2po.cli.analyze", "--model", str(tiny_model), "--num-prompts", "80",
         "--n-samples", "8", "--max-new-tokens", "512", "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # Until both of its servers (math, length) listen: they start one after the other, each waited
    # for, so SIGTERM lands with both up and the analysis starting or generating.
    deadline = time.monotonic() + 120
    while len(servers := listening_children(analyze_process.pid)) < 2:
        assert analyze_process.poll() is None and time.monotonic() < deadline, "gd2po-analyze started no reward servers"
        time.sleep(0.1)
    analyze_process.send_signal(signal.SIGTERM)
    assert analyze_process.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in servers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (tmp_path / "out").exists()


def listening_children(pid):
    """The pids of the process's children that listen on a TCP port."""
    children = []
    for child in psutil.Process(pid).children():
        try:
            if any(c.status == psutil.CONN_LISTEN for c in child.net_connections(kind="tcp")):
                children.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return children
