"""The API-Bank evaluation: the GD²PO authors' scoring rule (tool-calling/API_Bank/generate_deterministic.py
and evaluate_reward.py) on hand-made outputs, and eval_api_bank.py end to end on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reward_servers.toolcall import parse_tool_calls as strict_parse
from reward_servers.toolcall import tool_call_block
from tiny_models import build_tiny_chat_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "examples" / "scripts"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"needs {SHARED_DATA}")

sys.path.insert(0, str(SCRIPTS))
import api_bank_scoring as scoring  # noqa: E402
import eval_api_bank  # noqa: E402

ANSWER = [{"name": "QueryMeeting", "parameters": {"user_name": "John", "date": "2023-03-26"}}]
CALL = '{"name": "QueryMeeting", "parameters": {"user_name": "John", "date": "2023-03-26"}}'
THINK = "<think> The user wants John's meeting on that date. </think>\n"

# Outputs the authors' rule scores 1. The first is a clean call; on the other four the rule this
# repository used before (the toolcall server's strict parser: any bad line voids the block, every
# call needs "name" and "parameters") scored 0.
PROBES = {
    "clean call": f"{THINK}<tool_call>\n{CALL}\n</tool_call>",
    "prose line in the block": f"{THINK}<tool_call>\nI will call the API now:\n{CALL}\n</tool_call>",
    "blank line between calls": f'{THINK}<tool_call>\n{{"name": "GetToday", "parameters": {{}}}}\n\n{CALL}\n</tool_call>',
    "parameters-only object": f'{THINK}<tool_call>\n{{"user_name": "John", "date": "2023-03-26"}}\n</tool_call>',
    "call without parameters first": f'{THINK}<tool_call>\n{{"name": "GetToday"}}\n{CALL}\n</tool_call>',
}


def old_rule(output: str) -> int:
    """The previous eval_api_bank.py rule: strict parse of the block, then any exact call."""
    block = tool_call_block(output)
    try:
        calls = strict_parse(block) if block is not None else []
    except ValueError:
        calls = []
    reference = ANSWER[0]
    return int(any(c["name"] == reference["name"] and c["parameters"] == reference["parameters"] for c in calls))


@pytest.mark.parametrize("name", PROBES)
def test_the_authors_rule_scores_the_probe_outputs(name):
    output = PROBES[name]
    assert scoring.correctness(scoring.parse_tool_calls(output), ANSWER) == 1
    assert old_rule(output) == (1 if name == "clean call" else 0)


def test_the_authors_rule_edge_cases():
    correctness = lambda output, answer=ANSWER: scoring.correctness(scoring.parse_tool_calls(output), answer)  # noqa: E731
    assert correctness(f"<tool_call>\n{CALL.replace('John', 'john')}\n</tool_call>") == 0  # exact values
    assert correctness(f"<tool_call>\n{CALL[:-2]}, \"x\": 1}}}}\n</tool_call>") == 0  # exact parameter set
    assert correctness(CALL) == 0  # no block
    assert correctness(f"<tool_call>\n{CALL}") == 0  # no closing tag
    assert correctness(f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>") == 1  # a JSON string is decoded again
    # Their loop runs in one try: a number (TypeError) or an undecodable string ends it with 0.
    assert correctness(f"<tool_call>\n5\n{CALL}\n</tool_call>") == 0
    assert correctness(f'<tool_call>\n"not json"\n{CALL}\n</tool_call>') == 0
    # Only the first block counts; a reference list counts by its first call; a level-2 dict as is.
    assert correctness(f"<tool_call>\nnone\n</tool_call><tool_call>\n{CALL}\n</tool_call>") == 0
    assert correctness(f"<tool_call>\n{CALL}\n</tool_call>", ANSWER + [{"name": "X", "parameters": {}}]) == 1
    assert correctness(f"<tool_call>\n{CALL}\n</tool_call>", ANSWER[0]) == 1
    # A reference that is not a call leaves the row unscored (out of the accuracy's denominator).
    assert correctness(f"<tool_call>\n{CALL}\n</tool_call>", []) is None
    assert correctness(f"<tool_call>\n{CALL}\n</tool_call>", {"name": "X"}) is None


def test_format_and_length_scores():
    assert scoring.format_errors(PROBES["clean call"]) == []
    assert scoring.format_errors(f"{THINK}<response> Hi </response>") == []
    assert scoring.format_errors("  ") == ["empty_output"]
    assert scoring.format_errors(f"<tool_call>\n{CALL}\n</tool_call>") == ["missing_think"]
    assert scoring.format_errors(f"{THINK}{THINK}<response>x</response>") == ["multiple_think_blocks"]
    assert scoring.format_errors(f"<tool_call>{CALL}</tool_call>{THINK}") == ["tool_call_before_think_end"]
    assert scoring.format_errors(f"{THINK}<response>x</response><tool_call>{CALL}</tool_call>") == [
        "response_before_tool_call_end", "tool_call_after_response"]  # fmt: skip
    assert scoring.format_errors(f"{THINK}<tool_call>{CALL}") == ["unbalanced_tool_call_tags"]
    assert scoring.length_score(PROBES["clean call"]) == (0.02, 8)  # 8 words / 512, rounded to 2 places
    assert scoring.length_score("<think> " + "word " * 600 + "</think>") == (1.0, 600)
    assert scoring.length_score("no think") == (0.0, 0)


def test_summary_follows_the_authors_denominators():
    samples = [scoring.score_sample(PROBES["clean call"], ANSWER), scoring.score_sample("<response>x</response>", ANSWER),
               scoring.score_sample(PROBES["clean call"], [])]  # fmt: skip
    summary = scoring.summarize(samples)
    # Accuracy over the 2 scorable rows, format over all 3, length the mean over all 3.
    assert summary == {"total": 3, "scored": 2, "correct": 1, "accuracy": 50.0, "format": 66.67, "length": 0.0133}
    assert scoring.summarize([]) == {"total": 0, "scored": 0, "correct": 0, "accuracy": None, "format": None, "length": None}


def run_eval(*args):
    return subprocess.run([sys.executable, str(SCRIPTS / "eval_api_bank.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=REPO_ROOT)  # fmt: skip


@needs_shared_data
def test_eval_api_bank_on_a_tiny_model(tmp_path, capsys):
    model = build_tiny_chat_model(tmp_path / "tiny")
    output = tmp_path / "eval" / "api_bank.json"
    result = run_eval("--model", model, "--data-dir", SHARED_DATA / "api_bank", "--output", output, "--limit", 2,
                      "--max-new-tokens", 4, "--backend", "auto")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert report["settings"]["backend"] == "transformers"  # no GPU here
    assert report["settings"]["max_model_len"] == 4096
    assert list(report["metrics"]) == ["level1", "level2", "level3", "overall"]
    for level in ("level1", "level2", "level3"):
        assert report["metrics"][level]["total"] == 2
        assert set(report["metrics"][level]) == {"total", "scored", "correct", "accuracy", "format", "length"}
    assert report["metrics"]["overall"]["total"] == 6
    assert [(s["level"], s["index"]) for s in report["samples"]] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    level2 = json.loads((SHARED_DATA / "api_bank" / "level-2-api_processed.json").read_text())[0]
    assert report["samples"][2]["answer"] == level2["answer"]  # a dict in level 2
    for sample in report["samples"]:  # each sample scored by the authors' rule on its own output
        assert sample["correct"] == scoring.correctness(scoring.parse_tool_calls(sample["output"]), sample["answer"])
        assert sample["format"] == int(not scoring.format_errors(sample["output"]))
    header = next(line for line in result.stdout.splitlines() if "accuracy" in line).split()
    assert header == ["total", "scored", "accuracy", "format", "length"]
    assert any(line.startswith("overall") for line in result.stdout.splitlines())

    # The cases below call the script's main in this process: the subprocess above ran its imports (5 s) already.
    # A prompt that does not fit max_model_len is not generated, reported, and left out (the authors' error.json).
    eval_api_bank.main([*map(str, ("--model", model, "--data-dir", SHARED_DATA / "api_bank", "--output", output,
                                   "--limit", 1, "--levels", 2, "--max-model-len", 64, "--max-new-tokens", 4))])  # fmt: skip
    report = json.loads(output.read_text())
    assert report["metrics"]["level2"]["total"] == 0 and report["samples"] == []
    assert report["settings"]["not_generated"][0]["level"] == 2
    assert "leaves no room within max_model_len 64" in report["settings"]["not_generated"][0]["error"]
    assert "1 prompts not generated" in capsys.readouterr().err

    with pytest.raises(SystemExit, match="level-2-api_processed.json: no such file"):
        eval_api_bank.main([*map(str, ("--model", model, "--data-dir", tmp_path, "--output", output, "--levels", 2))])
