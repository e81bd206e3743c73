"""Math answers: correctness (primary) and format.

- correctness, 1 or 0: math-verify's `verify(parse(label), parse(response))`. A label without
  `\\boxed` or `$` is parsed as `\\boxed{label}`, so plain answers such as `x^2+1` or `(1,2)`
  parse as LaTeX; a label math-verify cannot parse into a math expression (`\\frac{`, `???`) is
  a 422 naming `labels[i]`, not a 0.
- format, 1 or 0: the response contains a non-empty `\\boxed{...}` answer (braces balanced).

math-verify can hang on adversarial LaTeX. Its own timeouts (signal.alarm around each parse and
comparison) are switched off in favour of one limit per sample (`sample_timeout`, also SIGALRM,
which they would reset); a sample over it scores 0 and 0. The scorer runs in a pool worker
(reward_servers.workers), whose main thread can take the signal.
"""

from reward_servers.scoring import InvalidInput, Scorer, extract_response, require_label, score_each

DIMENSIONS = ["correctness", "format"]


def make_scorer(sample_timeout: float | None = None) -> Scorer:
    # Import math-verify (and sympy) now, so a broken install fails when the worker starts.
    answer_correctness("\\boxed{1}", "1")

    def score(queries: list[str], prompts: list[str], labels: list[str | None]) -> dict[str, list[float]]:
        def score_one(query: str, prompt: str, label: str | None) -> tuple[float, float]:
            response = extract_response(query, prompt)
            return answer_correctness(response, require_label(label)), boxed_format(response)

        lowest = (0.0, 0.0)
        return score_each(DIMENSIONS, score_one, queries, prompts, labels, sample_timeout=sample_timeout, lowest=lowest)

    return score


def answer_correctness(response: str, label: str) -> float:
    from math_verify import parse, verify

    gold_text = label if "\\boxed" in label or "$" in label else f"\\boxed{{{label}}}"
    gold = parse(gold_text, parsing_timeout=None)
    # parse falls back to the raw string when it finds no expression: that is not an answer.
    if all(isinstance(value, str) for value in gold):
        raise InvalidInput("labels", f"math-verify cannot parse the answer {label!r}")
    answer = parse(response, parsing_timeout=None)
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0


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
