"""The multi-reward client against real HTTP servers on 127.0.0.1: happy path and every fault."""

import contextlib
import logging
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from openrlhf_gd2po import reward_http
from openrlhf_gd2po.reward_client import RewardServerError, fetch_rewards
from openrlhf_gd2po.reward_spec import RewardDimension, parse_reward_servers
from reward_servers.local import stop, wait_until_healthy
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
        with pytest.raises(RewardServerError, match=r"no answer within 0.5 s"):
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
        (["--nan-at", "1"], r"dimension 'up': rewards\[1\] \(sample 1\) is nan"),
        (["--not-json"], "answered a body that is not JSON"),
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


def test_server_killed_mid_batch_then_started_again():
    """Batches answered before the kill keep their rewards; the rest fail, loudly or masked. Started again at the
    same address, the server scores the next fetch in full (a step's dead server, back, serves the next step)."""
    with running_process([*FAULT_SERVER, "--delay", "0.4"]) as (url, server):
        threading.Timer(0.6, server.kill).start()  # after the first batch, during the second
        started = time.monotonic()
        batch = fetch(f"up={url}", batch_size=4, max_in_flight=1, retries=1, on_failure="mask")
        assert time.monotonic() - started < 5
    assert batch.failed.tolist() == [False] * 4 + [True] * 6
    assert torch.equal(batch.rewards[:4, 0], LENGTHS[:4])
    assert torch.isnan(batch.rewards[4:]).all()
    with tempfile.TemporaryFile() as log:
        again = subprocess.Popen([*FAULT_SERVER, "--port", url.rsplit(":", 1)[1]], stdout=log, stderr=log)
        try:
            wait_until_healthy(url, again, log)
            batch = fetch(f"up={url}", batch_size=4, max_in_flight=1, retries=1, on_failure="mask")
        finally:
            stop(again, timeout=10)
    assert not batch.failed.any() and torch.equal(batch.rewards[:, 0], LENGTHS)


def test_api_key_from_environment(monkeypatch):
    with fault_server("--require-key", "s3cret") as url:
        # the one line says how: where the key must be set (the trainer is a Ray actor)
        with pytest.raises(RewardServerError, match=r"HTTP 401: .*GD2PO_REWARD_API_KEY \(not set here\): set "
                                                    r"\$GD2PO_REWARD_API_KEY_FILE where you launch train_gd2po_ray"):  # fmt: skip
            fetch(f"up={url}")
        monkeypatch.setenv("GD2PO_REWARD_API_KEY", "s3cret")
        assert torch.equal(fetch(f"up={url}").rewards[:, 0], LENGTHS)


def test_mismatched_inputs_and_modes():
    dims = parse_reward_servers("a=http://127.0.0.1:9")
    with pytest.raises(ValueError, match="lengths differ: 2/1/1"):
        fetch_rewards(dims, ["a", "b"], ["p"], [None])
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'mask', got 'zero'"):
        fetch_rewards(dims, ["a"], ["p"], [None], on_failure="zero")


# --- Deadlines, hostile answers, invalid arguments (issue 9, client) ---------------------------------


