"""ToolRL rewards as pure functions, against numbers worked out by hand from rlla.py's formulas.

correctness = 2 * max * points / points_max - max, with
points = overlap(names) + sum over expected calls of the best same-name unused predicted call's
(overlap(parameter names) + matching values), points_max = 1 + sum(1 + #parameters).
"""

import json
import random
import re
from pathlib import Path

import pytest

from reward_servers.scoring import InvalidInput, SampleError, extract_response
from reward_servers.toolcall import (
    DIMENSIONS,
    correctness_reward,
    format_reward,
    length_reward,
    list_overlap,
    make_scorer,
    score_response,
)

ROWS_FILE = Path(__file__).parent / "data" / "toolrl_rlla_4k_test_rows.json"
ROWS = {row["row"]: row for row in json.loads(ROWS_FILE.read_text())}
GET_NEWS_TRUTH = ROWS[0]["ground_truth"]  # one call: GetNews {"page": "1"}
PASSWORD_TRUTH = ROWS[5]["ground_truth"]  # generate_password {length, include_special}, is_valid_parentheses x2
RESPONSE_ONLY_TRUTH = ROWS[1]["ground_truth"]  # <think> then <response>, no tool call
CALL_AND_RESPONSE_TRUTH = "<think> t </think>\n<tool_call>\n{}\n</tool_call>\n<response> r </response>"

THINK = "<think> I should fetch the latest Azure news. </think>"  # 7 words: length round(7/512, 2) = 0.01


def tool_calls(*calls: dict) -> str:
    return THINK + "\n<tool_call>\n" + "\n".join(json.dumps(call) for call in calls) + "\n</tool_call>"


def get_news(page) -> dict:
    return {"name": "GetNews", "parameters": {"page": page}}


def test_rows_are_the_expected_ground_truths():
    assert '{"name": "GetNews", "parameters": {"page": "1"}}' in GET_NEWS_TRUTH
    assert PASSWORD_TRUTH.count('"name": "is_valid_parentheses"') == 2
    assert "<tool_call>" not in RESPONSE_ONLY_TRUTH and "<response>" in RESPONSE_ONLY_TRUTH


def test_the_ground_truth_itself_scores_the_maximum():
    # Its thinking has 15 words: round(15/512, 2) = round(0.0293, 2) = 0.03.
    assert score_response(GET_NEWS_TRUTH, GET_NEWS_TRUTH) == (3.0, 1.0, 0.03)
    assert score_response(PASSWORD_TRUTH, PASSWORD_TRUTH) == (3.0, 1.0, 0.03)


@pytest.mark.parametrize(
    "calls, expected",
    [
        # names equal: 1; the call: parameter names 1 + values 0 = 1; points 2 of 3 -> 6*2/3 - 3.
        ([get_news("2")], 1.0),
        # the JSON number 1 is not the string "1": same as a wrong value.
        ([get_news(1)], 1.0),
        # names [GetNews] vs [GetPowerBINews]: overlap 0, no same-name call: points 0 -> -3.
        ([{"name": "GetPowerBINews", "parameters": {"page": "1"}}], -3.0),
        # names overlap 1 / (1 + 2 - 1) = 0.5; the call 1 + 1 = 2; points 2.5 of 3 -> 6*2.5/3 - 3.
        ([{"name": "GetPowerBINews", "parameters": {"page": "1"}}, get_news("1")], 2.0),
        # parameter names [page] vs [page, count]: 1/2, value 1; points 1 + 1.5 = 2.5 of 3.
        ([{"name": "GetNews", "parameters": {"page": "1", "count": 5}}], 2.0),
        # no parameters: names overlap 0 ([page] vs []), no value; points 1 of 3 -> 6/3 - 3.
        ([{"name": "GetNews", "parameters": {}}], -1.0),
    ],
)
def test_partial_credit_for_one_expected_call(calls, expected):
    assert correctness_reward(tool_calls(*calls), GET_NEWS_TRUTH) == pytest.approx(expected)


def test_partial_credit_across_several_calls_with_repeated_names():
    predicted = tool_calls(
        {"name": "generate_password", "parameters": {"length": 10}},
        {"name": "is_valid_parentheses", "parameters": {"s": "([)]"}},
        {"name": "is_valid_parentheses", "parameters": {"s": "([{}])"}},
    )
    # names: the same three in the same order: 1.
    # generate_password: parameter names [length, include_special] vs [length]: 1/2, length 10 matches: 1.5.
    # is_valid_parentheses s="([{}])": the 3rd call (1 + 1 = 2) beats the 2nd (1 + 0): 2.
    # is_valid_parentheses s="([)]": the unused 2nd call: 2.
    # points 1 + 1.5 + 2 + 2 = 6.5 of 1 + 3 + 2 + 2 = 8.
    assert correctness_reward(predicted, PASSWORD_TRUTH) == pytest.approx(6 * 6.5 / 8 - 3)  # 1.875
    assert correctness_reward(predicted, PASSWORD_TRUTH, 1.0) == pytest.approx(2 * 6.5 / 8 - 1)  # 0.625


