"""Reward servers under hostile input, dying workers and misbehaving connections, over real HTTP on
127.0.0.1. Each test has a time bound far above what the server needs (the machine is shared),
and far below what a server without the protection takes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from reward_servers.local import running_process

# A ToolRL ground truth with a tool call and a response: the format check's longest layout.
CALL_AND_RESPONSE_TRUTH = (
    '<think> t </think>\n<tool_call>\n{"name": "a", "parameters": {}}\n</tool_call>\n<response> r </response>'
)
PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
# A policy stuck in a loop, cut off by the length limit: every tag, never the final one. Against
# CALL_AND_RESPONSE_TRUTH, a backtracking regex tries every pair of its tag runs (cubic time).
LOOP = '</think>\n<tool_call>\n{"name": "a"}\n</tool_call>\n<response> x </response>'
# LaTeX that math-verify (sympy) evaluates for seconds or longer each.
SLOW_LATEX = [
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "\\boxed{(10^{10})!}",
    "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "\\boxed{" + "(" * 5000 + "}",
]


@contextmanager
def server(*task_args: str):
    """`python -m reward_servers <task_args> --port P`; yields (url, server process)."""
    env = {name: value for name, value in os.environ.items() if name != "GD2PO_REWARD_API_KEY"}
    with running_process([sys.executable, "-m", "reward_servers", *task_args], env) as (url, process):
        yield url, process


def body(responses: list[str], labels: list[str]) -> dict:
    queries = [PROMPT + text + "<|im_end|>" for text in responses]
    return {"query": queries, "prompts": [PROMPT] * len(responses), "labels": labels}


def post(url: str, payload: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/get_reward", json=payload, timeout=timeout)


def post_in_background(url: str, payload: dict, timeout: float = 120) -> dict:
    """Start a POST in a thread; the returned dict gets "answer" (or "error") and "seconds"."""
    result = {}

    def send() -> None:
        start = time.monotonic()
        try:
            result["answer"] = post(url, payload, timeout)
        except httpx.HTTPError as error:
            result["error"] = error
        result["seconds"] = time.monotonic() - start

    result["thread"] = threading.Thread(target=send, daemon=True)
    result["thread"].start()
    return result


def scorer_workers(server_process) -> list[psutil.Process]:
    children = psutil.Process(server_process.pid).children()
    return [child for child in children if "spawn_main" in " ".join(child.cmdline())]


def wait_until_busy(worker: psutil.Process, cpu_seconds: float = 0.3, timeout: float = 30) -> None:
    start = worker.cpu_times().user
    deadline = time.monotonic() + timeout
    while worker.cpu_times().user - start < cpu_seconds:
        assert time.monotonic() < deadline, "the worker never started scoring"
        time.sleep(0.05)


def math_batch(responses: list[str], label: str = "1") -> dict:
    return body(responses, [label] * len(responses))


def spin_batch(*seconds: float) -> dict:
    """One sample per entry, each scored by tests/data/spin_reward.py in exactly that many seconds."""
    return body(["x"] * len(seconds), [str(s) for s in seconds])


GOOD_MATH = math_batch(["So \\boxed{2}.", "It is 3."], "2")
SPIN_REWARD = str(Path(__file__).parent / "data" / "spin_reward.py")


@pytest.fixture(scope="module")
def toolcall_url():
    with server("toolcall", "--workers", "2") as (url, _):
        yield url


def test_a_looping_truncated_response_is_scored_in_linear_time(toolcall_url):
    bait = ("<think>" + LOOP * 1000)[:36_000]  # 36 KB, truncated mid-loop
    huge = ("<think>" + LOOP * 20_000)[:1_000_000]  # 1 MB
    well_formed = "<think>" + " word" * 200_000 + CALL_AND_RESPONSE_TRUTH[len("<think> t") :]
    start = time.monotonic()
    answer = post(toolcall_url, body([bait, huge, well_formed], [CALL_AND_RESPONSE_TRUTH] * 3), timeout=30)
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - start < 20  # a backtracking format regex takes minutes here
    scores = answer.json()["extra_logs"]
    assert scores["format"] == [0.0, 0.0, 1.0]
    assert scores["correctness"] == [-3.0, -3.0, 3.0]  # the loop's calls lack "parameters"


@pytest.mark.parametrize("task", ["toolcall", "math"])
def test_health_and_sigterm_answer_while_hostile_scoring_runs(task):
    if task == "toolcall":
        args, payload = ["toolcall"], body([("<think>" + LOOP * 1000)[:36_000]] * 4, [CALL_AND_RESPONSE_TRUTH] * 4)
    else:  # 12 samples of several seconds each: about a minute of scoring
        args, payload = ["math", "--sample-timeout", "5"], math_batch(SLOW_LATEX * 3)
    with server(*args, "--workers", "1") as (url, process):
        hostile = post_in_background(url, payload)
        time.sleep(1)
        start = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert time.monotonic() - start < 3
        workers = scorer_workers(process)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert time.monotonic() - start < 5
    psutil.wait_procs(workers, timeout=10)
    assert not any(worker.is_running() for worker in workers), "a worker outlived its server"
    hostile["thread"].join(timeout=30)


def test_pathological_latex_scores_lowest_and_does_not_hold_up_other_requests():
    with server("math", "--workers", "2", "--sample-timeout", "1") as (url, _):
        hostile = post_in_background(url, math_batch(SLOW_LATEX))
        time.sleep(0.5)
        start = time.monotonic()
        good = post(url, GOOD_MATH, timeout=30)
        assert good.status_code == 200, good.text
        assert good.json()["extra_logs"] == {"correctness": [1.0, 0.0], "format": [1.0, 0.0]}
        assert time.monotonic() - start < 15  # one worker is free
        hostile["thread"].join(timeout=120)
        answer = hostile["answer"]
        assert answer.status_code == 200, answer.text
        # The power tower (sample 0) runs far past the 1 s limit on any machine and scores the lowest
        # value of each dimension; how fast the others parse depends on the machine (on an idle one
        # some finish in time and, being boxed, get format 1), so they are only checked as wrong.
        scores = answer.json()["extra_logs"]
        assert scores["correctness"] == [0.0] * 4
        assert scores["format"][0] == 0.0
        assert hostile["seconds"] < 40  # one request runs on one worker: 4 samples x 1 s


def test_a_killed_worker_is_replaced_and_its_request_answers_503():
    with server("file", "--path", SPIN_REWARD, "--workers", "1") as (url, process):
        # Killed while scoring: that request gets a retryable 503, then the server recovers.
        hostile = post_in_background(url, spin_batch(30))
        [worker] = scorer_workers(process)
        wait_until_busy(worker)
        os.kill(worker.pid, signal.SIGKILL)
        hostile["thread"].join(timeout=60)
        answer = hostile["answer"]
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "1"
        assert "worker process died" in answer.json()["detail"]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503  # the replacement is starting
        wait_for_health(url)
        assert post(url, spin_batch(0, 0.5)).json()["rewards"] == [0.0, 0.5]

        # Killed while idle: replaced before it gets work, so the next request is answered.
        [worker] = scorer_workers(process)
        os.kill(worker.pid, signal.SIGKILL)
        wait_until_dead(worker)
        answer = post(url, spin_batch(0))
        assert answer.status_code == 200, answer.text
        [new] = scorer_workers(process)  # exactly one worker again, and a new process
        assert new.pid != worker.pid


def wait_until_dead(worker: psutil.Process, timeout: float = 30) -> None:
    """Until the killed worker is a zombie: only its parent, the server, can reap it (psutil.wait_procs
    would wait out its whole timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if worker.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        assert time.monotonic() < deadline, "the killed worker did not die"
        time.sleep(0.05)


def wait_for_health(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the pool was not rebuilt"
        time.sleep(0.2)


def test_queued_work_of_a_client_that_left_is_dropped():
    with server("file", "--path", SPIN_REWARD, "--workers", "1") as (url, process):
        first = post_in_background(url, spin_batch(3))
        wait_until_busy(scorer_workers(process)[0])
        # Queued behind it, 60 s of work, but the client gives up after 1 s.
        with pytest.raises(httpx.TimeoutException):
            post(url, spin_batch(*[6] * 10), timeout=1)
        start = time.monotonic()
        good = post(url, spin_batch(0), timeout=60)
        assert good.status_code == 200, good.text
        assert good.json()["rewards"] == [0.0]
        assert time.monotonic() - start < 30  # the first batch's rest (under 3 s), not the abandoned 60 s
        first["thread"].join(timeout=60)
        assert first["answer"].status_code == 200


def test_a_full_queue_answers_503_with_retry_after():
    with server("file", "--path", SPIN_REWARD, "--workers", "1", "--max-queue", "1") as (url, process):
        running = post_in_background(url, spin_batch(5))
        wait_until_busy(scorer_workers(process)[0])
        queued = post_in_background(url, spin_batch(0))
        time.sleep(1)  # for the queued request to reach the server; nothing observable marks it queued
        answer = post(url, spin_batch(0), timeout=10)
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "1"
        assert "--max-queue" in answer.json()["detail"]
        for request in (running, queued):
            request["thread"].join(timeout=60)
            assert request["answer"].status_code == 200


def test_half_open_sockets_are_closed_and_do_not_hold_up_a_good_request():
    with server("toolcall", "--workers", "1", "--read-timeout", "2") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        partial_head = b"POST /get_reward HTTP/1.1\r\nHost: x\r\n"
        partial_body = (
            b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"query": ['
        )
        sockets = []
        for index in range(500):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall([b"", partial_head, partial_body][index % 3])
            sockets.append(connection)
        try:
            start = time.monotonic()
            good = post(url, body(["<think> a </think>"], ["<think> t </think>"]), timeout=30)
            assert good.status_code == 200, good.text
            assert time.monotonic() - start < 10
            # The server closes every one of them within its read timeout (2 s), give or take.
            deadline = time.monotonic() + 30
            for connection in sockets:
                connection.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    while connection.recv(65536):  # a 408 answer may come first, then the end
                        pass
                except ConnectionResetError:
                    pass
                except TimeoutError:
                    pytest.fail("a half-open connection was still open after 30 s")
        finally:
            for connection in sockets:
                connection.close()


def test_a_huge_json_body_is_parsed_outside_the_server_process(tmp_path):
    # 6 million samples (about 96 MB): seconds of parsing, during which /health must answer.
    # Parsed in the server's event loop, it blocks /health for all of them.
    samples = 6_000_000
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"query": ["x"] * samples, "prompts": ["x"] * samples, "labels": [None] * samples}))
    # Sent from another process, so this one's GIL does not slow the /health requests down.
    sender = (
        "import sys, urllib.error, urllib.request\n"
        "request = urllib.request.Request(sys.argv[1], data=open(sys.argv[2], 'rb').read(),"
        " headers={'content-type': 'application/json'})\n"
        "try:\n    urllib.request.urlopen(request, timeout=300)\n"
        "except urllib.error.HTTPError as error:\n    print(error.code, error.read().decode())\n"
    )
    with server("toolcall", "--workers", "1", "--max-body-mb", "128") as (url, _):
        command = [sys.executable, "-c", sender, f"{url}/get_reward", str(huge)]
        sending = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        slowest = 0.0
        while sending.poll() is None:
            start = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.1)
        answer = sending.stdout.read()
    assert answer.startswith("422 ") and "labels[0]: is null" in answer, answer
    assert slowest < 1.5


def test_deeply_nested_and_oversized_json_are_refused(toolcall_url):
    headers = {"content-type": "application/json"}
    deep = '{"query": ' + "[" * 100_000 + "]" * 100_000 + ', "prompts": [], "labels": []}'
    answer = httpx.post(f"{toolcall_url}/get_reward", content=deep, headers=headers, timeout=60)
    assert answer.status_code == 422
    assert "recursion limit" in answer.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while the body streams in
        yield b'{"query": ["'
        for _ in range(80):
            yield b"x" * 2**20

    answer = httpx.post(f"{toolcall_url}/get_reward", content=chunks(), headers=headers, timeout=60)
    assert answer.status_code == 413
    assert post(toolcall_url, body(["<think> a </think>"], ["<think> t </think>"])).status_code == 200
