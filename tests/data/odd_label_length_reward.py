"""A reward file whose groups carry signal only on some prompts, for dynamic sampling's tests: on a
prompt whose label is an odd number, the response's length in characters / 100 plus a checksum of
its characters (so two different responses almost surely score differently, even at equal length);
0.0 on an even label, so every group of an even-label prompt is constant."""

DIMENSIONS = ["odd_length"]


def score(response: str) -> float:
    return len(response) / 100 + sum(map(ord, response)) % 1000 / 1e6


def reward_func(queries, prompts, labels):
    values = [score(query[len(prompt):]) if int(label) % 2 else 0.0 for query, prompt, label in zip(queries, prompts, labels)]
    return {"rewards": values, "scores": values, "extra_logs": {"odd_length": values}}
