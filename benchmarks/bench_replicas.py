"""Replicas: one CPU-bound reward dimension served by 1 and by 2 replicas, side by side in one run.

    flock /tmp/bench.lock python benchmarks/bench_replicas.py          # 2,048 samples, 5 alternating repeats
    python benchmarks/bench_replicas.py --quick                        # 256 samples, one repeat (~10 s)

Two real uvicorn servers on 127.0.0.1 (benchmarks/sleepy_reward_server.py --burn: the real
`reward_servers` app around a scorer that spends `fixed_ms + n * per_sample_ms` of CPU time in a
busy loop per request, one request at a time). `fetch_rewards` scores the same samples against
`name=A` (1 replica) and `name=A|B` (2 replicas), alternating, and the median of each is reported.
Each replica is one process running on at most one core, so on a 2-core machine the ideal is 2x;
the client, the second server's event loop and anything else running on the machine share those
cores. Two controls in the same run: the same servers with the cost spent asleep instead of on
the CPU (the client's spreading alone: ideal 2x whatever the machine's load), and two plain
busy-loop processes at once against one after the other (how many free cores the machine had).
The rewards are checked against the servers' formula before anything is reported.
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from openrlhf_gd2po.reward_client import fetch_rewards
from openrlhf_gd2po.reward_spec import RewardDimension
from reward_servers.local import running_process

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_reward_stage import MAX_IN_FLIGHT, make_samples, time_fetch_rewards  # noqa: E402

FIXED_MS, PER_SAMPLE_MS = 5.0, 1.0  # CPU per request: a rule-based scorer's order of magnitude
BATCH_SIZE = 64  # 8 in flight per replica (MAX_IN_FLIGHT), as bench_reward_stage


BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end:\n    pass\n"


def machine_parallelism(seconds: float = 1.0) -> float:
    """Control without any server: wall time of one busy-loop process over that of two at once, x2.
    2.0 when the machine has two free cores for us, 1.0 when two processes take as long as one after
    the other. It bounds what any 2-replica speed-up can be at that moment."""
    def run(copies):
        started = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)]) for _ in range(copies)]
        for process in processes:
            process.wait()
        return time.perf_counter() - started

    return 2 * run(1) / run(2)


def cpu_seconds(pids) -> float:
    """User + system CPU time the processes have used so far (/proc/PID/stat, Linux)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / os.sysconf("SC_CLK_TCK")


def time_fetch(dimension, samples, server_pids) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) of one fetch."""
    cpu_before = cpu_seconds(server_pids)
    seconds = time_fetch_rewards([dimension], samples, batch_size=BATCH_SIZE)
    return seconds, cpu_seconds(server_pids) - cpu_before


def time_replicas(burn: bool, samples, repeats) -> dict:
    """{1: [(wall, server CPU)...], 2: [...]}: the same fetch on one replica and on two, alternating."""
    command = [sys.executable, str(HERE / "sleepy_reward_server.py"), "--fixed-ms", str(FIXED_MS),
               "--per-sample-ms", str(PER_SAMPLE_MS), *(["--burn"] if burn else [])]
    with contextlib.ExitStack() as stack:
        a, server_a = stack.enter_context(running_process(command))
        b, server_b = stack.enter_context(running_process(command))
        pids = [server_a.pid, server_b.pid]
        one = RewardDimension("reward", f"{a}/get_reward", None)
        two = RewardDimension("reward", f"{a}/get_reward|{b}/get_reward", None)
        fetch_rewards([two], *make_samples(2))  # warm-up: connections, lazy imports, both replicas
        times = {1: [], 2: []}
        for _ in range(repeats):  # alternating, so a load spike on the shared machine hits both
            times[1].append(time_fetch(one, samples, pids))
            times[2].append(time_fetch(two, samples, pids))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 samples, one repeat")
    parser.add_argument("--samples", type=int, help="samples per fetch (default 2048, quick 256)")
    parser.add_argument("--repeats", type=int, help="alternating repeats per mode (default 5, quick 1)")
    args = parser.parse_args()
    n = args.samples or (256 if args.quick else 2048)
    repeats = args.repeats or (1 if args.quick else 5)
    samples = make_samples(n)

    load_before = os.getloadavg()[0]
    parallelism = [machine_parallelism()]
    # The CPU-bound server is the question; the sleeping one (the same cost as a sleep, as a GPU
    # server's wait would be) shows what the client's spreading gives when the replicas have room.
    times = {kind: time_replicas(kind == "cpu", samples, repeats) for kind in ("cpu", "sleep")}
    load_after = os.getloadavg()[0]
    parallelism.append(machine_parallelism())

    batches = -(-n // BATCH_SIZE)
    cost_seconds = (batches * FIXED_MS + n * PER_SAMPLE_MS) / 1000
    print(f"{n} samples in {batches} batches of {BATCH_SIZE}, {MAX_IN_FLIGHT} in flight per replica; "
          f"{FIXED_MS:g} ms + {PER_SAMPLE_MS:g} ms/sample per request ({cost_seconds:.2f} s in all), spent as CPU "
          f"(cpu) or asleep (sleep); {os.cpu_count()} CPUs, load average {load_before:.1f} before, "
          f"{load_after:.1f} after; median of {repeats} alternating run(s).\n")
    # "server cores": CPU seconds the servers got per wall second. On an idle machine 1 CPU-bound
    # replica gets about 1 core and 2 replicas about 2; less means the rest of the machine took them.
    print(f"{'server':>6s} {'replicas':>8s} {'wall s':>8s} {'min s':>8s} {'max s':>8s} {'samples/s':>10s} "
          f"{'speed-up':>9s} {'server cores':>12s}")
    print("-" * 76)
    for kind, by_replicas in times.items():
        base = statistics.median(wall for wall, _ in by_replicas[1])
        for replicas in (1, 2):
            walls = [wall for wall, _ in by_replicas[replicas]]
            median = statistics.median(walls)
            cores = statistics.median(cpu / wall for wall, cpu in by_replicas[replicas])
            print(f"{kind:>6s} {replicas:8d} {median:8.2f} {min(walls):8.2f} {max(walls):8.2f} {n / median:10.0f} "
                  f"{base / median:9.2f} {cores:12.2f}")
    print(f"\ncontrol, no servers: two busy-loop processes at once ran {parallelism[0]:.2f}x (before) and "
          f"{parallelism[1]:.2f}x (after) as fast as one after the other (2.00 = two free cores)")


if __name__ == "__main__":
    main()
