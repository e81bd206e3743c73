"""Reward servers started for real (`python -m reward_servers ...`) and queried over HTTP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from servers import running_server

from openrlhf_gd2po.reward_client import RewardServerError, fetch_rewards
from openrlhf_gd2po.reward_spec import parse_reward_servers
from reward_servers.__main__ import build_parser, parse_args
from reward_servers.api_key import API_KEY_ENV, API_KEY_FILE_ENV, check_exposure
from reward_servers.app import create_app

ROWS_FILE = Path(__file__).parent / "data" / "toolrl_rlla_4k_test_rows.json"
ROWS = {row["row"]: row for row in json.loads(ROWS_FILE.read_text())}
API_KEY = "test-key-123"


def chatml_prompt(messages: list[dict]) -> str:
    turns = "".join(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n" for message in messages)
    return turns + "<|im_start|>assistant\n"


def sample(row: int, response: str) -> tuple[str, str, str]:
    """(query, prompt, label) for a response to RLLA test row `row`, as OpenRLHF would send it."""
    prompt = chatml_prompt(ROWS[row]["prompt"])
    return prompt + response + "<|im_end|>", prompt, ROWS[row]["ground_truth"]


def batch(*samples: tuple[str, str, str | None]) -> dict:
    queries, prompts, labels = zip(*samples)
    return {"query": list(queries), "prompts": list(prompts), "labels": list(labels)}


def post(url: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/get_reward", json=body, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def length_url():
    # Target 20 characters; a 10 KiB body limit; an API key.
    with running_server(["length", "--target-length", "20", "--max-body-mb", str(10 / 1024)], api_key=API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def math_url():
    with running_server(["math"]) as url:
        yield url


# 11 words: length round(11/512, 2) = 0.02.
THINK = "<think> The user wants the latest Azure news, so I call GetNews. </think>"


def test_toolcall_scores_rlla_rows(toolcall_url):
    password_calls = (
        '{"name": "generate_password", "parameters": {"length": 10}}\n'
        '{"name": "is_valid_parentheses", "parameters": {"s": "([)]"}}\n'
        '{"name": "is_valid_parentheses", "parameters": {"s": "([{}])"}}'
    )
    good = sample(0, ROWS[0]["ground_truth"])
    wrong_page = sample(0, THINK + '\n<tool_call>\n{"name": "GetNews", "parameters": {"page": "2"}}\n</tool_call>')
    partial = sample(5, "<think>" + " step" * 256 + " </think>\n<tool_call>\n" + password_calls + "\n</tool_call>")
    direct_answer = sample(1, THINK + "\n<response> Please give me the text to analyse. </response>")
    no_tool_call = sample(0, "Azure news: nothing new today.")
    # A prompt that does not prefix the query: the response is found after the last assistant marker.
    query, _, label = sample(0, ROWS[0]["ground_truth"])
    other_prompt = (query, "Hey, fetch Azure news", label)

    answer = post(toolcall_url, batch(good, wrong_page, partial, direct_answer, no_tool_call, other_prompt))

    assert answer.status_code == 200, answer.text
    scores = answer.json()
    expected = {
        # exact: 3; page "2": names 1 + (names 1 + values 0) = 2 of 3 points -> 6*2/3 - 3 = 1;
        # see test_toolcall_reward.py for 6.5 of 8 points -> 1.875; the truth calls no tool -> 0;
        # no <tool_call> -> -3.
        "correctness": [3.0, 1.0, 1.875, 0.0, -3.0, 3.0],
        "format": [1.0, 1.0, 1.0, 1.0, 0.0, 1.0],
        # thinking words / 512 rounded to 0.01: 15, 11, 256, 11, none, 15.
        "length": [0.03, 0.02, 0.5, 0.02, 0.0, 0.03],
    }
    assert list(scores["extra_logs"]) == ["correctness", "format", "length"]
    for name, values in expected.items():
        assert scores["extra_logs"][name] == pytest.approx(values)
    assert scores["rewards"] == scores["scores"] == scores["extra_logs"]["correctness"]


def test_toolcall_correctness_max_option():
    with running_server(["toolcall", "--correctness-max", "1"]) as url:
        wrong_page = sample(0, THINK + '\n<tool_call>\n{"name": "GetNews", "parameters": {"page": "2"}}\n</tool_call>')
        answer = post(url, batch(wrong_page, sample(0, "no call")))
    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == pytest.approx([2 * 2 / 3 - 1, -1.0])


def test_info_health_and_openapi(toolcall_url):
    assert httpx.get(f"{toolcall_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{toolcall_url}/info").json() == {
        "task": "toolcall",
        "dimensions": ["correctness", "format", "length"],
        "primary": "correctness",
    }
    openapi = httpx.get(f"{toolcall_url}/openapi.json").json()
    get_reward = openapi["paths"]["/get_reward"]["post"]
    request_schema = get_reward["requestBody"]["content"]["application/json"]["schema"]
    assert set(request_schema["required"]) == {"query", "prompts", "labels"}
    response_schema = get_reward["responses"]["200"]["content"]["application/json"]["schema"]
    assert response_schema["$ref"].endswith("/RewardResponse")
    assert httpx.get(f"{toolcall_url}/docs").status_code == 200


@pytest.mark.parametrize(
    "body, status, named",
    [
        ({"query": "one string", "prompts": ["p"], "labels": ["l"]}, 422, "query: "),
        ({"query": ["q", 5], "prompts": ["p", "p"], "labels": ["l", "l"]}, 422, "query[1]"),
        ({"query": ["q"], "prompts": ["p"]}, 422, "labels: Field required"),
        ({"query": ["q", "q"], "prompts": ["p"], "labels": ["l", "l"]}, 422, "got 2, 1 and 2 entries"),
        ({"query": ["q"], "prompts": [None], "labels": ["l"]}, 422, "prompts[0]"),
        (["q"], 422, "body: "),
        # Well-formed, but unusable for this task: a missing label, a ground truth that is not ToolRL's.
        (batch(sample(0, "x"), (sample(0, "x")[0], sample(0, "x")[1], None)), 422, "labels[1]: is null"),
        (batch((*sample(0, "x")[:2], "<think> t </think>\n<tool_call>\nGetNews()\n</tool_call>")), 422, "labels[0]: "),
        (batch(("no markers here", "a different prompt", "label")), 422, "query[0]: "),
    ],
)
def test_malformed_requests_are_rejected_naming_the_field(toolcall_url, body, status, named):
    answer = post(toolcall_url, body)
    assert answer.status_code == status, answer.text
    assert named in answer.json()["detail"]
    # The server keeps serving.
    assert post(toolcall_url, batch(sample(0, "x"))).json()["rewards"] == [-3.0]


def test_invalid_json_is_rejected(toolcall_url):
    headers = {"content-type": "application/json"}
    answer = httpx.post(f"{toolcall_url}/get_reward", content=b'{"query": [', headers=headers)
    assert answer.status_code == 422
    assert "Invalid JSON" in answer.json()["detail"]


def test_length_server_with_api_key_and_body_limit(length_url):
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    responses = ["x" * 20, "x" * 10, "", "x" * 30, "x" * 70]
    queries = [prompt + response + "<|im_end|>" for response in responses]
    body = {"query": queries, "prompts": [prompt] * 5, "labels": [None] * 5}
    auth = {"Authorization": f"Bearer {API_KEY}"}

    assert httpx.get(f"{length_url}/health").status_code == 200  # open without the key
    assert httpx.get(f"{length_url}/info").status_code == 401
    assert post(length_url, body).status_code == 401
    assert post(length_url, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    info = httpx.get(f"{length_url}/info", headers=auth).json()
    assert info == {"task": "length", "dimensions": ["length"], "primary": "length"}

    answer = post(length_url, body, headers=auth)
    assert answer.status_code == 200, answer.text
    # 1 - |length - 20| / 20, clipped to [-1, 1]: 70 characters give -1.5 -> -1.
    assert answer.json()["extra_logs"] == {"length": [1.0, 0.5, 0.0, 0.5, -1.0]}

    too_large = {"query": ["x" * 11_000], "prompts": [""], "labels": [None]}
    answer = post(length_url, too_large, headers=auth)
    assert answer.status_code == 413
    assert "--max-body-mb" in answer.json()["detail"]
    assert post(length_url, body, headers=auth).status_code == 200


def test_the_api_key_comes_from_the_key_file_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args(build_parser(), ["length", "--port", "1", "--target-length", "5"]).api_key == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    monkeypatch.setenv(API_KEY_FILE_ENV, str(tmp_path / "key"))
    assert parse_args(build_parser(), ["math", "--port", "1"]).api_key == "from-file"  # the file wins
    monkeypatch.delenv(API_KEY_ENV)
    monkeypatch.delenv(API_KEY_FILE_ENV)
    assert parse_args(build_parser(), ["math", "--port", "1"]).api_key is None


def test_the_client_sends_the_key_from_the_key_file(length_url, tmp_path, monkeypatch):
    """The server reads its key from a file (length_url); so does the trainer's client, and it says which
    variable and path when that file is missing or empty."""
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    dimension = parse_reward_servers(f"length={length_url}")
    key_file = tmp_path / "key"
    key_file.write_text(f"{API_KEY}\n")
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setenv(API_KEY_FILE_ENV, str(key_file))
    assert fetch_rewards(dimension, [prompt + "x" * 20], [prompt], [None]).rewards.tolist() == [[1.0]]
    key_file.write_text(" \n")
    with pytest.raises(RewardServerError, match=f"GD2PO_REWARD_API_KEY_FILE={key_file}: the key file is empty"):
        fetch_rewards(dimension, [prompt], [prompt], [None])
    key_file.unlink()
    with pytest.raises(RewardServerError, match=f"GD2PO_REWARD_API_KEY_FILE={key_file}: cannot read the key file"):
        fetch_rewards(dimension, [prompt], [prompt], [None])


def test_math_server(math_url):
    prompt = "<|im_start|>user\nWhat is 1/2 as a decimal?<|im_end|>\n<|im_start|>assistant\n"
    answers = [
        ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5"),  # equal values: correct, boxed
        ("The answer is 0.5.", "\\frac{1}{2}"),  # correct, not boxed
        ("It is \\boxed{3}.", "4"),  # wrong, boxed
        ("\\boxed{}", "1"),  # nothing boxed: wrong, bad format
    ]
    queries = [prompt + text + "<|im_end|>" for text, _ in answers]
    body = {"query": queries, "prompts": [prompt] * 4, "labels": [label for _, label in answers]}
    answer = post(math_url, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["extra_logs"] == {"correctness": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    assert httpx.get(f"{math_url}/info").json()["dimensions"] == ["correctness", "format"]

    answer = post(math_url, {**body, "labels": ["0.5", None, "4", "1"]})
    assert answer.status_code == 422
    assert "labels[1]" in answer.json()["detail"]


def build_tiny_reward_model(directory: Path) -> None:
    from tiny_models import build_tiny_classifier

    build_tiny_classifier(directory).save_pretrained(directory)


def own_logits(directory: Path, queries: list[str]) -> list[float]:
    """The model's logit for each query, one unpadded forward each."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    logits = []
    with torch.no_grad():
        for query in queries:
            input_ids = tokenizer(query, return_tensors="pt", add_special_tokens=False)["input_ids"]
            logits.append(model(input_ids=input_ids).logits[0, 0].item())
    return logits


