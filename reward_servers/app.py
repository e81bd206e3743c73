"""The HTTP service around one scorer: OpenRLHF's remote reward protocol with named dimensions."""

import logging
import math
import secrets

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, StrictStr, ValidationError, model_validator

from reward_servers.scoring import SampleError, Scorer

logger = logging.getLogger("reward_servers")


class RewardRequest(BaseModel):
    query: list[StrictStr] = Field(description="Prompt + response of each sample as OpenRLHF decodes it.")
    prompts: list[StrictStr] = Field(description="The prompt of each sample.")
    labels: list[StrictStr | None] = Field(description="The label (ground truth) of each sample, or null.")

    @model_validator(mode="after")
    def one_entry_per_sample(self) -> "RewardRequest":
        if not len(self.query) == len(self.prompts) == len(self.labels):
            raise ValueError(
                "query, prompts and labels need one entry per sample, got "
                f"{len(self.query)}, {len(self.prompts)} and {len(self.labels)} entries"
            )
        return self


class RewardResponse(BaseModel):
    rewards: list[float] = Field(description="The primary dimension, one value per query.")
    scores: list[float] = Field(description="Same as rewards.")
    extra_logs: dict[str, list[float]] = Field(description="Every dimension by name, the primary one included.")


class ServerInfo(BaseModel):
    task: str
    dimensions: list[str]
    primary: str


def create_app(
    task: str, dimensions: list[str], scorer: Scorer, api_key: str | None = None, max_body_bytes: int = 64 << 20
) -> FastAPI:
    app = FastAPI(
        title=f"GD²PO reward server: {task}",
        description=f"Dimensions: {', '.join(dimensions)} (primary: {dimensions[0]}).",
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

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", dependencies=protected)
    async def info() -> ServerInfo:
        return ServerInfo(task=task, dimensions=dimensions, primary=dimensions[0])

    # The body is read by hand to enforce the size limit while it streams in, so its schema is
    # declared here for /docs.
    request_body_schema = {
        "content": {"application/json": {"schema": RewardRequest.model_json_schema()}},
        "required": True,
    }

    @app.post("/get_reward", dependencies=protected, openapi_extra={"requestBody": request_body_schema})
    async def get_reward(request: Request) -> RewardResponse:
        body = await read_body(request, max_body_bytes)
        try:
            batch = RewardRequest.model_validate_json(body)
        except ValidationError as error:
            raise HTTPException(422, describe_validation_error(error)) from None
        try:
            scores = await run_in_threadpool(scorer, batch.query, batch.prompts, batch.labels)
        except SampleError as error:
            if error.field is None:
                logger.exception("scoring failed")
            raise HTTPException(500 if error.field is None else 422, str(error)) from None
        except Exception as error:
            logger.exception("scoring failed")
            raise HTTPException(500, f"scoring failed: {type(error).__name__}: {error}") from None
        check_scores(scores, dimensions, len(batch.query))
        primary = scores[dimensions[0]]
        return RewardResponse(rewards=primary, scores=primary, extra_logs=scores)

    return app


async def read_body(request: Request, max_bytes: int) -> bytes:
    too_large = HTTPException(413, f"request body is over the {max_bytes / 2**20:g} MiB limit (--max-body-mb)")
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field, e.g. `query[1]: Input should be a valid string`."""
    problems = []
    for problem in error.errors(include_url=False):
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in problem["loc"]).lstrip(".")
        problems.append(f"{field or 'body'}: {problem['msg']}")
    return "invalid request: " + "; ".join(problems)


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
