"""Math answers: correctness (primary) and format.

- correctness, 1 or 0: math-verify's `verify(parse(label), parse(response))`. A label without
  `\\boxed` or `$` is parsed as `\\boxed{label}`, so plain answers such as `x^2+1` or `(1,2)`
  parse as LaTeX; a label math-verify cannot parse is an error, not a 0.
- format, 1 or 0: the response contains a non-empty `\\boxed{...}` answer (braces balanced).

math-verify can hang on adversarial input; its timeouts use signal.alarm, which only works in a
main thread, so scoring runs in a worker process (whose main thread runs it) rather than in the
server's thread pool.
"""

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from reward_servers.scoring import InvalidInput, Scorer, extract_response, require_label, score_each

DIMENSIONS = ["correctness", "format"]

# Seconds math-verify may spend on one parse or one comparison before the answer counts as wrong.
MATH_VERIFY_TIMEOUT_SECONDS = 5


def make_scorer() -> Scorer:
    # "spawn": forking a process that already runs threads (uvicorn's) is unsafe.
    worker = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=exit_with_parent,
        initargs=(os.getpid(),),
    )
    # Start the worker and import math-verify now, so a broken install fails at startup.
    worker.submit(score_batch, ["\\boxed{1}"], [""], ["1"]).result()

    def score(queries: list[str], prompts: list[str], labels: list[str | None]) -> dict[str, list[float]]:
        return worker.submit(score_batch, queries, prompts, labels).result()

    return score


def exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: end the worker once the server process is gone. The pool's own exit
    hook does not run when the server dies from a signal (uvicorn re-raises SIGTERM after its
    graceful shutdown), and the worker would otherwise wait for work forever."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def score_batch(queries: list[str], prompts: list[str], labels: list[str | None]) -> dict[str, list[float]]:
    def score_one(query: str, prompt: str, label: str | None) -> tuple[float, float]:
        response = extract_response(query, prompt)
        return answer_correctness(response, require_label(label)), boxed_format(response)

    return score_each(DIMENSIONS, score_one, queries, prompts, labels)


def answer_correctness(response: str, label: str) -> float:
    # Imported here: only the worker process needs math-verify (and sympy).
    from math_verify import parse, verify

    gold_text = label if "\\boxed" in label or "$" in label else f"\\boxed{{{label}}}"
    gold = parse(gold_text, parsing_timeout=MATH_VERIFY_TIMEOUT_SECONDS)
    if not gold:
        raise InvalidInput("labels", f"math-verify cannot parse the answer {label!r}")
    answer = parse(response, parsing_timeout=MATH_VERIFY_TIMEOUT_SECONDS)
    return 1.0 if verify(gold, answer, timeout_seconds=MATH_VERIFY_TIMEOUT_SECONDS) else 0.0


def boxed_format(response: str) -> float:
    """1 if some `\\boxed{` is closed by its matching brace around non-blank content, else 0."""
    open_braces = []  # positions of the "{" not closed yet; one pass, so long inputs stay cheap
    for position, char in enumerate(response):
        if char == "{":
            open_braces.append(position)
        elif char == "}" and open_braces:
            start = open_braces.pop()
            if response.endswith("\\boxed", 0, start) and response[start + 1 : position].strip():
                return 1.0
    return 0.0
