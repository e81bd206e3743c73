"""An example reward file: copy it, edit reward_func, and use it as two GD²PO reward dimensions.

In OpenRLHF's convention (the same file works with OpenRLHF's `--reward.remote_url answer_reward.py`):
`reward_func(queries, prompts, labels)` gets one batch, where each query is the prompt followed by
the model's response, and returns one value per sample for each dimension named in DIMENSIONS.

    correctness: 1.0 if the text in the last <answer>...</answer> equals the label, else 0.0
    brevity:     -(response length in characters) / 1000, so shorter responses score higher
"""

DIMENSIONS = ["correctness", "brevity"]


def final_answer(response: str) -> str | None:
    """The text inside the last <answer>...</answer>, or None. Two rfind calls: linear time on any input."""
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    return response[start + len("<answer>") : end].strip()


def reward_func(queries, prompts, labels):
    correctness, brevity = [], []
    for query, prompt, label in zip(queries, prompts, labels):
        response = query[len(prompt) :] if query.startswith(prompt) else query
        answer = final_answer(response)
        correctness.append(1.0 if label is not None and answer == str(label).strip() else 0.0)
        brevity.append(-len(response) / 1000)
    return {
        "rewards": correctness,  # what OpenRLHF itself would train on
        "scores": correctness,
        "extra_logs": {"correctness": correctness, "brevity": brevity},
    }
