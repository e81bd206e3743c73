"""The GD²PO authors' API-Bank scoring rule (tool-calling/API_Bank/generate_deterministic.py for the
parsing, evaluate_reward.py for the scores and the per-level summary), reimplemented line by line.

It is deliberately more lenient than the toolcall reward server used in training: unparsable lines
inside the `<tool_call>` block are skipped, a row is correct when any call matches, and an object
without "name"/"parameters" counts as the parameters of the reference call.
"""

import json

MAX_REWARD_WORDS = 512  # evaluate_reward.py without SCHEDULELENGTH: think words / 512, capped at 1


def parse_tool_calls(output: str) -> list:
    """Every line of the first <tool_call> block that decodes as JSON (others are skipped)."""
    if "<tool_call>" not in output or "</tool_call>" not in output:
        return []
    block = output.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0].strip()
    calls = []
    for line in block.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            calls.append(json.loads(line))
        except ValueError:
            pass
    return calls


def reference_call(answer) -> dict | None:
    """The call to match (the first of a list), or None when the row cannot be scored."""
    call = answer[0] if isinstance(answer, list) and answer else answer
    if isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("parameters"), dict):
        return call
    return None


def correctness(calls: list, answer) -> int | None:
    """1 if any call matches the reference (name and parameters equal), 0 if none, None if unscorable.

    As in the authors' code, a call that is a JSON string is decoded once more, and the scan runs
    inside one `try` whose `except` returns 0: a call that is a number or null, or a string that is
    not JSON, ends it with 0 even when a later call would match.
    """
    reference = reference_call(answer)
    if reference is None:
        return None
    for call in calls:
        try:
            call = json.loads(call) if isinstance(call, str) else call
            if "name" not in call or "parameters" not in call:
                name, parameters = reference["name"], call  # a parameters-only object
            else:
                name, parameters = call["name"], call["parameters"]
        except (ValueError, TypeError):
            return 0
        if name == reference["name"] and parameters == reference["parameters"]:
            return 1
    return 0


def format_errors(output: str) -> list[str]:
    """The authors' validate_output_format: [] when the output is well formed."""
    text = output.strip() if isinstance(output, str) else ""
    if not text:
        return ["empty_output"]
    errors = []
    for tag in ("think", "tool_call", "response"):
        opened, closed = text.count(f"<{tag}>"), text.count(f"</{tag}>")
        if opened != closed:
            errors.append(f"unbalanced_{tag}_tags")
        if opened > 1:
            errors.append(f"multiple_{tag}_blocks")
    if errors:
        return sorted(set(errors))
    think_start, think_end = text.find("<think>"), text.find("</think>")
    if think_start < 0 or think_end < 0:
        return ["missing_think"]
    if think_end <= think_start:
        return ["invalid_think_order"]
    think_close = think_end + len("</think>")
    tool_start, tool_end = text.find("<tool_call>"), text.find("</tool_call>")
    response_start, response_end = text.find("<response>"), text.find("</response>")
    has_tool_call, has_response = tool_start >= 0, response_start >= 0
    if not has_tool_call and not has_response:
        return ["missing_tool_call_and_response"]
    if has_tool_call:
        if tool_end <= tool_start:
            errors.append("invalid_tool_call_order")
        if tool_start < think_close:
            errors.append("tool_call_before_think_end")
    if has_response:
        if response_end <= response_start:
            errors.append("invalid_response_order")
        if response_start < think_close:
            errors.append("response_before_think_end")
    if has_tool_call and has_response and response_start < tool_end:
        errors.append("response_before_tool_call_end")
    if has_tool_call and has_response and response_end < tool_start:
        errors.append("tool_call_after_response")
    return sorted(set(errors))


def length_score(output: str) -> tuple[float, int]:
    """(min(round(think words / 512, 2), 1), think words); (0, 0) without a <think>...</think>."""
    start, end = output.find("<think>"), output.find("</think>")
    if start < 0 or end < 0 or end <= start:
        return 0.0, 0
    words = len(output[start + len("<think>") : end].strip().split())
    return min(round(words / MAX_REWARD_WORDS, 2), 1.0), words


def score_sample(output: str, answer) -> dict:
    calls = parse_tool_calls(output)
    errors = format_errors(output)
    length, think_words = length_score(output)
    return {"tool_calls": calls, "correct": correctness(calls, answer), "format": int(not errors),
            "format_errors": errors, "length": length, "think_words": think_words}  # fmt: skip


def summarize(samples: list[dict]) -> dict:
    """Accuracy % over the scorable rows, format % over all rows, mean length score (the authors' rounding)."""
    scored = [s for s in samples if s["correct"] is not None]
    return {
        "total": len(samples),
        "scored": len(scored),
        "correct": sum(s["correct"] for s in scored),
        "accuracy": round(100 * sum(s["correct"] for s in scored) / len(scored), 2) if scored else None,
        "format": round(100 * sum(s["format"] for s in samples) / len(samples), 2) if samples else None,
        "length": round(sum(s["length"] for s in samples) / len(samples), 4) if samples else None,
    }