def test_reward_model_server_serves_the_models_logits(tmp_path):
    build_tiny_reward_model(tmp_path)
    prompt = "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    responses = ["Yes.", "Mostly, on a clear day; it is Rayleigh scattering.", "No idea", "Blue, yes — ça va."]
    queries = [prompt + response + "<|im_end|>" for response in responses]
    body = {"query": queries, "prompts": [prompt] * 4, "labels": [None] * 4}
    expected = own_logits(tmp_path, queries)
    assert len(set(round(value, 4) for value in expected)) == 4  # the check below can tell queries apart

    # Batches of 3 then 1, padded to different lengths: padding must not change any reward.
    model_args = ["reward_model", "--model", str(tmp_path), "--device", "cpu", "--max-batch-size", "3"]
    with running_server(model_args + ["--dimension-name", "helpfulness"]) as url:
        answer = post(url, body)
        info = httpx.get(f"{url}/info").json()
    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == pytest.approx(expected, abs=1e-5)
    assert answer.json()["extra_logs"] == {"helpfulness": answer.json()["rewards"]}
    assert info == {"task": "reward_model", "dimensions": ["helpfulness"], "primary": "helpfulness"}

    with running_server(model_args + ["--negate"]) as url:
        answer = post(url, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["extra_logs"]["reward"] == pytest.approx([-value for value in expected], abs=1e-5)


def test_a_failing_scorer_is_a_500_naming_the_sample_not_a_zero():
    from reward_servers.scoring import score_each

    def divide(queries, prompts, labels):
        return score_each(["ratio"], lambda query: (1 / len(query),), queries)

    client = TestClient(create_app("divide", ["ratio"], divide))
    answer = client.post("/get_reward", json={"query": ["ab", "", "c"], "prompts": ["", "", ""], "labels": [None] * 3})
    assert answer.status_code == 500
    assert answer.json()["detail"] == "scoring sample 1 failed: ZeroDivisionError: division by zero"

    def not_a_number(queries, prompts, labels):
        return {"ratio": [0.5, math.nan]}

    client = TestClient(create_app("nan", ["ratio"], not_a_number))
    answer = client.post("/get_reward", json={"query": ["a", "b"], "prompts": ["", ""], "labels": [None, None]})
    assert answer.status_code == 500
    assert "sample 1" in answer.json()["detail"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {API_KEY_FILE_ENV: "/nonexistent/key"}, "$GD2PO_REWARD_API_KEY_FILE=/nonexistent/key: cannot read the key file"),
        ([], {API_KEY_FILE_ENV: "/dev/null"}, "$GD2PO_REWARD_API_KEY_FILE=/dev/null: the key file is empty"),
        ([], {API_KEY_ENV: ""}, "$GD2PO_REWARD_API_KEY is set but empty"),
        (["--host", "0.0.0.0"], {}, "--allow-unauthenticated"),
        (["--host", "rm-node.cluster"], {}, "--allow-unauthenticated"),
    ],
)
def test_the_server_refuses_to_start_open_by_mistake(args, env, message):
    server_env = {name: value for name, value in os.environ.items() if name not in (API_KEY_ENV, API_KEY_FILE_ENV)} | env
    command = [sys.executable, "-m", "reward_servers", "length", "--target-length", "5", "--port", "1", *args]
    result = subprocess.run(command, env=server_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_an_exposed_host_may_serve_with_a_key_or_when_told(monkeypatch):
    parser = build_parser()
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)
    for args, key in (
        (["--host", "0.0.0.0"], "k"),
        (["--host", "0.0.0.0", "--allow-unauthenticated"], None),
        (["--host", "::1"], None),
    ):
        monkeypatch.delenv(API_KEY_ENV, raising=False)
        if key:
            monkeypatch.setenv(API_KEY_ENV, key)
        parsed = parse_args(parser, ["math", "--port", "1", *args])
        check_exposure(parser, parsed, parsed.host, "--host")  # no SystemExit


