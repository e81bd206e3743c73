"""What every task shares: the request body, the scorer signature, response extraction, errors and time limits."""

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Sequence

from pydantic import BaseModel, Field, StrictStr, ValidationError, model_validator

logger = logging.getLogger("reward_servers")

# (queries, prompts, labels) -> {dimension: one float per sample}, the primary dimension first.
Scorer = Callable[[list[str], list[str], list[str | None]], dict[str, list[float]]]

ASSISTANT_MARKER = "<|im_start|>assistant"
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>")


class InvalidInput(ValueError):
    """The client's data for one sample cannot be scored (a missing or malformed label, a query
    without a findable response). The server answers 422 naming the field and sample."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SampleError(Exception):
    """Scoring failed on sample `index` of a batch. With `field` set it is the client's fault (422,
    e.g. labels[3] is null), otherwise the scorer's (500). Picklable, so it can come back from a
    worker process."""

    def __init__(self, index: int, message: str, field: str | None = None):
        super().__init__(index, message, field)
        self.index = index
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field is not None:
            return f"{self.field}[{self.index}]: {self.message}"
        return f"scoring sample {self.index} failed: {self.message}"


class RewardRequest(BaseModel):
    query: list[StrictStr] = Field(description="Prompt + response of each sample as OpenRLHF decodes it.")
    prompts: list[StrictStr] = Field(description="The prompt of each sample.")
    labels: list[StrictStr | None] = Field(description="The label (ground truth) of each sample, or null.")
    model_turns: list[list[StrictStr]] | None = Field(
        default=None,
        description="Agent rollouts (--train.agent_func_path) only: each sample's own turns of the model, in order, "
        "each as decoded with its end token; `query` is then the whole transcript, environment text included.",
    )

    @model_validator(mode="after")
    def one_entry_per_sample(self) -> "RewardRequest":
        if not len(self.query) == len(self.prompts) == len(self.labels):
            raise ValueError(
                "query, prompts and labels need one entry per sample, got "
                f"{len(self.query)}, {len(self.prompts)} and {len(self.labels)} entries"
            )
        if self.model_turns is not None and len(self.model_turns) != len(self.query):
            raise ValueError(f"model_turns needs one entry per sample, got {len(self.model_turns)} for "
                             f"{len(self.query)} queries")
        return self

    def scored_queries(self, whole_conversation: bool = False) -> list[str]:
        return list(self.query) if whole_conversation else scored_queries(self.query, self.prompts, self.model_turns)


class InvalidRequest(ValueError):
    """The body is not a valid request (422); the message names each bad field."""


def parse_request(body: bytes) -> RewardRequest:
    try:
        return RewardRequest.model_validate_json(body)
    except ValidationError as error:
        raise InvalidRequest(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field, e.g. `query[1]: Input should be a valid string`."""
    problems = []
    for problem in error.errors(include_url=False):
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in problem["loc"]).lstrip(".")
        problems.append(f"{field or 'body'}: {problem['msg']}")
    return "invalid request: " + "; ".join(problems)


def score_request(scorer: Scorer, body: bytes) -> tuple[dict[str, list[float]], int]:
    """Parse a /get_reward body and score it: (scores, number of samples). Pool workers run this,
    so that parsing a large body (seconds for millions of JSON values, holding the GIL) happens
    outside the server process and /health stays responsive."""
    batch = parse_request(body)
    return scorer(batch.scored_queries(), batch.prompts, batch.labels), len(batch.query)


def scored_queries(queries: list[str], prompts: list[str], model_turns: list[list[str]] | None) -> list[str]:
    """What a scorer reads as each sample's query: the query as sent or, for an agent rollout (model_turns
    given), its prompt followed by the model's last turn. So the environment's text is never scored as the
    model's (a calculator's or a search tool's line may hold the right answer), and the final answer is."""
    if model_turns is None:
        return list(queries)
    return [prompt + (turns[-1] if turns else "") for prompt, turns in zip(prompts, model_turns)]


def make_file_scorer(path: str) -> Scorer:
    """The `file` task's scorer: a reward file's reward_func, validated by reward_servers.reward_file."""
    from reward_servers.reward_file import load_reward_file, score_reward_file

    return functools.partial(score_reward_file, load_reward_file(path))


def extract_response(query: str, prompt: str) -> str:
    """The model's response inside `query` (prompt + response, special tokens included).

    The text after the prompt (or, when the query does not start with it, after the last ChatML
    assistant marker) up to the first end-of-turn marker, stripped. This is ToolRL's extraction
    `query.split("<|im_start|>assistant")[-1].split("<|im_end|>")[0].strip()`: text after a
    non-final `<|im_end|>` (a generation that did not stop) is not scored. One difference: a
    response that itself writes a new assistant marker is scored up to its first end marker,
    where ToolRL would score the text after that marker.
    """
    if query.startswith(prompt):
        response = query[len(prompt) :]
    elif ASSISTANT_MARKER in query:
        response = query.rsplit(ASSISTANT_MARKER, 1)[1]
    else:
        raise InvalidInput("query", f"does not start with its prompt and has no {ASSISTANT_MARKER!r} marker")
    ends = [found for marker in END_MARKERS if (found := response.find(marker)) >= 0]
    return response[: min(ends, default=len(response))].strip()


def require_label(label: str | None) -> str:
    if label is None:
        raise InvalidInput("labels", "is null but this task scores against a label")
    return label


def score_each(
    dimensions: Sequence[str],
    score_one: Callable[..., Sequence[float]],
    *columns: Sequence,
    sample_timeout: float | None = None,
    lowest: Sequence[float] | None = None,
) -> dict[str, list[float]]:
    """Apply `score_one` to each sample (one value per column) and collect its values by dimension.

    Any exception becomes a SampleError carrying the sample's index, so a failure is reported
    instead of being scored as zero. With `sample_timeout`, a sample that takes longer gets the
    `lowest` value of each dimension and a warning in the log (as math-verify's own timeout
    answers "not equal"); the limit needs the main thread (SIGALRM), as in a pool worker.
    """
    if sample_timeout is not None and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("a per-sample time limit needs the main thread (SIGALRM); run the scorer in a worker")
    scores = {name: [] for name in dimensions}
    for index, sample in enumerate(zip(*columns, strict=True)):
        try:
            with time_limit(sample_timeout):
                values = [float(value) for value in score_one(*sample)]
            if len(values) != len(dimensions):
                raise ValueError(f"got {len(values)} values for dimensions {list(dimensions)}")
        except SampleTimeout:
            global timed_out_samples
            timed_out_samples += 1
            values = list(lowest)
            logger.warning(
                "sample %d of a batch of %d went over the %g s limit (--sample-timeout) and scored the lowest "
                "values %s; %d such samples in this worker so far",
                index, len(columns[0]), sample_timeout, dict(zip(dimensions, values)), timed_out_samples,
            )  # fmt: skip
        except InvalidInput as error:
            raise SampleError(index, error.message, error.field) from error
        except Exception as error:
            raise SampleError(index, f"{type(error).__name__}: {error}") from error
        for name, value in zip(dimensions, values):
            scores[name].append(value)
    return scores


class SampleTimeout(BaseException):
    """Raised inside a sample when its time is up. A BaseException, so that a library's broad
    `except Exception` (math-verify has several) cannot turn it into an ordinary result."""


timed_out_samples = 0  # in this process, for the log


@contextlib.contextmanager
def time_limit(seconds: float | None):
    if seconds is None:
        yield
        return

    def time_is_up(signum, frame):
        raise SampleTimeout()

    previous = signal.signal(signal.SIGALRM, time_is_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
