"""The multi-reward client against real HTTP servers on 127.0.0.1: happy path and every fault."""

import contextlib
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from openrlhf_gd2po.reward_client import RewardServerError, fetch_rewards, parse_reward_servers
from servers import running_process, running_server

FAULT_SERVER = [sys.executable, str(Path(__file__).with_name("fault_server.py"))]
QUERIES = ["prompt" + "x" * i for i in range(10)]  # prompt + response; len(query) = 6 + i
PROMPTS = ["prompt"] * len(QUERIES)
LABELS = [None] * len(QUERIES)
LENGTHS = torch.tensor([float(len(q)) for q in QUERIES])


@contextlib.contextmanager
def fault_server(*flags):
    with running_process([*FAULT_SERVER, *flags]) as (url, _):
        yield url


def fetch(spec, **kwargs):
    kwargs = {"batch_size": 4, "timeout": 5.0, "retries": 2, **kwargs}
    return fetch_rewards(parse_reward_servers(spec), QUERIES, PROMPTS, LABELS, **kwargs)


def test_parse_reward_servers():
    dims = parse_reward_servers("c=http://h:1/get_reward#correctness, f=http://h:1#format,len=https://x.org/r")
    assert [(d.name, d.url, d.field) for d in dims] == [
        ("c", "http://h:1/get_reward", "correctness"),
        ("f", "http://h:1/get_reward", "format"),
        ("len", "https://x.org/r", None),
    ]
    for bad in ["", "c", "c=h:1", "=http://h:1", "c=ftp://h", "a=http://h:1,a=http://h:2"]:
        with pytest.raises(ValueError, match="reward.servers"):
            parse_reward_servers(bad)


def test_two_servers_in_order_with_dimensions():
    with fault_server() as first, fault_server() as second, running_server(["length", "--target-length", "8"]) as real:
        batch = fetch(f"up={first}#up,down={first}#down,primary={second},length={real}#length")
        assert batch.rewards.shape == (10, 4)
        assert torch.equal(batch.rewards[:, 0], LENGTHS)
        assert torch.equal(batch.rewards[:, 1], -LENGTHS)
        assert torch.equal(batch.rewards[:, 2], LENGTHS)
        # The real length server answers what it answers to a direct request, row for row.
        direct = httpx.post(f"{real}/get_reward", json={"query": QUERIES, "prompts": PROMPTS, "labels": LABELS}).json()
        assert batch.rewards[:, 3].tolist() == pytest.approx(direct["extra_logs"]["length"])
        assert not batch.failed.any()
        assert set(batch.seconds) == {"up", "down", "primary", "length"}
        # One server, one set of requests, however many of its dimensions are used.
        assert httpx.get(f"{first}/health").json()["requests"] == 3


def test_server_down_raises_naming_it():
    with fault_server() as url:
        pass  # started and stopped: nothing listens there any more
    with pytest.raises(RewardServerError, match=rf"reward server {url}/get_reward \(dimensions up\).*3 attempt"):
        fetch(f"up={url}")


def test_slow_server_times_out_and_mask_mode_reports_rows():
    with fault_server("--delay", "3") as slow, fault_server() as fast:
        with pytest.raises(RewardServerError, match="TimeoutError"):
            fetch(f"slow={slow},fast={fast}", timeout=0.5, retries=0)
        batch = fetch(f"slow={slow},fast={fast}", timeout=0.5, retries=0, on_failure="mask")
        assert batch.failed.all()
        assert torch.isnan(batch.rewards).all()  # never a silent zero


def test_500_then_recovers_with_retries():
    with fault_server("--fail-first", "2") as url:
        batch = fetch(f"up={url}", batch_size=10, retries=2)
        assert torch.equal(batch.rewards[:, 0], LENGTHS)
    with fault_server("--fail-first", "2") as url:
        with pytest.raises(RewardServerError, match="HTTP 500"):
            fetch(f"up={url}", batch_size=10, retries=1)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--wrong-length"], r"dimension 'up': rewards has 3 values for 4 samples \(samples 0..3\)"),
        (["--nan-at", "1"], r"dimension 'up': rewards\[1\] is nan for sample 1"),
        (["--not-json"], "response is not JSON"),
    ],
)
def test_garbage_answers_name_server_dimension_and_sample(flags, message):
    with fault_server(*flags) as url:
        with pytest.raises(RewardServerError, match=message) as error:
            fetch(f"up={url}")
        assert url in str(error.value)


def test_missing_dimension_is_an_error():
    with fault_server() as url:
        with pytest.raises(RewardServerError, match=r"extra_logs\['nope'\] missing"):
            fetch(f"x={url}#nope")


def test_server_killed_mid_batch():
    """Batches answered before the kill keep their rewards; the rest fail, loudly or masked."""
    with running_process([*FAULT_SERVER, "--delay", "0.4"]) as (url, server):
        threading.Timer(0.6, server.kill).start()  # after the first batch, during the second
        started = time.monotonic()
        batch = fetch(f"up={url}", batch_size=4, max_in_flight=1, retries=1, on_failure="mask")
        assert time.monotonic() - started < 5
    assert batch.failed.tolist() == [False] * 4 + [True] * 6
    assert torch.equal(batch.rewards[:4, 0], LENGTHS[:4])
    assert torch.isnan(batch.rewards[4:]).all()


def test_api_key_from_environment(monkeypatch):
    with fault_server("--require-key", "s3cret") as url:
        with pytest.raises(RewardServerError, match="HTTP 401"):
            fetch(f"up={url}")
        monkeypatch.setenv("GD2PO_REWARD_API_KEY", "s3cret")
        assert torch.equal(fetch(f"up={url}").rewards[:, 0], LENGTHS)


def test_mismatched_inputs_and_modes():
    dims = parse_reward_servers("a=http://127.0.0.1:9")
    with pytest.raises(ValueError, match="lengths differ: 2/1/1"):
        fetch_rewards(dims, ["a", "b"], ["p"], [None])
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'mask', got 'zero'"):
        fetch_rewards(dims, ["a"], ["p"], [None], on_failure="zero")
