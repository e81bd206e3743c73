"""Fetch K reward dimensions for a whole rollout batch, concurrently, from reward servers or reward files.

A dimension's target is a reward server speaking OpenRLHF's remote reward protocol
(`POST {"query", "prompts", "labels"}` → `{"rewards": [...], "extra_logs": {name: [...]}}`), several
replicas of one (`http://a:5001|http://b:5001`), a reward server deployed on this Ray cluster with Ray
Serve (`serve:NAME`, called through a DeploymentHandle: reward_serve.py), a local `.py` reward file in
OpenRLHF's convention (reward_servers/reward_file.py), scored in this process without HTTP, or `agent`:
the results of OpenRLHF's `--train.agent_func_path` agent itself (its summed reward, or `agent#key`: a key
of its last step's extra_logs), which the caller hands over with each sample (`agent_values`).

Each distinct target gets the whole batch cut into `batch_size` requests; all targets run at the same
time. A replica list gets one aiohttp session, at most `max_in_flight` requests per replica, each
batch on the replica with the fewest in flight; a batch that fails on one replica is retried on
another, and a replica that stopped answering is avoided for the rest of the fetch. `deadline`
bounds the whole fetch, retries included.

Nothing is silently zero: a server that is down, slow or answers garbage raises
`RewardServerError` naming the server, the dimension and the sample, unless the caller asked
for `on_failure="mask"`, in which case the affected rollouts are reported in `failed`.
"""

import asyncio
import functools
import math
import threading
import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import torch

from openrlhf_gd2po.reward_http import (  # noqa: F401  (API_KEY_ENV*, RewardServerError: part of this API)
    API_KEY_ENV, API_KEY_FILE_ENV, Replicas, RewardServerError, open_session, post_with_failover, read_dimensions,
)
from openrlhf_gd2po.reward_serve import SERVE_PREFIX, call_with_retries, connect_to_ray
from openrlhf_gd2po.reward_spec import RewardDimension
from reward_servers.reward_file import load_reward_file, score_reward_file
from reward_servers.scoring import scored_queries


@dataclass
class RewardBatch:
    rewards: torch.Tensor  # [N, K] float32 in dimension order; NaN rows where failed
    failed: torch.Tensor  # [N] bool: rollouts whose rewards could not be fetched (on_failure="mask")
    seconds: dict  # dimension name -> wall seconds of its server


# Loaded once per process: the trainer fetches every step, and a reward file may load a model.
cached_reward_file = functools.lru_cache(maxsize=None)(load_reward_file)


def load_reward_files(dimensions) -> None:
    """Import every reward file and check its dimensions before anything is scored. Done here, in the
    process that scores, not when parsing: the driver that checks the flags must not run user code
    (which may load a model). A broken file raises whatever `on_failure` says: retrying cannot fix it."""
    for dim in dimensions:
        if not dim.is_file:
            continue
        try:
            reward_file = cached_reward_file(dim.url)
        except (OSError, ValueError, RuntimeError) as error:
            raise RewardServerError(f"reward dimension {dim.name!r}: {error}") from None
        if dim.field is not None and dim.field not in reward_file.dimensions:
            raise RewardServerError(
                f"reward dimension {dim.name!r}: reward file {dim.url} has dimensions {reward_file.dimensions}, "
                f"not {dim.field!r}"
            )


def fetch_rewards(
    dimensions: list[RewardDimension],
    queries: list[str],
    prompts: list[str],
    labels: list,
    batch_size: int = 256,
    timeout: float = 300.0,
    retries: int = 3,
    max_in_flight: int = 8,
    on_failure: str = "raise",
    deadline: float = 600.0,
    model_turns: list | None = None,
    agent_values: list | None = None,
) -> RewardBatch:
    """Blocking entry point (OpenRLHF's trainer is synchronous); see the module docstring.

    Agent rollouts: `model_turns` (each sample's list of the model's own turns) goes to every server in the
    request's `model_turns`; `agent_values` (each sample's {agent dimension name: value, None if missing})
    fills the `agent` dimensions.

    `timeout` bounds one request (or one reward-file call), `deadline` the whole fetch: a batch not
    scored by then fails, naming its server. The default, 10 minutes, is one timed-out request and
    one retry; without it a hung server cost (retries + 1) x timeout = 20 minutes at the defaults.
    """
    return asyncio.run(
        fetch_rewards_async(
            dimensions, queries, prompts, labels, batch_size, timeout, retries, max_in_flight, on_failure, deadline,
            model_turns, agent_values,
        )
    )


