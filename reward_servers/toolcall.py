"""ToolRL's tool-calling rewards: correctness (primary), format and length.

Own implementation of the math in ToolRL's `verl/utils/reward_score/rlla.py` (github
qiancheng0/ToolRL, Apache-2.0), read in the GD²PO authors' copy
`Qwen-Applications/GD2PO: tool-calling/verl/utils/reward_score/rlla.py`, with the switches that
GD²PO's tool-calling scripts set (WITHCORRECT=WITHFORMAT=WITHLENGTH=1, every other switch off):

- correctness, in [-3, 3] (`compute_tool_call_reward`, `customize_correctness_reward_tool`),
  or [-1, 1] with `--correctness-max 1` (the reference's CORRECTMAX1 switch). Exactly 0 when the
  ground truth has no tool call. The lowest value when the response has no `<tool_call>` block
  or a line of it is not a JSON object {"name": str, "parameters": {...}}.
- format, 0 or 1 (`customize_format_reward_func`): the `<think>` / `<tool_call>` / `<response>`
  layout the ground truth uses, each of its tags present once.
- length, 0 to 1 in steps of 0.01 (`customize_length_reward_func`): words inside `<think>`
  over 512, capped at 1; 0 without a `<think>…</think>` pair.

The label is the ToolRL ground truth (`reward_model.ground_truth` of the RLLA data): a
`<think>` block, then `<tool_call>` JSON lines and/or a `<response>`.
"""

import json
from collections import Counter

from reward_servers.scoring import InvalidInput, Scorer, extract_response, require_label, score_each

DIMENSIONS = ["correctness", "format", "length"]

# rlla.py's max_reward_len when SCHEDULELENGTH is off.
THINK_WORDS_FOR_FULL_LENGTH_REWARD = 512


def make_scorer(correctness_max: float = 3.0, sample_timeout: float | None = None) -> Scorer:
    """A sample over `sample_timeout` seconds scores the lowest of each dimension: (-max, 0, 0)."""

    def score(queries: list[str], prompts: list[str], labels: list[str | None]) -> dict[str, list[float]]:
        def score_one(query: str, prompt: str, label: str | None) -> tuple[float, float, float]:
            return score_response(extract_response(query, prompt), require_label(label), correctness_max)

        lowest = (-correctness_max, 0.0, 0.0)
        return score_each(DIMENSIONS, score_one, queries, prompts, labels, sample_timeout=sample_timeout, lowest=lowest)

    return score


def score_response(response: str, ground_truth: str, correctness_max: float = 3.0) -> tuple[float, float, float]:
    """(correctness, format, length) of one extracted response against its ToolRL ground truth."""
    return (
        correctness_reward(response, ground_truth, correctness_max),
        format_reward(response, ground_truth),
        length_reward(response),
    )


def correctness_reward(response: str, ground_truth: str, correctness_max: float = 3.0) -> float:
    if "<tool_call>" not in ground_truth:
        return 0.0
    expected_block = tool_call_block(ground_truth)
    if expected_block is None:
        raise InvalidInput("labels", "the ground truth has <tool_call> but no </tool_call>")
    try:
        expected_calls = parse_tool_calls(expected_block)
    except ValueError as error:
        raise InvalidInput("labels", f"the ground truth's <tool_call> block is not valid: {error}") from error

    predicted_block = tool_call_block(response)
    if predicted_block is None:
        return -correctness_max
    try:
        predicted_calls = parse_tool_calls(predicted_block)
    except ValueError:
        return -correctness_max
    return tool_call_match_reward(expected_calls, predicted_calls, correctness_max)


def tool_call_block(text: str) -> str | None:
    """The text between the first `<tool_call>` and the `</tool_call>` after it, stripped; None
    unless both tags occur."""
    if "<tool_call>" not in text or "</tool_call>" not in text:
        return None
    return text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0].strip()


def parse_tool_calls(block: str) -> list[dict]:
    """One JSON tool call per line; ValueError naming the first line that is not one."""
    calls = []
    for line in block.split("\n"):
        try:
            call = json.loads(line)
        except RecursionError:  # deeply nested brackets: bad output, not a server error
            raise ValueError(f"{line[:50]!r}... nests too deeply") from None
        if not (
            isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("parameters"), dict)
        ):
            raise ValueError(f'{line!r} is not a {{"name": str, "parameters": {{...}}}} object')
        calls.append(call)
    return calls


def list_overlap(expected: list, predicted: list) -> float:
    """rlla.py's match_score: 1 for equal lists, else the multiset intersection over the multiset
    union, 0 when either list is empty."""
    if expected == predicted:
        return 1.0
    if not expected or not predicted:
        return 0.0
    common = sum((Counter(expected) & Counter(predicted)).values())
    return common / (len(expected) + len(predicted) - common)


