"""A reward file for the worker-pool tests: each sample keeps its worker's CPU busy for `label`
seconds of wall time and scores that number. A request's scoring time is then set by the test, not
by how fast this machine parses LaTeX, so the tests mean the same on a fast, slow or loaded machine."""

import time


def reward_func(queries, prompts, labels):
    for seconds in labels:
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:  # busy, not asleep: the tests see the worker's CPU time rise
            pass
    return {"rewards": [float(seconds) for seconds in labels]}