def within(seconds, call):
    """Run `call` in a thread; fail, instead of hanging the suite, if it takes longer than `seconds`."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001  (handed to the test)
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_deadline_bounds_a_fetch_against_a_hung_server():
    """A hung server used to cost (retries + 1) x timeout; the deadline bounds the whole fetch."""
    with fault_server("--delay", "600") as hung, fault_server() as fast:
        started = time.monotonic()
        with pytest.raises(RewardServerError, match=rf"reward server {hung}/get_reward \(dimensions hung\), samples "
                                                    r"0..3: not scored within the fetch deadline of 2 s"):
            fetch(f"hung={hung},fast={fast}", timeout=1.5, retries=5, deadline=2)
        assert time.monotonic() - started < 2 + 3  # 9 s without the deadline
        batch = fetch(f"hung={hung},fast={fast}", timeout=1.5, retries=5, deadline=2, on_failure="mask")
        assert batch.failed.all() and torch.isnan(batch.rewards).all()


@pytest.mark.parametrize(
    "raw, message",
    [
        ("1" + "0" * 400, r"rewards\[0\] \(sample 0\) is an integer of 1329 bits, outside the float32 range"),
        ("1e39", r"rewards\[0\] \(sample 0\) is 1e\+39; rewards must be finite and within the float32 range"),
        ("-3.5e38", r"rewards\[0\] \(sample 0\) is -3.5e\+38"),
        ("1e400", r"rewards\[0\] \(sample 0\) is inf"),  # json reads 1e400 as inf: caught before, too
        ('"0.5"', r"rewards\[0\] \(sample 0\) is '0.5'; rewards must be numbers"),
        ("true", r"rewards\[0\] \(sample 0\) is True"),
    ],
)
def test_values_outside_float32_name_server_dimension_and_sample(raw, message):
    with fault_server(f"--raw-first={raw}") as url:
        with pytest.raises(RewardServerError, match=rf"reward server {url}/get_reward .*dimension 'up': {message}"):
            fetch(f"up={url}")


def test_largest_float32_passes():
    with fault_server("--raw-first", "3.4e38") as url:
        assert fetch(f"up={url}").rewards[0, 0].item() == pytest.approx(3.4e38)


def test_deeply_nested_json_is_a_named_error():
    with fault_server("--body-kind", "nested") as url:
        with pytest.raises(RewardServerError, match=rf"replica {url}/get_reward answered a body that is not JSON "
                                                    r"\(RecursionError"):
            fetch(f"up={url}")


def test_runaway_answer_size_is_bounded(monkeypatch):
    monkeypatch.setattr(reward_http, "MAX_RESPONSE_BYTES", 1 << 20)
    with fault_server("--body-kind", "padded", "--body-mb", "3") as url:
        with pytest.raises(RewardServerError, match=rf"replica {url}/get_reward answered more than 1 MiB"):
            fetch(f"up={url}")


@pytest.mark.parametrize("spec, message", [
    ("a=http://127.0.0.1:99999", "has an invalid port"),
    ("a=http://127.0.0.1:http", "has an invalid port"),
    ("a=http://:5000", "must look like"),
    ("a=http://h:1|", "must look like"),
    ("a=http://h:1|http://h:1/get_reward", "lists a replica twice"),
])
def test_invalid_urls_are_refused_when_parsed(spec, message):
    with pytest.raises(ValueError, match=rf"--reward.servers entry '{re.escape(spec)}'.*{message}"):
        parse_reward_servers(spec)


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/get_reward", "http:///get_reward"])
def test_invalid_urls_given_directly_are_reward_server_errors(url):
    with pytest.raises(RewardServerError, match=rf"replica {re.escape(url)}: \w+.+"):
        within(30, lambda: fetch_rewards([RewardDimension("a", url, None)], QUERIES, PROMPTS, LABELS, retries=0))


@pytest.mark.parametrize("argument, value, message", [
    ("max_in_flight", 0, r"max_in_flight must be an integer >= 1, got 0"),  # used to wait forever
    ("batch_size", 0, r"batch_size must be an integer >= 1, got 0"),
    ("batch_size", 2.5, r"batch_size must be an integer >= 1, got 2.5"),
    ("retries", -1, r"retries must be an integer >= 0, got -1"),
    ("timeout", 0, r"timeout must be a positive number of seconds, got 0"),
    ("timeout", float("nan"), r"timeout must be a positive number of seconds, got nan"),
    ("deadline", -1, r"deadline must be a positive number of seconds, got -1"),
    ("deadline", float("inf"), r"deadline must be a positive number of seconds, got inf"),
])
def test_arguments_are_validated(argument, value, message):
    dims = parse_reward_servers("a=http://127.0.0.1:9")
    with pytest.raises(ValueError, match=message):
        within(30, lambda: fetch_rewards(dims, ["a"], ["p"], [None], **{argument: value}))


def test_inputs_are_validated():
    dims = parse_reward_servers("a=http://127.0.0.1:9")
    with pytest.raises(ValueError, match=r"queries\[1\] must be a string, got int"):
        fetch_rewards(dims, ["a", 3], ["p", "p"], [None, None])
    with pytest.raises(ValueError, match="dimensions must be a non-empty list of RewardDimension"):
        fetch_rewards([], ["a"], ["p"], [None])
    with pytest.raises(ValueError, match=r"dimension names must be unique, got \['a', 'a'\]"):
        fetch_rewards(dims * 2, ["a"], ["p"], [None])


# --- Replicas (issue 8) --------------------------------------------------------------------------------


def requests_served(url):
    return httpx.get(f"{url}/health").json()["requests"]


def test_replicas_share_the_batches_and_dimensions_share_replicas():
    with fault_server("--delay", "0.2") as a, fault_server("--delay", "0.2") as b:
        batch = fetch(f"up={a}|{b}#up,down={a}|{b}#down", batch_size=1, max_in_flight=2)
        assert torch.equal(batch.rewards[:, 0], LENGTHS) and torch.equal(batch.rewards[:, 1], -LENGTHS)
        # 10 batches, one request each for both dimensions, spread over both (least in flight).
        served = requests_served(a), requests_served(b)
        assert sum(served) == 10 and min(served) >= 3, served


def test_replica_killed_mid_fetch_fails_over(caplog):
    """Kill one of two replicas mid-fetch: every batch still scores, on the survivor, with no retries
    configured; the log names the dead replica and the rest of the fetch avoids it."""
    with running_process([*FAULT_SERVER, "--delay", "0.3"]) as (doomed, server), fault_server("--delay", "0.3") as alive:
        threading.Timer(0.5, server.kill).start()  # during the second round of batches
        with caplog.at_level(logging.WARNING, logger="openrlhf_gd2po.reward_http"):
            batch = fetch(f"up={doomed}|{alive}", batch_size=1, max_in_flight=1, retries=0)
        assert not batch.failed.any()
        assert torch.equal(batch.rewards[:, 0], LENGTHS)
        served_by_survivor = requests_served(alive)
        assert 5 <= served_by_survivor < 10  # shared before the kill, all of it afterwards
    warnings = [r.getMessage() for r in caplog.records if "replica" in r.getMessage()]
    assert len(warnings) == 1 and f"replica {doomed}/get_reward failed" in warnings[0]


def test_all_replicas_down_names_each():
    with fault_server() as a, fault_server() as b:
        pass
    with pytest.raises(RewardServerError, match=rf"failed after 3 attempt\(s\): {a}/get_reward: .+; {b}/get_reward: "):
        fetch(f"up={a}|{b}", batch_size=10, retries=2)


# --- Reward files scored in this process (issue 8) -----------------------------------------------------

REWARD_FILE = """
import time
DIMENSIONS = ["chars", "neg"]