@pytest.mark.parametrize(
    "response",
    [
        THINK + "\n<response> Here is the news. </response>",  # no tool call
        THINK + "\n<tool_call>\n{'name': 'GetNews', 'parameters': {'page': '1'}}\n</tool_call>",  # not JSON
        THINK + '\n<tool_call>\n{"name": "GetNews"}\n</tool_call>',  # no parameters
        THINK + '\n<tool_call>\n{"name": "GetNews", "parameters": ["1"]}\n</tool_call>',  # parameters not an object
        tool_calls(get_news("1"), get_news("2")).replace("}}\n", "}}\n\n"),  # a blank line between two calls
        THINK + "\n<tool_call>\n" + "[" * 100_000 + "\n</tool_call>",  # nests too deeply for json
        THINK + '\n<tool_call>\n{"name": "GetNews", "parameters": {"page": "1"}}',  # never closed
    ],
)
def test_a_missing_or_unparsable_tool_call_gets_the_lowest_correctness(response):
    assert correctness_reward(response, GET_NEWS_TRUTH) == -3.0
    assert correctness_reward(response, GET_NEWS_TRUTH, correctness_max=1.0) == -1.0


def test_correctness_is_zero_when_the_ground_truth_calls_no_tool():
    assert correctness_reward(THINK + "\n<response> ok </response>", RESPONSE_ONLY_TRUTH) == 0.0
    assert correctness_reward(tool_calls(get_news("1")), RESPONSE_ONLY_TRUTH) == 0.0


@pytest.mark.parametrize(
    "ground_truth",
    [
        "<think> x </think>\n<tool_call>\nGetNews(page=1)\n</tool_call>",
        "<think> x </think>\n<tool_call>\n" + json.dumps(get_news("1")),
    ],
)
def test_a_malformed_ground_truth_is_an_error_not_a_score(ground_truth):
    with pytest.raises(InvalidInput, match="labels"):
        correctness_reward(tool_calls(get_news("1")), ground_truth)


def test_list_overlap_is_multiset_intersection_over_union():
    assert list_overlap(["a", "b"], ["b", "a"]) == 1.0
    assert list_overlap(["a", "a", "b"], ["a", "c"]) == pytest.approx(1 / 4)  # common 1, union 3 + 2 - 1
    assert list_overlap(["a", "a"], ["a", "a", "a"]) == pytest.approx(2 / 3)
    assert list_overlap([], ["a"]) == 0.0
    assert list_overlap([], []) == 1.0


@pytest.mark.parametrize(
    "response, ground_truth, expected",
    [
        (tool_calls(get_news("1")), GET_NEWS_TRUTH, 1.0),
        (tool_calls(get_news("1"), get_news("2")), GET_NEWS_TRUTH, 1.0),  # several call lines are one block
        # no newline after </think>
        (THINK + "<tool_call>\n" + json.dumps(get_news("1")) + "\n</tool_call>", GET_NEWS_TRUTH, 0.0),
        (tool_calls(get_news("1")) + "\n<response> done </response>", GET_NEWS_TRUTH, 0.0),  # truth has no response
        # two <tool_call> blocks
        (tool_calls(get_news("1")) + "\n" + tool_calls(get_news("2"))[len(THINK) + 1 :], GET_NEWS_TRUTH, 0.0),
        ("<tool_call>\n" + json.dumps(get_news("1")) + "\n</tool_call>", GET_NEWS_TRUTH, 0.0),  # no thinking
        (THINK + "\n<response> The tool needs a text. </response>", RESPONSE_ONLY_TRUTH, 1.0),
        (THINK + "\n<response> a </response> <response> b </response>", RESPONSE_ONLY_TRUTH, 0.0),  # two responses
        (tool_calls(get_news("1")) + "\n<response> done </response>", RESPONSE_ONLY_TRUTH, 0.0),
        (tool_calls(get_news("1")) + "\n<response> done </response>", CALL_AND_RESPONSE_TRUTH, 1.0),
        (THINK, "<think> only thinking </think>", 1.0),
    ],
)
def test_format_follows_the_ground_truths_layout(response, ground_truth, expected):
    assert format_reward(response, ground_truth) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>" + " word" * 256 + "</think>\n<response> r </response>", 0.5),  # 256/512
        ("<think>" + " word" * 100 + "</think>", 0.2),  # round(100/512 = 0.195, 2)
        ("<think>" + " word" * 600 + "</think>", 1.0),  # capped
        ("<think> early </think> <think>" + " word" * 256 + "</think>", 0.5),  # the last <think> counts
        ("<think>" + " word" * 256, 0.0),  # never closed
        ("no thinking at all", 0.0),
    ],
)
def test_length_rewards_thinking_words_up_to_512(response, expected):
    assert length_reward(response) == expected


