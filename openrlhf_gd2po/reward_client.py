"""Fetch K reward dimensions for a whole rollout batch from remote reward servers, concurrently.

Servers speak OpenRLHF's remote reward protocol (`POST {"query", "prompts", "labels"}` →
`{"rewards": [...], "extra_logs": {name: [...]}}`). Each distinct URL gets one aiohttp session,
the batch is cut into `batch_size` requests with at most `max_in_flight` in flight per server,
and all servers run at the same time, so the wall time is that of the slowest server.

Nothing is silently zero: a server that is down, slow or answers garbage raises
`RewardServerError` naming the server, the dimension and the sample, unless the caller asked
for `on_failure="mask"`, in which case the affected rollouts are reported in `failed`.
"""

import asyncio
import math
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import torch

API_KEY_ENV = "GD2PO_REWARD_API_KEY"  # the same variable the reward servers read
RETRY_STATUSES = {429, 500, 502, 503, 504}


class RewardServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class RewardDimension:
    name: str  # the dimension's name in logs, e.g. "correctness"
    url: str  # the server's /get_reward endpoint
    field: str | None  # extra_logs key to read; None reads "rewards"


@dataclass
class RewardBatch:
    rewards: torch.Tensor  # [N, K] float32 in dimension order; NaN rows where failed
    failed: torch.Tensor  # [N] bool: rollouts whose rewards could not be fetched (on_failure="mask")
    seconds: dict  # dimension name -> wall seconds of its server


def parse_reward_servers(spec: str) -> list[RewardDimension]:
    """`name=url[#field],...` → dimensions. A URL without a path gets `/get_reward`."""
    dimensions = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, target = item.partition("=")
        url, _, field = target.partition("#")
        parsed = urlsplit(url)
        if not sep or not name or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"--reward.servers entry {item!r} must look like name=http://host:port[/path][#dimension]")
        if parsed.path in ("", "/"):
            url = url.rstrip("/") + "/get_reward"
        dimensions.append(RewardDimension(name, url, field or None))
    names = [d.name for d in dimensions]
    if not dimensions or len(set(names)) != len(names):
        raise ValueError(f"--reward.servers needs at least one dimension and unique names, got {names}")
    return dimensions


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
) -> RewardBatch:
    """Blocking entry point (OpenRLHF's trainer is synchronous); see the module docstring."""
    return asyncio.run(
        fetch_rewards_async(
            dimensions, queries, prompts, labels, batch_size, timeout, retries, max_in_flight, on_failure
        )
    )


async def fetch_rewards_async(
    dimensions, queries, prompts, labels, batch_size=256, timeout=300.0, retries=3, max_in_flight=8, on_failure="raise"
) -> RewardBatch:
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"queries/prompts/labels lengths differ: {len(queries)}/{len(prompts)}/{len(labels)}")
    if on_failure not in ("raise", "mask"):
        raise ValueError(f"on_failure must be 'raise' or 'mask', got {on_failure!r}")
    by_url = {}
    for dim in dimensions:
        by_url.setdefault(dim.url, []).append(dim)

    n = len(queries)
    rewards = torch.full((n, len(dimensions)), float("nan"))
    failed = torch.zeros(n, dtype=torch.bool)
    seconds = {}
    payloads = [
        (start, {"query": queries[start : start + batch_size], "prompts": prompts[start : start + batch_size],
                 "labels": labels[start : start + batch_size]})
        for start in range(0, n, batch_size)
    ]
    server_results = await asyncio.gather(
        *(_score_on_server(url, dims, payloads, timeout, retries, max_in_flight) for url, dims in by_url.items())
    )
    for (url, dims), (batch_results, elapsed) in zip(by_url.items(), server_results):
        columns = [dimensions.index(d) for d in dims]
        for (start, payload), result in zip(payloads, batch_results):
            rows = slice(start, start + len(payload["query"]))
            if isinstance(result, Exception):
                if on_failure == "raise":
                    raise result
                failed[rows] = True
            else:
                rewards[rows, columns] = result
        seconds.update({d.name: elapsed for d in dims})
    rewards[failed] = float("nan")
    return RewardBatch(rewards, failed, seconds)


async def _score_on_server(url, dims, payloads, timeout, retries, max_in_flight):
    """All batches on one server through one session; returns per-batch tensors or exceptions."""
    started = time.perf_counter()
    in_flight = asyncio.Semaphore(max_in_flight)
    headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"} if os.environ.get(API_KEY_ENV) else {}
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout), headers=headers,
        connector=aiohttp.TCPConnector(limit=max_in_flight),
    ) as session:

        async def score_batch(start, payload):
            async with in_flight:
                body = await _post_with_retries(session, url, dims, start, payload, retries)
            return _read_dimensions(body, url, dims, start, len(payload["query"]))

        results = await asyncio.gather(*(score_batch(s, p) for s, p in payloads), return_exceptions=True)
    return results, time.perf_counter() - started


async def _post_with_retries(session, url, dims, start, payload, retries):
    """POST once, then up to `retries` more times on connection errors, timeouts and 5xx/429."""
    names = ",".join(d.name for d in dims)
    where = f"reward server {url} (dimensions {names}), samples {start}..{start + len(payload['query']) - 1}"
    for attempt in range(retries + 1):
        try:
            async with session.post(url, json=payload) as response:
                if response.status == 200:
                    try:
                        return await response.json(content_type=None)
                    except ValueError as error:
                        raise RewardServerError(f"{where}: response is not JSON ({error})") from None
                text = (await response.text())[:500]
                if response.status not in RETRY_STATUSES:
                    raise RewardServerError(f"{where}: HTTP {response.status}: {text}")
                last_error = f"HTTP {response.status}: {text}"
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as error:
            last_error = f"{type(error).__name__}: {error}"
        if attempt < retries:
            await asyncio.sleep(min(0.25 * 2**attempt, 8.0))
    raise RewardServerError(f"{where}: failed after {retries + 1} attempt(s); last error {last_error}")


def _read_dimensions(body, url, dims, start, batch_len) -> torch.Tensor:
    """The requested dimensions of one response as a [batch_len, len(dims)] tensor, validated."""
    columns = []
    for dim in dims:
        where = f"reward server {url}, dimension {dim.name!r}"
        if not isinstance(body, dict):
            raise RewardServerError(f"{where}: response must be a JSON object, got {type(body).__name__}")
        values = body.get("rewards") if dim.field is None else (body.get("extra_logs") or {}).get(dim.field)
        key = "rewards" if dim.field is None else f"extra_logs[{dim.field!r}]"
        if not isinstance(values, list):
            raise RewardServerError(f"{where}: {key} missing or not a list (keys: {sorted(body)})")
        if len(values) != batch_len:
            raise RewardServerError(
                f"{where}: {key} has {len(values)} values for {batch_len} samples (samples {start}..{start + batch_len - 1})"
            )
        for offset, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardServerError(f"{where}: {key}[{offset}] is {value!r} for sample {start + offset}")
        columns.append(values)
    return torch.tensor(columns, dtype=torch.float32).T
