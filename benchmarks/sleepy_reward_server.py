"""A reward server with a simulated compute cost, for benchmarking the reward stage.

    python benchmarks/sleepy_reward_server.py --port 8001 --fixed-ms 50 --per-sample-ms 2

Cost model: a request of n samples holds the server for `fixed_ms + n * per_sample_ms`, and the
server scores one request at a time (a lock), as a GPU reward model runs one batch at a time;
k requests in flight therefore finish after k * (fixed_ms + n * per_sample_ms) in all. The cost
is a sleep, not real compute, so a 2-core machine running three servers and a client is not the
bottleneck being measured. Everything around the sleep is the real `reward_servers` app (same
protocol, validation and JSON): POST /get_reward {query, prompts, labels} ->
{rewards, scores, extra_logs}, GET /health.

With `--burn` the cost is CPU time spent in a busy loop instead of a sleep: a CPU-bound server, as
a rule-based scorer is (benchmarks/bench_replicas.py).

The reward of a sample is `reward_for(query)`, so a benchmark can check what came back.
"""

import argparse
import sys
import threading
import time
from pathlib import Path

import uvicorn

# Run as a script, so the repository root (home of reward_servers) is not on the path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reward_servers.app import create_app  # noqa: E402


def reward_for(query: str) -> float:
    return (len(query) % 97) / 97


def make_sleepy_scorer(dimension: str, fixed_ms: float, per_sample_ms: float, burn: bool = False):
    # The app runs scorers in a thread pool; the lock makes requests wait their turn.
    one_at_a_time = threading.Lock()

    def score(queries, prompts, labels):
        seconds = (fixed_ms + len(queries) * per_sample_ms) / 1000
        with one_at_a_time:
            if burn:  # a fixed amount of CPU time, so a busy machine stretches it as it would real work
                end = time.thread_time() + seconds
                while time.thread_time() < end:
                    pass
            else:
                time.sleep(seconds)
        return {dimension: [reward_for(query) for query in queries]}

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dimension", default="reward", help="name of the served dimension")
    parser.add_argument("--fixed-ms", type=float, required=True, help="cost of each request")
    parser.add_argument("--per-sample-ms", type=float, required=True, help="cost of each sample in a request")
    parser.add_argument("--burn", action="store_true", help="spend the cost as CPU time (a busy loop), not a sleep")
    args = parser.parse_args()
    scorer = make_sleepy_scorer(args.dimension, args.fixed_ms, args.per_sample_ms, args.burn)
    app = create_app("sleepy", [args.dimension], scorer)
    # No access log: one line per request would cost the per-sample baseline most.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