def test_extract_response_cuts_the_prompt_and_end_markers():
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert extract_response(prompt + "<think> a </think><|im_end|>", prompt) == "<think> a </think>"
    # A prompt that does not prefix the query (re-tokenised differently): the last assistant turn.
    chat = (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nold<|im_end|>\n"
        "<|im_start|>assistant\n new \n<|im_end|>\n<|endoftext|>"
    )
    assert extract_response(chat, "user: hi") == "new"
    with pytest.raises(InvalidInput, match="query"):
        extract_response("no chat markers", "another prompt")


def test_extract_response_stops_at_the_first_end_marker_as_toolrl():
    # A generation that did not stop at <|im_end|>: ToolRL scores only the text before it.
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    response = GET_NEWS_TRUTH + "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|endoftext|>"
    query = prompt + response
    toolrl = query.split("<|im_start|>assistant")[-1].split("<|im_end|>")[0].strip()
    assert extract_response(query, prompt) == toolrl == GET_NEWS_TRUTH
    assert extract_response(query, "not the prompt") == toolrl
    assert score_response(extract_response(query, prompt), GET_NEWS_TRUTH)[1] == 1.0
    assert extract_response(prompt + "a </s> b<|eot_id|>", prompt) == "a"


# rlla.py's customize_format_reward_func, as the reference writes it (regexes and tag counts).
REFERENCE_FORMAT_PATTERNS = {
    (False, True): r"^<think>.*?</think>\n<response>.*?</response>$",
    (True, False): r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>$",
    (True, True): r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>\n<response>.*?</response>$",
    (False, False): r"^<think>.*?</think>$",
}


def reference_format_reward(response: str, ground_truth: str) -> float:
    layout = ("<tool_call>" in ground_truth, "<response>" in ground_truth)
    if not re.search(REFERENCE_FORMAT_PATTERNS[layout], response, re.DOTALL):
        return 0.0
    tags = (["<tool_call>", "</tool_call>"] if layout[0] else []) + (["<response>", "</response>"] if layout[1] else [])
    return 1.0 if all(response.count(tag) == 1 for tag in tags) else 0.0


FORMAT_PIECES = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<response>", "</response>", "\n", "\n\n"]
FORMAT_PIECES += ["x", " ", "<", "think>", "</", "tool_call", "{}", "\r"]


def test_format_scan_equals_the_reference_regex():
    rng = random.Random(0)
    truths = [GET_NEWS_TRUTH, RESPONSE_ONLY_TRUTH, CALL_AND_RESPONSE_TRUTH, "<think> t </think>"]
    responses = [row["ground_truth"] for row in ROWS.values()]
    # Near-misses of well-formed responses: each piece deleted, doubled, or a newline added at either end.
    for text in list(responses):
        for piece in ["\n", "<think>", "</think>", "<tool_call>", "</tool_call>", "<response>", "</response>"]:
            responses += [text.replace(piece, "", 1), text.replace(piece, piece * 2, 1)]
        responses += [text + "\n", "\n" + text, text + "\n\n", text + " "]
    # Random sequences of tags, newlines and text, biased towards the layouts.
    for _ in range(20_000):
        responses.append("".join(rng.choice(FORMAT_PIECES) for _ in range(rng.randint(0, 14))))
    for _ in range(5_000):
        layouts = ["<think>a</think>\n<tool_call>\n{}\n</tool_call>", "<think>a</think>\n<response>b</response>"]
        layout = rng.choice(layouts)
        pieces = [layout] + [rng.choice(FORMAT_PIECES) for _ in range(rng.randint(0, 4))]
        rng.shuffle(pieces)
        responses.append("".join(pieces))
    matches = 0
    for response in responses:
        for truth in truths:
            expected = reference_format_reward(response, truth)
            assert format_reward(response, truth) == expected, (response, truth)
            matches += expected == 1.0
    assert matches > 1_000  # the inputs exercise both outcomes


def test_scorer_reports_a_bad_sample_by_index():
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    score = make_scorer()
    good = prompt + tool_calls(get_news("2")) + "<|im_end|>"
    assert score([good, good], [prompt, prompt], [GET_NEWS_TRUTH, RESPONSE_ONLY_TRUTH]) == {
        "correctness": [1.0, 0.0],
        "format": [1.0, 0.0],
        "length": [0.01, 0.01],
    }
    assert list(score([good], [prompt], [GET_NEWS_TRUTH])) == DIMENSIONS
    with pytest.raises(SampleError) as error:
        score([good, good], [prompt, prompt], [GET_NEWS_TRUTH, None])
    assert (error.value.index, error.value.field) == (1, "labels")
    assert str(error.value).startswith("labels[1]: ")
