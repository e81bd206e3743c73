"""A reward file whose groups carry signal only on some prompts, for dynamic sampling's tests: on a
prompt whose label is an odd number, the response's length in characters / 100 plus a checksum of
its characters (so two different responses almost surely score differently, even at equal length);
0.0 on an even label, so every group of an even-label prompt is constant.

With $ODD_LENGTH_DIE_MARKER set (a path; test_train_resume.py's masked run), the first call scores and leaves
the marker, and the next one kills its server and scoring worker (their process group, as an OOM kill would):
the second request fails every time, where a test that waits to see the first and then kills the server
was too late under load (both requests had been scored)."""

import os
import signal

DIMENSIONS = ["odd_length"]


def score(response: str) -> float:
    return len(response) / 100 + sum(map(ord, response)) % 1000 / 1e6


def reward_func(queries, prompts, labels):
    marker = os.environ.get("ODD_LENGTH_DIE_MARKER")
    if marker and os.path.exists(marker):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    if marker:
        open(marker, "w").close()
    values = [score(query[len(prompt):]) if int(label) % 2 else 0.0 for query, prompt, label in zip(queries, prompts, labels)]
    return {"rewards": values, "scores": values, "extra_logs": {"odd_length": values}}
