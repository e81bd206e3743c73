"""Ray Serve: one reward task and one batch scored three ways, side by side in one run.

    flock /tmp/bench.lock python benchmarks/bench_serve.py     # 256 samples in requests of 64, 5 alternating repeats
    python benchmarks/bench_serve.py --quick                    # 64 samples in requests of 32, one repeat

The task is the real `math` server (math-verify, a few ms of CPU per sample), one scoring worker per server or
replica, scored with `fetch_rewards` (openrlhf_gd2po/reward_client.py, what the trainer calls) against:
  standalone  `python -m reward_servers math --workers 1 --port P`, over HTTP;
  route       the same app deployed by the real CLI, `... --ray-serve NAME`, over HTTP through Serve's proxy
              (the URL the CLI prints: the proxy port is the first CLI's `--port`);
  handle      `serve:NAME`, the DeploymentHandle path (openrlhf_gd2po/reward_serve.py), no HTTP;
with NAME deployed once with 1 replica and once with 2 (`--replicas 2`). Everything runs on a Ray of its own
(`ray.init` here, its own temp dir, random ports) and is stopped at the end, on failure too. The rewards of
every path are checked to equal the standalone server's before anything is reported. "speed-up" is the
standalone server's median wall time over the row's; "1-sample ms" the median wall time of a fetch of one
sample: the per-request cost of each path when scoring costs almost nothing.
"""

import argparse
import contextlib
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from openrlhf_gd2po.reward_client import fetch_rewards
from openrlhf_gd2po.reward_spec import parse_reward_servers
from reward_servers.local import free_port, running_process, stop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster_steps import cpu_name  # noqa: E402

TASK = ["math", "--workers", "1"]  # one scorer process per server or replica, so replicas = cores used
DEPLOY_SECONDS = 180  # a replica's worker imports sympy; on a loaded 2-core machine that takes a while
LATENCY_CALLS = 5  # one-sample fetches per path per repeat


def make_samples(n: int) -> tuple[list[str], list[str], list[str]]:
    """Chat-formatted math answers of about 1 KB, a third wrong and a fifth without \\boxed, so that the
    rewards differ between samples and a path that mixed them up would not compare equal."""
    prompts, queries, labels = [], [], []
    for i in range(n):
        prompt = f"<|im_start|>user\nProblem {i}: add the terms of the series. <|im_end|>\n<|im_start|>assistant\n"
        answer = f"{i % 50}" if i % 5 else f"x^{i % 7}+{i % 11}"  # some answers are expressions, not numbers
        final = f"\\boxed{{{answer}}}" if i % 5 != 4 else f"The answer is {answer}."
        prompts.append(prompt)
        queries.append(prompt + "Step: add the next term and simplify. " * (20 + i % 9) + final + "<|im_end|>")
        labels.append(answer if i % 3 else f"{i % 50 + 1}")
    return queries, prompts, labels


def spec(target: str) -> str:
    """The `--reward.servers` value reading both of the math server's dimensions from one target."""
    return f"correctness={target}#correctness,format={target}#format"


