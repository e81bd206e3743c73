"""Reward servers under hostile samples, and math throughput by worker count.

    flock /tmp/bench.lock python benchmarks/bench_reward_servers.py

Table 1, the worst case for one hostile sample, before and after:
- toolcall: a looping response cut off mid-loop, against a ground truth with a tool call and a
  response. "before" is rlla.py's format regex alone (what the server ran before the linear
  scan; the rest of the sample's scoring was already linear), timed in a subprocess that is
  stopped after --regex-limit seconds; "after" is the whole sample: score_response (correctness,
  format by the scan, length).
- math: LaTeX that sympy evaluates for a long time. "before" is math-verify with its own
  timeouts (5 s per parse and per comparison, as the server used them); "after" is the scorer
  with its per-sample limit (--sample-timeout, 5 s by default).
Table 2: math samples/s through real `python -m reward_servers math --workers N` servers on
127.0.0.1, 1 and 2 workers side by side in one run (requests of 256 samples, 4 in flight).
"""

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reward_servers.local import running_process  # noqa: E402

TRUTH = '<think> t </think>\n<tool_call>\n{"name": "a", "parameters": {}}\n</tool_call>\n<response> r </response>'
LOOP = '</think>\n<tool_call>\n{"name": "a"}\n</tool_call>\n<response> x </response>'
RLLA_REGEX = r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>\n<response>.*?</response>$"
SLOW_LATEX = {
    "power tower 9^9^9^9^9": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "(10^10)!": "\\boxed{(10^{10})!}",
    "300 nested \\frac": "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "5000 open parentheses": "\\boxed{" + "(" * 5000 + "}",
}


def looping_response(size: int) -> str:
    return ("<think>" + LOOP * (size // len(LOOP) + 1))[:size]


def regex_seconds(text: str) -> None:
    import re

    re.search(RLLA_REGEX, text, re.DOTALL)


def timed_in_subprocess(function, argument, limit: float) -> float | None:
    """Seconds `function(argument)` takes in a fresh process, or None past `limit`."""
    process = multiprocessing.get_context("spawn").Process(target=function, args=(argument,))
    start = time.monotonic()
    process.start()
    process.join(limit)
    if process.is_alive():
        process.kill()
        process.join()
        return None
    return time.monotonic() - start


def math_verify_before(response: str) -> None:
    from math_verify import parse, verify

    verify(parse("\\boxed{1}", parsing_timeout=5), parse(response, parsing_timeout=5), timeout_seconds=5)


def hostile_rows(regex_limit: float) -> list[tuple[str, str, str]]:
    from reward_servers.math_answer import make_scorer
    from reward_servers.toolcall import score_response

    rows = []
    for size in [8_000, 16_000, 36_000, 1_000_000]:
        text = looping_response(size)
        if size > 36_000:
            before_text = "not run (> the 36 KB row)"
        else:
            before = timed_in_subprocess(regex_seconds, text, regex_limit)
            before_text = f"> {regex_limit:g} s (stopped)" if before is None else f"{before:.2f} s (incl. process start)"
        start = time.monotonic()
        score_response(text, TRUTH)
        after = time.monotonic() - start
        rows.append((f"toolcall, looping response of {size / 1000:g} KB", before_text, f"{after * 1000:.2f} ms"))
    score = make_scorer(sample_timeout=5.0)
    for name, latex in SLOW_LATEX.items():
        before = timed_in_subprocess(math_verify_before, latex, 120)
        start = time.monotonic()
        score([latex], [""], ["1"])
        after = time.monotonic() - start
        # The subprocess time includes starting Python and importing math-verify; shown as measured.
        rows.append((f"math, {name}", f"{before:.2f} s (incl. process start)", f"{after:.2f} s"))
    return rows


async def samples_per_second(url: str, samples: int, batch_size: int, in_flight: int) -> float:
    prompt = "<|im_start|>user\nWhat is the answer?<|im_end|>\n<|im_start|>assistant\n"
    batches = []
    for start in range(0, samples, batch_size):
        numbers = range(start, min(start + batch_size, samples))
        batches.append(
            {
                "query": [f"{prompt}The answer is \\boxed{{{n % 97}}}.<|im_end|>" for n in numbers],
                "prompts": [prompt] * len(numbers),
                "labels": [str(n % 89) for n in numbers],
            }
        )
    limit = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession() as session:

        async def send(batch):
            async with limit, session.post(f"{url}/get_reward", json=batch) as answer:
                assert answer.status == 200, await answer.text()
                await answer.json()

        await send(batches[0])  # warm-up
        start = time.monotonic()
        await asyncio.gather(*(send(batch) for batch in batches))
        return samples / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regex-limit", type=float, default=120.0, help="stop the old regex after this many seconds")
    parser.add_argument("--samples", type=int, default=8192, help="math samples per throughput run")
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per worker count, alternating")
    args = parser.parse_args()

    print("| hostile sample | before | after |\n|---|---|---|")
    for row in hostile_rows(args.regex_limit):
        print("| " + " | ".join(row) + " |", flush=True)

    rates = {1: [], 2: []}
    env = {name: value for name, value in os.environ.items() if name != "GD2PO_REWARD_API_KEY"}
    command = [sys.executable, "-m", "reward_servers", "math", "--workers"]
    with running_process(command + ["1"], env) as (one, _), running_process(command + ["2"], env) as (two, _):
        for _ in range(args.rounds):
            for workers, url in ((1, one), (2, two)):
                rates[workers].append(asyncio.run(samples_per_second(url, args.samples, 256, 4)))
    print("\n| math workers | samples/s (each round) | best |\n|---|---|---|")
    for workers, values in rates.items():
        print(f"| {workers} | {', '.join(f'{value:.0f}' for value in values)} | {max(values):.0f} |")
    print(f"\n2 workers / 1 worker (best of each): {max(rates[2]) / max(rates[1]):.2f}x")


if __name__ == "__main__":
    main()