def reward_func(queries, prompts, labels):
    if "hang" in labels:
        time.sleep(60)
    chars = [float(len(q)) for q in queries]
    chars = [float("nan") if label == "nan" else value for value, label in zip(chars, labels)]
    return {"rewards": chars, "extra_logs": {"chars": chars, "neg": [-x for x in chars]}}
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    return str(path)


def test_reward_file_in_process_beside_a_server(reward_file):
    with fault_server() as url:
        batch = fetch(f"chars={reward_file}#chars,neg={reward_file}#neg,up={url}#up")
    assert torch.equal(batch.rewards, torch.stack([LENGTHS, -LENGTHS, LENGTHS], dim=1))
    assert set(batch.seconds) == {"chars", "neg", "up"}
    first = parse_reward_servers(f"x={reward_file}")[0]
    assert (first.url, first.field, first.is_file) == (reward_file, None, True)
    assert torch.equal(fetch(f"x={reward_file}").rewards[:, 0], LENGTHS)  # without #: the file's first dimension


def test_reward_file_errors_name_file_dimension_and_sample(reward_file):
    labels = [None] * 5 + ["nan"] + [None] * 4
    with pytest.raises(RewardServerError, match=rf"reward file {reward_file} \(dimensions chars\), samples 4..7: "
                                                rf"reward file {reward_file}, dimension 'chars': "
                                                r"extra_logs\['chars'\]\[1\] \(sample 5\) is nan"):
        fetch_rewards(parse_reward_servers(f"chars={reward_file}#chars"), QUERIES, PROMPTS, labels, batch_size=4)
    batch = fetch_rewards(parse_reward_servers(f"chars={reward_file}"), QUERIES, PROMPTS, labels, batch_size=4,
                          on_failure="mask")
    assert batch.failed.tolist() == [False] * 4 + [True] * 4 + [False] * 2
    assert torch.equal(batch.rewards[:4, 0], LENGTHS[:4]) and torch.isnan(batch.rewards[4:8]).all()


def test_hung_reward_file_is_bounded_by_timeout(reward_file):
    labels = [None] * 4 + ["hang"] + [None] * 5
    started = time.monotonic()
    batch = within(30, lambda: fetch_rewards(parse_reward_servers(f"chars={reward_file}"), QUERIES, PROMPTS, labels,
                                             batch_size=4, timeout=1.0, on_failure="mask"))
    assert time.monotonic() - started < 10
    assert batch.failed.tolist() == [False] * 4 + [True] * 4 + [False] * 2
    with pytest.raises(RewardServerError, match=r"samples 4..7: reward_func did not return within 1 s"):
        within(30, lambda: fetch_rewards(parse_reward_servers(f"chars={reward_file}"), QUERIES, PROMPTS, labels,
                                         batch_size=4, timeout=1.0))


def test_reward_file_spec_errors(reward_file, tmp_path):
    missing = str(tmp_path / "missing.py")
    with pytest.raises(ValueError, match=rf"--reward.servers entry 'c={missing}': reward file {missing} does not exist"):
        parse_reward_servers(f"c={missing}")
    # A broken file or a missing dimension is a configuration error: raised even in mask mode.
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    for entry, message in [
        (f"c={reward_file}#nope", rf"dimension 'c': reward file {reward_file} has dimensions \['chars', 'neg'\], not 'nope'"),
        (f"c={tmp_path}/broken.py", rf"dimension 'c': reward file {tmp_path}/broken.py failed to import: ModuleNotFound"),
    ]:
        with pytest.raises(RewardServerError, match=message):
            fetch(entry, on_failure="mask")


@pytest.mark.parametrize("value", ["0", "nan", "inf"])
def test_trainer_refuses_a_bad_deadline(value, capsys):
    from unittest import mock

    import ray

    from openrlhf_gd2po.cli.train_gd2po_ray import main

    argv = ["train_gd2po_ray", "--actor.model_name_or_path", "unused", "--rollout.n_samples_per_prompt", "2",
            "--algo.advantage.estimator", "gdpo", "--reward.servers", "c=http://h:1", "--reward.deadline", value]
    with mock.patch.object(sys, "argv", argv), mock.patch.object(ray, "init") as ray_init:
        with pytest.raises(SystemExit):
            main()
    assert f"--reward.deadline must be >= 0.001, got {value}" in capsys.readouterr().err
    ray_init.assert_not_called()