@contextlib.contextmanager
def local_ray(num_cpus: int):
    """A Ray of our own for the Serve CLIs to join; its address. A short temp dir: Ray's socket paths must stay
    under the 107-character limit of a Unix socket name."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rb_", dir="/tmp")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        from ray import serve

        with contextlib.suppress(Exception):  # Serve may never have started (a failed first deploy)
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def serve_cli(name: str, replicas: int, port: int, env: dict):
    """The real CLI in the foreground until the block ends (SIGTERM: it deletes its application); yields the
    route URL it prints once the application runs."""
    command = [sys.executable, "-m", "reward_servers", *TASK, "--num-cpus", "1", "--ray-serve", name,
               "--replicas", str(replicas), "--port", str(port)]  # --port: Serve's, if it is not running yet
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            lines = queue.Queue()  # readline in a thread, so that a deploy that never finishes is bounded
            threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
            try:
                line = lines.get(timeout=DEPLOY_SECONDS)
            except queue.Empty:
                line = ""
            if '"url"' not in line:
                log.seek(0)
                raise RuntimeError(f"--ray-serve {name} printed no URL within {DEPLOY_SECONDS} s "
                                   f"(exit code {process.poll()}):\n{log.read()[-3000:]}")
            yield line.split('"url": "', 1)[1].split('"', 1)[0]
        finally:
            stop(process, timeout=60)  # serve.delete waits for the replicas to drain


def fetch(target: str, samples, batch_size: int) -> tuple[float, torch.Tensor]:
    """(wall seconds, rewards) of one fetch_rewards call, as the trainer makes it."""
    queries, prompts, labels = samples
    dimensions = parse_reward_servers(spec(target))
    started = time.perf_counter()
    batch = fetch_rewards(dimensions, queries, prompts, labels, batch_size=batch_size)
    return time.perf_counter() - started, batch.rewards


def measure(paths: dict, samples, batch_size: int, repeats: int) -> tuple[dict, torch.Tensor]:
    """({path: ([batch seconds], [one-sample seconds])}, the rewards), the paths alternating in every repeat, so
    that a load spike on the shared machine hits all of them. Every answer must equal the standalone server's
    (the first path's)."""
    cases = {"batch": (samples, batch_size), "one": (tuple(column[:1] for column in samples), 1)}
    expected = {}

    def checked(label, case):
        seconds, rewards = fetch(paths[label], *cases[case])
        if not torch.equal(rewards, expected.setdefault(case, rewards)):
            raise AssertionError(f"{label}: rewards differ from the standalone server's")
        return seconds

    for label in paths:  # warm-up: connections, the handles' routers, every replica's worker
        for case in cases:
            checked(label, case)
    times = {label: ([], []) for label in paths}
    for _ in range(repeats):
        for label in paths:
            times[label][0].append(checked(label, "batch"))
            times[label][1].extend(checked(label, "one") for _ in range(LATENCY_CALLS))
    return times, expected["batch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 samples in requests of 32, one repeat")
    parser.add_argument("--samples", type=int, help="samples per fetch (default 256, quick 64)")
    parser.add_argument("--batch-size", type=int, help="samples per request (default 64, quick 32)")
    parser.add_argument("--repeats", type=int, help="alternating repeats (default 5, quick 1)")
    args = parser.parse_args()
    n = args.samples or (64 if args.quick else 256)
    batch_size = args.batch_size or (32 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 5)
    samples = make_samples(n)
    # Loopback needs no key; one left in the environment would make the servers ask for it. Our own Ray, not
    # a cluster $RAY_ADDRESS may name.
    for variable in ("GD2PO_REWARD_API_KEY", "RAY_ADDRESS"):
        os.environ.pop(variable, None)

    load_before = os.getloadavg()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        standalone, _ = stack.enter_context(running_process([sys.executable, "-m", "reward_servers", *TASK]))
        env = dict(os.environ, RAY_ADDRESS=stack.enter_context(local_ray(num_cpus=3)))  # 1 + 2 replicas
        port = free_port()
        # One after the other: the first CLI starts Serve's proxy on `port`, the second finds it running.
        route1 = stack.enter_context(serve_cli("bench_r1", 1, port, env))
        route2 = stack.enter_context(serve_cli("bench_r2", 2, port, env))
        setup_seconds = time.perf_counter() - started
        # A route URL has a path (/NAME), so the client would not add /get_reward to it by itself.
        paths = {("standalone HTTP", 1): f"{standalone}/get_reward", ("Serve route", 1): f"{route1}/get_reward",
                 ("Serve handle", 1): "serve:bench_r1", ("Serve handle", 2): "serve:bench_r2",
                 ("Serve route", 2): f"{route2}/get_reward"}
        times, rewards = measure(paths, samples, batch_size, repeats)
    load_after = os.getloadavg()

    print(f"math, {n} samples in {-(-n // batch_size)} requests of {batch_size}, 1 scoring worker per server or "
          f"replica; {cpu_name()}, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1-min); median of {repeats} alternating repeat(s), "
          f"{repeats * LATENCY_CALLS} one-sample fetches per path; setup {setup_seconds:.0f} s.")
    print(f"rewards equal on every path: correctness mean {rewards[:, 0].mean():.3f}, "
          f"format mean {rewards[:, 1].mean():.3f}\n")
    print(f"{'path':16s} {'replicas':>8s} {'wall s':>7s} {'min s':>7s} {'max s':>7s} {'samples/s':>9s} "
          f"{'speed-up':>8s} {'1-sample ms':>11s}")
    print("-" * 81)
    base = statistics.median(times[("standalone HTTP", 1)][0])
    for (label, replicas), (walls, single) in times.items():
        median = statistics.median(walls)
        print(f"{label:16s} {replicas:8d} {median:7.3f} {min(walls):7.3f} {max(walls):7.3f} {n / median:9.0f} "
              f"{base / median:8.2f} {1000 * statistics.median(single):11.1f}")


if __name__ == "__main__":
    main()
