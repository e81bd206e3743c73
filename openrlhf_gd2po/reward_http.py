"""The HTTP side of the reward client: one replica list's batches over one aiohttp session.

`Replicas` picks the replica for each attempt (live ones first, then one the batch has not
tried, then the fewest in flight) and remembers the replicas that stopped answering during this
fetch; `post_with_failover` retries a batch on another replica, then with backoff; answers are read
with a size limit and validated (`read_dimensions`) before they become a tensor.
"""

import asyncio
import json
import logging
import os

import aiohttp
import torch

from reward_servers.api_key import API_KEY_ENV, API_KEY_FILE_ENV, ApiKeyError, read_api_key
from reward_servers.reward_file import finite_float32
RETRY_STATUSES = {429, 500, 502, 503, 504}
MAX_RESPONSE_BYTES = 64 << 20  # a reward answer is a few floats per sample; more is a broken server

logger = logging.getLogger(__name__)


class RewardServerError(RuntimeError):
    pass


def key_hint() -> str:
    if os.environ.get(API_KEY_FILE_ENV) is not None:
        sent = f"the key in ${API_KEY_FILE_ENV}={os.environ[API_KEY_FILE_ENV]}"
    else:
        sent = f"${API_KEY_ENV} ({'set' if os.environ.get(API_KEY_ENV) else 'not set'} here)"
    return (f"this process sends {sent}: set ${API_KEY_FILE_ENV} where you launch train_gd2po_ray, which "
            "passes the file's path to every Ray worker")


def open_session(urls: list[str], timeout: float, max_in_flight: int) -> aiohttp.ClientSession:
    try:
        key = read_api_key()
    except ApiKeyError as error:
        raise RewardServerError(f"{urls[0]}: {error}") from None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout), headers=headers,
        connector=aiohttp.TCPConnector(limit=max_in_flight * len(urls), limit_per_host=max_in_flight),
    )


class Replicas:
    """One replica list during one fetch: requests in flight per URL, and the URLs that stopped answering."""

    def __init__(self, urls, max_in_flight):
        self.in_flight = dict.fromkeys(urls, 0)
        self.down = set()
        self.max_in_flight = max_in_flight
        self.changed = asyncio.Condition()

    async def acquire(self, tried: set) -> str:
        """The replica for a batch's next attempt: a live one if any, one this batch has not tried,
        the fewest in flight; waits while every candidate has max_in_flight requests."""
        async with self.changed:
            while True:
                live = [url for url in self.in_flight if url not in self.down] or list(self.in_flight)
                free = [url for url in live if self.in_flight[url] < self.max_in_flight]
                if free:
                    url = min(free, key=lambda u: (u in tried, self.in_flight[u]))
                    self.in_flight[url] += 1
                    return url
                await self.changed.wait()

    async def release(self, url: str, failure: str | None = None):
        async with self.changed:
            self.in_flight[url] -= 1
            if failure and url not in self.down and len(self.in_flight) > 1:
                self.down.add(url)
                logger.warning(f"reward server replica {url} failed ({failure}); the rest of this fetch avoids it")
            self.changed.notify_all()


async def post_with_failover(session, replicas, samples, payload, timeout, retries):
    """POST to the best replica; on connection errors, timeouts and 5xx/429 try again, on another
    replica first. At least one attempt per replica, and `retries` + 1 in all."""
    tried, errors = set(), []
    for attempt in range(max(retries + 1, len(replicas.in_flight))):
        if attempt and tried.issuperset(replicas.in_flight):  # every replica failed once: back off
            await asyncio.sleep(min(0.25 * 2 ** (attempt - 1), 8.0))
        url = await replicas.acquire(tried)
        tried.add(url)
        failure = None
        try:
            async with session.post(url, json=payload) as response:
                if response.status == 200:
                    return await read_json(response, f"{samples}: replica {url}")
                text = (await response.content.read(500)).decode(errors="replace")  # enough to say why
                if response.status == 401:
                    raise RewardServerError(f"{samples}: replica {url} answered HTTP 401: {text}; {key_hint()}")
                if response.status not in RETRY_STATUSES:
                    raise RewardServerError(f"{samples}: replica {url} answered HTTP {response.status}: {text}")
                errors.append(f"{url}: HTTP {response.status}: {text}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as error:
            failure = f"no answer within {timeout:g} s" if isinstance(error, asyncio.TimeoutError) else describe(error)
            errors.append(f"{url}: {failure}")
        except (aiohttp.ClientError, ValueError) as error:  # an invalid URL and the like: no retry helps
            raise RewardServerError(f"{samples}: replica {url}: {describe(error)}") from None
        finally:
            await replicas.release(url, failure)
    raise RewardServerError(f"{samples}: failed after {len(errors)} attempt(s): {'; '.join(errors)}")


async def read_json(response, where):
    """The body as JSON, read in chunks up to MAX_RESPONSE_BYTES, so a runaway server cannot fill memory."""
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise RewardServerError(f"{where} answered more than {MAX_RESPONSE_BYTES >> 20} MiB")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as error:  # RecursionError: JSON nested thousands deep
        raise RewardServerError(f"{where} answered a body that is not JSON ({describe(error)})") from None


def describe(error: BaseException) -> str:
    """`Type: message`, never empty (aiohttp's and asyncio's timeouts have no message)."""
    return f"{type(error).__name__}: {error}" if str(error) else f"{type(error).__name__} ({error!r})"


def read_dimensions(body, where, dims, start, batch_len) -> torch.Tensor:
    """The requested dimensions of one response as a [batch_len, len(dims)] tensor, validated."""
    columns = []
    for dim in dims:
        dim_where = f"{where}, dimension {dim.name!r}"
        if not isinstance(body, dict):
            raise RewardServerError(f"{dim_where}: response must be a JSON object, got {type(body).__name__}")
        extra_logs = body.get("extra_logs")
        values = body.get("rewards") if dim.field is None else (
            extra_logs.get(dim.field) if isinstance(extra_logs, dict) else None)
        key = "rewards" if dim.field is None else f"extra_logs[{dim.field!r}]"
        if not isinstance(values, list):
            raise RewardServerError(f"{dim_where}: {key} missing or not a list (keys: {sorted(body)})")
        if len(values) != batch_len:
            raise RewardServerError(
                f"{dim_where}: {key} has {len(values)} values for {batch_len} samples "
                f"(samples {start}..{start + batch_len - 1})"
            )
        try:
            columns.append([finite_float32(v, f"{dim_where}: {key}[{i}] (sample {start + i})")
                            for i, v in enumerate(values)])
        except ValueError as error:
            raise RewardServerError(str(error)) from None
    return torch.tensor(columns, dtype=torch.float32).T