def test_docs_need_the_key_when_one_is_set(length_url):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for path in ["/docs", "/redoc", "/openapi.json"]:
        assert httpx.get(f"{length_url}{path}").status_code == 401, path
        assert httpx.get(f"{length_url}{path}", headers=auth).status_code == 200, path
    assert "/get_reward" in httpx.get(f"{length_url}/openapi.json", headers=auth).json()["paths"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_only_json_bodies_are_accepted(toolcall_url, content_type):
    body = json.dumps(batch(sample(0, "x"))).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    answer = httpx.post(f"{toolcall_url}/get_reward", content=body, headers=headers, timeout=60)
    assert answer.status_code == 415, answer.text
    assert "application/json" in answer.json()["detail"]
    json_header = {"content-type": "application/json; charset=utf-8"}
    assert httpx.post(f"{toolcall_url}/get_reward", content=body, headers=json_header, timeout=60).status_code == 200


@pytest.mark.parametrize("bad_label", ["\\frac{", "???", "\\boxed{}"])
def test_an_unparsable_math_label_is_a_422_naming_it(math_url, bad_label):
    prompt = "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    body = {"query": [prompt + "\\boxed{2}<|im_end|>"] * 3, "prompts": [prompt] * 3, "labels": ["2", "2", bad_label]}
    answer = post(math_url, body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith("labels[2]: math-verify cannot parse")
    assert post(math_url, {**body, "labels": ["2"] * 3}).json()["rewards"] == [1.0, 1.0, 1.0]


REWARD_FILE = '''
import math
import os
import time

DIMENSIONS = ["chars", "vowels"]


def reward_func(queries, prompts, labels):
    if "hang" in labels:
        time.sleep(3600)
    if "crash" in labels:
        os._exit(3)
    if "raise" in labels:
        1 / 0
    responses = [query[len(prompt):] for query, prompt in zip(queries, prompts)]
    chars = [float(len(response)) for response in responses]
    vowels = [float(sum(response.count(v) for v in "aeiou")) for response in responses]
    if "nan" in labels:
        vowels[labels.index("nan")] = math.nan
    return {"rewards": chars, "scores": chars, "extra_logs": {"chars": chars, "vowels": vowels}}
'''


def test_file_server_serves_a_reward_file_and_survives_it(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    args = ["file", "--path", str(path), "--workers", "1", "--request-timeout", "3"]
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def request(labels: list[str]) -> httpx.Response:
        body = {"query": ["p" + "banana"] * len(labels), "prompts": ["p"] * len(labels), "labels": labels}
        return post(url, body, headers=auth)

    with running_server(args, api_key=API_KEY) as url:
        assert httpx.get(f"{url}/info").status_code == 401
        info = httpx.get(f"{url}/info", headers=auth).json()
        assert info == {"task": "file", "dimensions": ["chars", "vowels"], "primary": "chars"}
        good = request(["ok", "ok"])
        assert good.status_code == 200, good.text
        assert good.json()["rewards"] == good.json()["scores"] == [6.0, 6.0]
        assert good.json()["extra_logs"] == {"chars": [6.0, 6.0], "vowels": [3.0, 3.0]}

        answer = request(["ok", "raise"])
        assert answer.status_code == 500
        assert f"reward file {path}: reward_func raised ZeroDivisionError" in answer.json()["detail"]
        answer = request(["ok", "nan"])
        assert answer.status_code == 500
        assert f"reward file {path}, dimension 'vowels'" in answer.json()["detail"]
        assert "sample 1" in answer.json()["detail"]

        # A hung reward_func: 503 at the time limit, its worker replaced.
        answer = request(["hang"])
        assert answer.status_code == 503
        assert "over the 3 s limit (--request-timeout)" in answer.json()["detail"]
        assert request(["ok"]).status_code == 200
        # A reward_func that kills its process: 503, and the server goes on.
        answer = request(["crash"])
        assert answer.status_code == 503
        assert "worker process died" in answer.json()["detail"]
        assert request(["ok"]).json()["rewards"] == [6.0]


def test_file_server_without_dimensions_serves_one_named_reward(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("def reward_func(queries, prompts, labels):\n    return {'rewards': [len(q) for q in queries]}\n")
    with running_server(["file", "--path", str(path), "--workers", "1"]) as url:
        assert httpx.get(f"{url}/info").json()["dimensions"] == ["reward"]
        answer = post(url, {"query": ["abc", "de"], "prompts": ["", ""], "labels": [None, None]})
        assert answer.json()["extra_logs"] == {"reward": [3.0, 2.0]}

    (tmp_path / "broken.py").write_text("def reward_func(:\n")
    command = [sys.executable, "-m", "reward_servers", "file", "--path", str(tmp_path / "broken.py"), "--port", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "broken.py failed to import: SyntaxError" in result.stderr


def test_an_in_process_scorer_keeps_the_time_and_queue_limits():
    # The reward_model path: a scorer run in a thread of the server process.
    import time

    def slow(queries, prompts, labels):
        if labels == ["slow"]:
            time.sleep(3)
        return {"x": [1.0] * len(queries)}

    body = {"query": ["a"], "prompts": [""], "labels": ["slow"]}
    with TestClient(create_app("slow", ["x"], slow, request_timeout=0.5, max_queue=0)) as client:  # one event loop
        answer = client.post("/get_reward", json=body)
        assert answer.status_code == 503
        assert "over the 0.5 s limit (--request-timeout)" in answer.json()["detail"]
        # Its thread still runs, and counts against the queue: the next request is turned away.
        answer = client.post("/get_reward", json=body)
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "1"
        assert "--max-queue 0" in answer.json()["detail"]
        time.sleep(3)
        assert client.post("/get_reward", json={**body, "labels": ["fast"]}).json()["rewards"] == [1.0]


def test_request_log_has_one_line_per_scored_sample(tmp_path):
    log = tmp_path / "requests.jsonl"

    def score(queries, prompts, labels):
        return {"a": [float(len(q)) for q in queries], "b": [0.5] * len(queries)}

    with TestClient(create_app("two", ["a", "b"], score, request_log=str(log))) as client:
        first = {"query": ["p1x", "p1yy"], "prompts": ["p1", "p1"], "labels": ["1", None]}
        assert client.post("/get_reward", json=first).status_code == 200
        assert client.post("/get_reward", json={"query": ["p2"], "prompts": ["p2"], "labels": ["2"]}).status_code == 200
        assert client.post("/get_reward", json={"query": ["p3"], "prompts": []}).status_code == 422  # not scored: not logged
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"query": "p1x", "prompt": "p1", "label": "1", "a": 3.0, "b": 0.5},
        {"query": "p1yy", "prompt": "p1", "label": None, "a": 4.0, "b": 0.5},
        {"query": "p2", "prompt": "p2", "label": "2", "a": 2.0, "b": 0.5},
    ]
    assert build_parser().parse_args(["math", "--port", "1", "--request-log", str(log)]).request_log == str(log)


def agent_batch(prompt: str, label: str, environment: str, *rollouts: list[str]) -> dict:
    """An agent request as the trainer sends it: each transcript (the model's turns with the environment's
    `environment` after each but the last) and the model's own turns."""
    queries = [prompt + "".join(turn + environment for turn in turns[:-1]) + turns[-1] for turns in rollouts]
    return {"query": queries, "prompts": [prompt] * len(rollouts), "labels": [label] * len(rollouts),
            "model_turns": [list(turns) for turns in rollouts]}


def environment_line(text: str) -> str:
    return f"\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_agent_requests_are_scored_on_the_models_last_turn_never_the_environments_text(math_url, toolcall_url,
                                                                                       length_url):
    # math: the environment's line holds the right answer in the scorer's own format, \boxed{122}
    prompt = chatml_prompt([{"role": "user", "content": "What is 59 + 63?"}])
    body = agent_batch(prompt, "122", environment_line("<result>\\boxed{122}</result>"),
                       ["Let me check.<|im_end|>", "So \\boxed{122}.<|im_end|>"],  # right in its last turn
                       ["Let me check.<|im_end|>", "No idea.<|im_end|>"],  # only the environment has it
                       ["\\boxed{5}<|im_end|>", "\\boxed{122}<|im_end|>"])  # fmt: skip
    answer = post(math_url, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["extra_logs"] == {"correctness": [1.0, 0.0, 1.0], "format": [1.0, 0.0, 1.0]}

    # toolcall: the environment echoes the right call
    query, prompt, truth = sample(0, ROWS[0]["ground_truth"])
    body = agent_batch(prompt, truth, environment_line(truth),
                       ["Azure news?<|im_end|>", truth + "<|im_end|>"], [truth + "<|im_end|>", "Done.<|im_end|>"],
                       ["Azure news?<|im_end|>", "Done.<|im_end|>"])  # fmt: skip
    answer = post(toolcall_url, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["extra_logs"]["correctness"] == [3.0, -3.0, -3.0]

    # length (target 20): the last turn's characters, not the transcript's
    body = agent_batch(prompt, None, environment_line("x" * 40), ["y" * 5 + "<|im_end|>", "z" * 20 + "<|im_end|>"])
    answer = post(length_url, body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == [1.0]

    answer = post(math_url, {**body, "model_turns": [["a"], ["b"]]})
    assert answer.status_code == 422 and "model_turns needs one entry per sample" in answer.text


def test_a_reward_model_reads_the_last_turn_or_with_whole_conversation_the_transcript(tmp_path):
    from reward_servers.reward_model import make_scorer

    build_tiny_reward_model(tmp_path)
    prompt = "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    body = agent_batch(prompt, None, environment_line("It is noon."), ["Let me look.<|im_end|>", "Yes.<|im_end|>"])
    scorer = make_scorer(str(tmp_path), device="cpu")
    for whole, text in ((False, prompt + "Yes.<|im_end|>"), (True, body["query"][0])):
        with TestClient(create_app("reward_model", ["reward"], scorer, whole_conversation=whole)) as client:
            answer = client.post("/get_reward", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["rewards"] == pytest.approx(own_logits(tmp_path, [text]), abs=1e-5)
    assert own_logits(tmp_path, [prompt + "Yes.<|im_end|>"]) != pytest.approx(own_logits(tmp_path, body["query"]))
    args = build_parser().parse_args(["reward_model", "--model", str(tmp_path), "--whole-conversation"])
    assert args.whole_conversation
