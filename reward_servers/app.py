"""The HTTP service around one scorer: OpenRLHF's remote reward protocol with named dimensions."""

import asyncio
import contextlib
import json
import logging
import math
import secrets

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from reward_servers.scoring import InvalidRequest, RewardRequest, SampleError, Scorer, parse_request
from reward_servers.workers import ClientGone, PoolBusy, WorkerLost, WorkerPool

logger = logging.getLogger("reward_servers")


class RewardResponse(BaseModel):
    rewards: list[float] = Field(description="The primary dimension, one value per query.")
    scores: list[float] = Field(description="Same as rewards.")
    extra_logs: dict[str, list[float]] = Field(description="Every dimension by name, the primary one included.")


class ServerInfo(BaseModel):
    task: str
    dimensions: list[str]
    primary: str


def create_app(
    task: str,
    dimensions: list[str],
    scorer: Scorer | WorkerPool,
    api_key: str | None = None,
    max_body_bytes: int = 64 << 20,
    request_timeout: float = 300.0,
    max_queue: int = 256,
    read_timeout: float = 30.0,
    request_log: str | None = None,
    whole_conversation: bool = False,
) -> FastAPI:
    """`scorer` is a WorkerPool (CPU tasks) or a function run in a thread of this process (a GPU
    reward model); either way a request waits behind at most `max_queue` others and scores for at
    most `request_timeout` seconds. The body must arrive within `read_timeout` seconds.
    `request_log`: a file to which every answered request appends one JSON line per sample
    (query, prompt, label, an agent rollout's model_turns, and its score on each dimension).
    `whole_conversation` (in-process scorers only): an agent rollout is scored on its whole transcript
    (`query`), not on its prompt and the model's last turn."""
    if api_key == "":
        raise ValueError("the API key is empty: pass a non-empty key, or none to serve without authentication")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if isinstance(scorer, WorkerPool):
            scorer.close()

    # With a key, the docs are served below behind it rather than by FastAPI in the open.
    docs_urls = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title=f"GD²PO reward server: {task}",
        description=f"Dimensions: {', '.join(dimensions)} (primary: {dimensions[0]}).",
        lifespan=lifespan,
        **docs_urls,
    )
    bearer = HTTPBearer(auto_error=False)

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    protected = [Depends(require_api_key)] if api_key else []
    if api_key:

        @app.get("/openapi.json", dependencies=protected, include_in_schema=False)
        async def openapi() -> dict:
            return app.openapi()

        @app.get("/docs", dependencies=protected, include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

        @app.get("/redoc", dependencies=protected, include_in_schema=False)
        async def redoc() -> HTMLResponse:
            return get_redoc_html(openapi_url="/openapi.json", title=app.title)

    if whole_conversation and isinstance(scorer, WorkerPool):
        raise ValueError("whole_conversation applies to an in-process scorer (a reward model), not to a worker pool")
    score = (scorer.score if isinstance(scorer, WorkerPool)
             else in_process(scorer, request_timeout, max_queue, whole_conversation))

    @app.get("/health")
    async def health() -> JSONResponse:
        if isinstance(scorer, WorkerPool) and not scorer.ready:
            return JSONResponse({"status": "replacing a lost worker"}, status_code=503, headers=RETRY_AFTER)
        return JSONResponse({"status": "ok"})

    @app.get("/info", dependencies=protected)
    async def info() -> ServerInfo:
        return ServerInfo(task=task, dimensions=dimensions, primary=dimensions[0])

    # The body is read by hand to enforce the size and time limits while it streams in, so its
    # schema is declared here for /docs.
    request_body_schema = {
        "content": {"application/json": {"schema": RewardRequest.model_json_schema()}},
        "required": True,
    }

    @app.post("/get_reward", dependencies=protected, openapi_extra={"requestBody": request_body_schema})
    async def get_reward(request: Request) -> RewardResponse:
        # Only JSON: a browser page may post text/plain or form data cross-site without asking.
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise HTTPException(415, f"the body must be application/json, got content-type {media_type or 'none'!r}")
        body = await read_body(request, max_body_bytes, read_timeout)
        try:
            return await score_body(body, request.is_disconnected)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the client left before its batch started

    async def score_body(body: bytes, client_gone) -> RewardResponse:
        """A /get_reward body's answer, or the HTTPException the route answers. Ray Serve's
        DeploymentHandle calls it too (reward_servers.serve), so both paths validate alike."""
        try:
            scores, sample_count = await score(body, client_gone)
        except ClientGone:
            raise  # the route answers 499; a handle's caller never leaves this way
        except InvalidRequest as error:
            raise HTTPException(422, str(error)) from None
        except (PoolBusy, WorkerLost) as error:
            raise HTTPException(503, str(error), headers=RETRY_AFTER) from None
        except SampleError as error:
            raise HTTPException(500 if error.field is None else 422, str(error)) from None
        except Exception as error:
            logger.exception("scoring failed")
            raise HTTPException(500, f"scoring failed: {type(error).__name__}: {error}") from None
        check_scores(scores, dimensions, sample_count)
        if request_log:  # in a thread: a large body is seconds of parsing and writing, which /health must not wait on
            await asyncio.to_thread(log_samples, request_log, body, scores)
        primary = scores[dimensions[0]]
        return RewardResponse(rewards=primary, scores=primary, extra_logs=scores)

    app.state.score_body = score_body
    return app


RETRY_AFTER = {"Retry-After": "1"}


def in_process(scorer: Scorer, request_timeout: float, max_queue: int, whole_conversation: bool = False):
    """Run `scorer` in a thread of this process with the pool's queue and time limits. A thread
    cannot be stopped: a request over the limit answers 503 while its thread runs on, and it
    still counts against the queue until it ends, so a hung scorer fills the queue, not memory."""
    running = 0

    def finished(_) -> None:
        nonlocal running
        running -= 1

    async def score(body: bytes, client_gone) -> tuple[dict[str, list[float]], int]:
        nonlocal running
        if running > max_queue:
            raise PoolBusy(f"{running} requests are being scored or queued (--max-queue {max_queue})")
        # Parsed in the event loop: milliseconds for a usual batch (the pool's workers parse their own).
        batch = parse_request(body)
        running += 1
        future = asyncio.get_running_loop().run_in_executor(
            None, scorer, batch.scored_queries(whole_conversation), batch.prompts, batch.labels
        )
        future.add_done_callback(finished)
        try:
            return await asyncio.wait_for(asyncio.shield(future), request_timeout), len(batch.query)
        except TimeoutError:
            raise WorkerLost(f"scoring took over the {request_timeout:g} s limit (--request-timeout); retry") from None

    return score


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    too_large = HTTPException(413, f"request body is over the {max_bytes / 2**20:g} MiB limit (--max-body-mb)")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise too_large if declared.isdigit() else HTTPException(400, f"bad content-length {declared[:30]!r}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise too_large
    except TimeoutError:
        raise HTTPException(408, f"the body did not arrive within {timeout:g} s (--read-timeout)") from None
    return bytes(body)


def log_samples(path: str, body: bytes, scores: dict[str, list[float]]) -> None:
    request = json.loads(body)  # already validated by the scorer
    turns = request.get("model_turns") or [None] * len(request["query"])
    columns = zip(request["query"], request["prompts"], request["labels"], turns)
    lines = [
        json.dumps({"query": query, "prompt": prompt, "label": label, **({"model_turns": t} if t is not None else {}),
                    **{k: v[i] for k, v in scores.items()}}) + "\n"
        for i, (query, prompt, label, t) in enumerate(columns)
    ]
    with open(path, "a") as log:  # one write: lines of concurrent requests do not interleave
        log.write("".join(lines))


def check_scores(scores: dict[str, list[float]], dimensions: list[str], sample_count: int) -> None:
    """A scorer bug (missing dimension, wrong count, NaN) is a 500, never a silently wrong reward."""
    if list(scores) != dimensions:
        raise HTTPException(500, f"the scorer returned dimensions {list(scores)}, expected {dimensions}")
    for name, values in scores.items():
        if len(values) != sample_count:
            raise HTTPException(500, f"the scorer returned {len(values)} {name} values for {sample_count} samples")
        for index, value in enumerate(values):
            if not math.isfinite(value):
                raise HTTPException(500, f"scoring sample {index} failed: {name} is {value}")