def tool_call_match_reward(
    expected_calls: list[dict], predicted_calls: list[dict], correctness_max: float = 3.0
) -> float:
    """rlla.py's compute_tool_call_reward, scaled from [0, points_max] to [-max, max].

    points = list_overlap(expected names, predicted names), plus, for each expected call in
    order, the best still-unused predicted call of the same name by
    list_overlap(parameter names) + number of expected parameters whose value it equals (a tie
    keeps the earlier call; a call worth 0 points is not used).
    points_max = 1 + sum over expected calls of (1 + number of parameters).
    An exact match of the whole call list is worth the maximum directly.
    """
    if predicted_calls == expected_calls:
        return correctness_max

    points = list_overlap([call["name"] for call in expected_calls], [call["name"] for call in predicted_calls])
    points_max = 1.0
    used = set()
    for expected in expected_calls:
        expected_parameters = expected["parameters"]
        points_max += 1 + len(expected_parameters)
        best_points, best_index = 0.0, None
        for index, predicted in enumerate(predicted_calls):
            if index in used or predicted["name"] != expected["name"]:
                continue
            predicted_parameters = predicted["parameters"]
            call_points = list_overlap(list(expected_parameters), list(predicted_parameters))
            # Python equality of the decoded JSON values, as in the reference (so 1 == 1.0 == true).
            call_points += sum(
                1
                for name, value in expected_parameters.items()
                if name in predicted_parameters and predicted_parameters[name] == value
            )
            if call_points > best_points:
                best_points, best_index = call_points, index
        if best_index is not None:
            used.add(best_index)
            points += best_points
    return 2 * correctness_max * points / points_max - correctness_max


# rlla.py's customize_format_reward_func checks the response against the regex
# `^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>$` (re.DOTALL) or its sibling for the ground
# truth's layout. Each is a chain of literal pieces joined by `.*?`; backtracking over three lazy
# `.*?` takes seconds on a long looping response, so the same question is answered by a scan.
FORMAT_LAYOUTS = {  # (ground truth has <tool_call>, ground truth has <response>) -> pieces
    (False, True): ("<think>", "</think>\n<response>", "</response>"),
    (True, False): ("<think>", "</think>\n<tool_call>\n", "\n</tool_call>"),
    (True, True): ("<think>", "</think>\n<tool_call>\n", "\n</tool_call>\n<response>", "</response>"),
    (False, False): ("<think>", "</think>"),
}


def format_reward(response: str, ground_truth: str) -> float:
    """1 if the response matches the ground truth's layout with each of its tool_call/response
    tags exactly once, else 0 (for a ground truth with neither, the layout alone), as rlla.py."""
    uses_tool_call = "<tool_call>" in ground_truth
    uses_response = "<response>" in ground_truth
    if not matches_layout(response, FORMAT_LAYOUTS[uses_tool_call, uses_response]):
        return 0.0
    tags = ["<tool_call>", "</tool_call>"] if uses_tool_call else []
    tags += ["<response>", "</response>"] if uses_response else []
    return 1.0 if all(response.count(tag) == 1 for tag in tags) else 0.0


def matches_layout(text: str, pieces: tuple[str, ...]) -> bool:
    """Whether `re.search("^" + ".*?".join(pieces) + "$", text, re.DOTALL)` matches (pieces taken
    literally), in time linear in the text. As in that regex, `$` also matches before a final
    newline."""
    return matches_anchored(text, pieces) or (text.endswith("\n") and matches_anchored(text[:-1], pieces))


def matches_anchored(text: str, pieces: tuple[str, ...]) -> bool:
    # The first piece must start the text and the last end it; each middle piece must occur, in
    # order, between them. Taking each middle piece at its first occurrence leaves the most room
    # for the rest, so one left-to-right pass decides.
    first, *middle, last = pieces
    position, end = len(first), len(text) - len(last)
    if end < position or not text.startswith(first) or not text.endswith(last):
        return False
    for piece in middle:
        found = text.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def length_reward(response: str) -> float:
    """Words in the thinking (after the last `<think>`, up to the next `</think>`) over 512,
    rounded to 2 decimals and capped at 1; 0 without both think tags."""
    if "<think>" not in response or "</think>" not in response:
        return 0.0
    thinking = response.split("<think>")[-1].split("</think>")[0]
    return min(round(len(thinking.split()) / THINK_WORDS_FOR_FULL_LENGTH_REWARD, 2), 1.0)
