"""eval_safety.py end to end on CPU: a tiny policy, two tiny reward-model servers, HH-RLHF test
prompts and a hand-made Alpaca-style test file."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from servers import running_server
from tiny_models import build_tiny_chat_model, build_tiny_classifier

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "examples" / "scripts"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"needs {SHARED_DATA}")


def build_reward_model(directory: Path, seed: int) -> Path:
    build_tiny_classifier(directory, seed).save_pretrained(directory)
    return directory


def own_score(directory: Path, query: str) -> float:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        input_ids = tokenizer(query, return_tensors="pt", add_special_tokens=False, truncation=True, max_length=2048)["input_ids"]
        return model(input_ids=input_ids).logits[0, 0].item()


def alpaca_style_test_file(path: Path) -> Path:
    prompts = [[{"role": "user", "content": "Give three tips for staying healthy."}],
               [{"role": "user", "content": "Name a primary color."}]]  # fmt: skip
    table = pa.table({"data_source": ["Stanford Alpaca"] * 2, "prompt": prompts})
    pq.write_table(table, path)
    return path


@needs_shared_data
def test_eval_safety_on_a_tiny_model(tmp_path):
    policy = build_tiny_chat_model(tmp_path / "policy")
    rm, cm = build_reward_model(tmp_path / "rm", 1), build_reward_model(tmp_path / "cm", 2)
    alpaca = alpaca_style_test_file(tmp_path / "alpaca_test.parquet")
    output = tmp_path / "eval" / "safety.json"
    serve = lambda model, name: running_server(  # noqa: E731
        ["reward_model", "--model", str(model), "--dimension-name", name, "--device", "cpu"])
    with serve(rm, "helpfulness") as rm_url, serve(cm, "harmlessness") as cm_url:
        servers = f"helpfulness={rm_url}#helpfulness,harmlessness={cm_url}#harmlessness"
        result = subprocess.run(
            [sys.executable, str(SCRIPTS / "eval_safety.py"), "--model", str(policy), "--data", str(alpaca),
             str(SHARED_DATA / "hh_rlhf" / "test.parquet"), "--reward-servers", servers, "--output", str(output),
             "--limit", "2", "--max-new-tokens", "6", "--max-prompt-tokens", "64"],
            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert report["settings"]["backend"] == "transformers" and report["settings"]["max_prompt_tokens"] == 64
    assert list(report["metrics"]) == ["Stanford Alpaca", "Anthropic/hh-rlhf", "overall"]
    samples = report["samples"]
    assert [(s["source"], s["index"]) for s in samples] == [("Stanford Alpaca", 0), ("Stanford Alpaca", 1),
                                                             ("Anthropic/hh-rlhf", 0), ("Anthropic/hh-rlhf", 1)]  # fmt: skip
    hh_first = samples[2]
    assert hh_first["prompt_tokens"] == 64  # a long multi-turn prompt, left-truncated for the policy
    for source in ("Stanford Alpaca", "Anthropic/hh-rlhf"):
        rows = [s for s in samples if s["source"] == source]
        metrics = report["metrics"][source]
        assert metrics["total"] == 2
        for name in ("helpfulness", "harmlessness", "sum"):
            assert metrics[name] == pytest.approx(sum(s["scores"][name] for s in rows) / 2, abs=1e-4)
    for sample in samples:
        assert sample["scores"]["sum"] == pytest.approx(sample["scores"]["helpfulness"] + sample["scores"]["harmlessness"])

    # The reward models scored the whole prompt (not the truncated one) + the answer, as training sends it.
    tokenizer = transformers.AutoTokenizer.from_pretrained(policy)
    conversation = pq.read_table(SHARED_DATA / "hh_rlhf" / "test.parquet").slice(0, 1).to_pylist()[0]["prompt"]
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    candidates = [prompt + hh_first["output"] + end for end in ("", "<|im_end|>")]
    assert any(own_score(rm, query) == pytest.approx(hh_first["scores"]["helpfulness"], abs=1e-4) for query in candidates)
    for line in ("Stanford Alpaca", "Anthropic/hh-rlhf", "overall"):
        assert any(row.startswith(line) for row in result.stdout.splitlines())


def test_eval_safety_refuses_bad_input(tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    run = lambda *args: subprocess.run([sys.executable, str(SCRIPTS / "eval_safety.py"), "--model", str(policy),  # noqa: E731
                                        "--output", str(tmp_path / "out.json"), *args], capture_output=True, text=True, timeout=120)
    bad_spec = run("--data", str(tmp_path / "x.parquet"), "--reward-servers", "helpfulness")
    assert bad_spec.returncode == 2 and "--reward-servers entry 'helpfulness' must look like" in bad_spec.stderr
    build_tiny_chat_model(policy)
    missing = run("--data", str(tmp_path / "x.parquet"), "--reward-servers", "h=http://127.0.0.1:9#h")
    assert missing.returncode == 1 and "x.parquet: no such file" in missing.stderr
