"""RewardStream against real HTTP servers on 127.0.0.1: groups merged into batches, the flush wait,
limits that hold across requests, sample numbers, failures and close()."""

import time

import httpx
import pytest
import torch

from openrlhf_gd2po.reward_client import RewardServerError
from openrlhf_gd2po.reward_spec import parse_reward_servers
from openrlhf_gd2po.reward_stream import RewardStream
from test_reward_client import fault_server, within

GROUP = ["prompt" + "x" * i for i in range(4)]  # the fault server's "up" reward is len(query): 6..9
UP = torch.tensor([6.0, 7.0, 8.0, 9.0])


def stream(url, **kwargs):
    kwargs = {"batch_size": 8, "timeout": 5.0, "retries": 0, "flush_wait": 30.0, **kwargs}
    return RewardStream(parse_reward_servers(f"up={url}#up,down={url}#down"), **kwargs)


def submit(scorer, group=GROUP):
    return scorer.submit(group, ["prompt"] * len(group), [None] * len(group))


def served(url):
    return httpx.get(f"{url}/health").json()["requests"]


def test_full_batches_go_at_once_and_a_group_is_never_split():
    with fault_server() as url, stream(url) as scorer:
        futures = [submit(scorer) for _ in range(5)]  # 20 samples, batches of 8: 8 + 8 wait for nothing
        results = within(10, lambda: [f.result() for f in futures[:4]])
        assert not futures[4].done()  # the fifth waits for the flush (30 s) or for flush()
        scorer.flush()
        results.append(within(10, futures[4].result))
        for batch in results:
            assert torch.equal(batch.rewards, torch.stack([UP, -UP], dim=1)) and not batch.failed.any()
        assert scorer.requests == 3 and served(url) == 3  # one request per batch for both dimensions


def test_a_partial_batch_goes_after_the_flush_wait():
    with fault_server() as url, stream(url, flush_wait=0.5) as scorer:
        started = time.monotonic()
        future = submit(scorer)
        within(10, future.result)
        assert time.monotonic() - started >= 0.5 and scorer.requests == 1


def test_max_in_flight_holds_across_requests():
    with fault_server("--delay", "0.5") as url, stream(url, batch_size=4, max_in_flight=1) as scorer:
        started = time.monotonic()
        futures = [submit(scorer) for _ in range(3)]  # three full batches, one request at a time
        within(20, lambda: [f.result() for f in futures])
        assert time.monotonic() - started >= 3 * 0.5


def test_errors_number_samples_in_submission_order_and_mask_marks_rows():
    with fault_server("--nan-at", "1") as url:
        with stream(url, batch_size=4) as scorer:
            first, second = submit(scorer), submit(scorer)
            for future, sample in ((first, 1), (second, 5)):
                with pytest.raises(RewardServerError, match=rf"\(sample {sample}\) is nan"):
                    within(10, future.result)
        with stream(url, batch_size=4, on_failure="mask") as scorer:
            batch = within(10, submit(scorer).result)
            assert batch.failed.all() and torch.isnan(batch.rewards).all()


def test_deadline_bounds_each_request_and_close_cancels_what_is_left():
    with fault_server("--delay", "600") as url:
        with stream(url, timeout=100.0, deadline=1.0) as scorer:
            with pytest.raises(RewardServerError, match="not scored within the fetch deadline of 1 s"):
                within(10, submit(scorer, GROUP * 2).result)
        scorer = stream(url, timeout=100.0)
        in_flight, buffered = submit(scorer, GROUP * 2), submit(scorer)
        time.sleep(0.2)
        within(10, scorer.close)
        assert in_flight.cancelled() and buffered.cancelled()


def test_bad_arguments_are_named():
    dims = parse_reward_servers("up=http://127.0.0.1:1")
    with pytest.raises(ValueError, match="flush_wait must be a finite number of seconds >= 0, got -1"):
        RewardStream(dims, flush_wait=-1)
    with RewardStream(dims) as scorer, pytest.raises(ValueError, match="queries/prompts/labels lengths differ: 1/0/0"):
        scorer.submit(["q"], [], [])