async def fetch_rewards_async(
    dimensions, queries, prompts, labels, batch_size=256, timeout=300.0, retries=3, max_in_flight=8,
    on_failure="raise", deadline=600.0, model_turns=None, agent_values=None,
) -> RewardBatch:
    check_arguments(dimensions, queries, prompts, labels, batch_size, timeout, retries, max_in_flight, on_failure,
                    deadline)
    check_agent_columns(dimensions, queries, model_turns, agent_values)
    load_reward_files(dimensions)
    async with open_targets(dimensions, timeout, retries, max_in_flight) as targets:
        return await score_samples(targets, dimensions, queries, prompts, labels, batch_size, deadline, on_failure,
                                   model_turns=model_turns, agent_values=agent_values)


def check_arguments(dimensions, queries, prompts, labels, batch_size, timeout, retries, max_in_flight, on_failure,
                    deadline):
    if not dimensions or not all(isinstance(d, RewardDimension) for d in dimensions):
        raise ValueError(f"dimensions must be a non-empty list of RewardDimension, got {dimensions!r}")
    if len({d.name for d in dimensions}) != len(dimensions):
        raise ValueError(f"dimension names must be unique, got {[d.name for d in dimensions]}")
    check_samples(queries, prompts, labels)
    for argument, value, minimum in (("batch_size", batch_size, 1), ("retries", retries, 0),
                                     ("max_in_flight", max_in_flight, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    for argument, value in (("timeout", timeout), ("deadline", deadline)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{argument} must be a positive number of seconds, got {value!r}")
    if on_failure not in ("raise", "mask"):
        raise ValueError(f"on_failure must be 'raise' or 'mask', got {on_failure!r}")


def check_samples(queries, prompts, labels):
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"queries/prompts/labels lengths differ: {len(queries)}/{len(prompts)}/{len(labels)}")
    for column, values in (("queries", queries), ("prompts", prompts)):
        bad = next((i for i, value in enumerate(values) if not isinstance(value, str)), None)
        if bad is not None:
            raise ValueError(f"{column}[{bad}] must be a string, got {type(values[bad]).__name__}")


def check_agent_columns(dimensions, queries, model_turns, agent_values):
    if any(d.is_agent for d in dimensions) and agent_values is None:
        raise ValueError("an `agent` reward dimension reads the agent's results: run with --train.agent_func_path")
    for column, values in (("model_turns", model_turns), ("agent_values", agent_values)):
        if values is not None and len(values) != len(queries):
            raise ValueError(f"{column} has {len(values)} entries for {len(queries)} queries")


@dataclass
class Target:
    """One distinct target (a replica list or a reward file) and the dimensions read from its answers."""

    dims: list
    where: str  # "reward server URL (dimensions a,b)", for error messages
    score: object  # async (samples, start, payload) -> [len(payload), len(dims)] tensor


@asynccontextmanager
async def open_targets(dimensions, timeout, retries, max_in_flight):
    """One Target per distinct target, open for as many score_samples calls as the caller makes: a replica
    list keeps one aiohttp session and one Replicas, so max_in_flight and a replica found down hold across
    calls; a reward file is called one batch at a time (reward functions need not be thread-safe)."""
    by_target = {}
    for dim in [d for d in dimensions if not d.is_agent]:  # read from the samples, in score_samples
        by_target.setdefault(dim.url, []).append(dim)
    async with AsyncExitStack() as stack:
        targets = []
        for url, dims in by_target.items():
            names = ",".join(d.name for d in dims)
            kind = "reward file" if dims[0].is_file else "Serve application" if dims[0].is_serve else "reward server"
            where = f"{kind} {url} (dimensions {names})"
            if dims[0].is_file:
                targets.append(Target(dims, where, _file_scorer(dims, timeout)))
                continue
            if dims[0].is_serve:
                connect_to_ray()
                targets.append(Target(dims, where, _serve_scorer(dims, where, url[len(SERVE_PREFIX):], timeout,
                                                                 retries)))
                continue
            urls = url.split("|")
            session = await stack.enter_async_context(open_session(urls, timeout, max_in_flight))
            targets.append(Target(dims, where, _server_scorer(dims, where, session, Replicas(urls, max_in_flight),
                                                              timeout, retries)))
        yield targets


def _file_scorer(dims, timeout):
    one_at_a_time = asyncio.Semaphore(1)

    async def score(samples, start, payload):
        async with one_at_a_time:
            return await _score_file_batch(dims, samples, start, payload, timeout)

    return score


def _serve_scorer(dims, where, application, timeout, retries):
    async def score(samples, start, payload):
        body = await call_with_retries(application, samples, payload, timeout, retries)
        return read_dimensions(body, where, dims, start, len(payload["query"]))

    return score


def _server_scorer(dims, where, session, replicas, timeout, retries):
    async def score(samples, start, payload):
        body = await post_with_failover(session, replicas, samples, payload, timeout, retries)
        return read_dimensions(body, where, dims, start, len(payload["query"]))

    return score


async def score_samples(targets, dimensions, queries, prompts, labels, batch_size, deadline, on_failure,
                        first_sample=0, model_turns=None, agent_values=None) -> RewardBatch:
    """Every sample on every target, cut into `batch_size` requests, all at once; `deadline` seconds from now
    bound the whole call. Sample numbers in errors start at `first_sample` (a stream's running count).
    `agent` dimensions are read from `agent_values` first, one sample at a time."""
    deadline_at = asyncio.get_running_loop().time() + deadline
    n = len(queries)
    rewards = torch.full((n, len(dimensions)), float("nan"))
    failed = read_agent_dimensions(rewards, dimensions, agent_values, on_failure, first_sample)
    columns = {"query": queries, "prompts": prompts, "labels": labels}
    if model_turns is not None:
        columns["model_turns"] = model_turns
    payloads = [
        (start, {key: list(values[start : start + batch_size]) for key, values in columns.items()})
        for start in range(0, n, batch_size)
    ]

    async def bounded(target, start, payload):
        first = first_sample + start
        samples = f"{target.where}, samples {first}..{first + len(payload['query']) - 1}"
        remaining = deadline_at - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(target.score(samples, first, payload), max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise RewardServerError(f"{samples}: not scored within the fetch deadline of {deadline:g} s") from None

    async def score_target(target):
        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(target, s, p) for s, p in payloads), return_exceptions=True)
        return results, time.perf_counter() - started

    seconds = {d.name: 0.0 for d in dimensions if d.is_agent}  # read here, no wait
    for target, (batch_results, elapsed) in zip(targets, await asyncio.gather(*map(score_target, targets))):
        columns = [dimensions.index(d) for d in target.dims]
        for (start, payload), result in zip(payloads, batch_results):
            rows = slice(start, start + len(payload["query"]))
            if isinstance(result, Exception):
                if on_failure == "raise":
                    raise result
                failed[rows] = True
            else:
                rewards[rows, columns] = result
        seconds.update({d.name: elapsed for d in target.dims})
    rewards[failed] = float("nan")
    return RewardBatch(rewards, failed, seconds)


def read_agent_dimensions(rewards, dimensions, agent_values, on_failure, first_sample) -> torch.Tensor:
    """Fill the `agent` columns of `rewards` from each sample's agent values; the [N] failed mask. A value that
    is missing or not finite is a failed fetch of that sample, as a server's error is, never a 0."""
    failed = torch.zeros(len(rewards), dtype=torch.bool)
    for k, dim in enumerate(dimensions):
        if not dim.is_agent:
            continue
        source = "the agent's reward" if dim.field is None else f"extra_logs[{dim.field!r}] of the agent's last step"
        for i, values in enumerate(agent_values):
            value = values.get(dim.name)
            if value is not None and math.isfinite(value):
                rewards[i, k] = value
                continue
            if on_failure == "raise":
                raise RewardServerError(f"agent dimension {dim.name!r}, sample {first_sample + i}: {source} is "
                                        f"{'missing' if value is None else value}")
            failed[i] = True
    return failed


async def _score_file_batch(dims, samples, start, payload, timeout) -> torch.Tensor:
    """One batch through a reward file's reward_func, in a thread, bounded by `timeout`."""
    reward_file = cached_reward_file(dims[0].url)
    # An agent rollout's query is its prompt and the model's last turn, as our servers read it.
    queries = scored_queries(payload["query"], payload["prompts"], payload.get("model_turns"))
    call = functools.partial(
        score_reward_file, reward_file, queries, payload["prompts"], payload["labels"], first_sample=start
    )
    try:
        scores = await asyncio.wait_for(_in_daemon_thread(call), timeout)
    except asyncio.TimeoutError:
        raise RewardServerError(
            f"{samples}: reward_func did not return within {timeout:g} s; Python cannot stop it, so it keeps "
            "running in a background thread (serve the file with `python -m reward_servers file` to have it killed)"
        ) from None
    except (ValueError, RuntimeError) as error:  # score_reward_file names the file, dimension and sample
        raise RewardServerError(f"{samples}: {error}") from None
    return torch.tensor([scores[d.field or reward_file.dimensions[0]] for d in dims], dtype=torch.float32).T


def _in_daemon_thread(call) -> asyncio.Future:
    """Run `call` in a daemon thread; its result as a future. Not asyncio.to_thread: a reward_func that
    hangs would then block asyncio.run's executor shutdown, and interpreter exit, forever."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error):
        if not future.done():  # cancelled when the caller's time limit passed
            future.set_exception(error) if error is not None else future.set_result(result)

    def run():
        try:
            result, error = call(), None
        except Exception as caught:
            result, error = None, caught
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the event loop is closed: the fetch gave up on this call long ago
            pass

    threading.Thread(target=run, daemon=True, name="reward_func").start()
    return future
