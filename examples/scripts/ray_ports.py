"""Ports for a Ray node of our own beside other Ray nodes and servers on one machine (the tiny real runs,
the Ray job tests). Run as a script (`ray_ports.py [N]`), it prints the `ray start` flags on one line and
N more free ports for the node's servers on a second.

Every component gets a free port of its own, found with all probe sockets open at once so that no two
are the same. Worker ports come from a range below the kernel's ephemeral range: ports the kernel hands
out for `bind(port 0)` cluster together, and a worker range drawn from them overlapped another
component's port in two of three runs ("worker_ports is trying to use a port number ... that is used by
other components").
"""

import contextlib
import random
import socket
import sys

COMPONENT_FLAGS = ["--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
                   "--object-manager-port", "--runtime-env-agent-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--metrics-export-port"]  # fmt: skip
LOWEST_WORKER_PORT = 10002  # Ray's own default --min-worker-port


def ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def worker_port_range(width: int, tries: int = 200) -> tuple[int, int]:
    """`width` consecutive bindable ports below the ephemeral range, from a random start (so that two
    nodes started side by side rarely try the same range)."""
    highest_start = ephemeral_low() - width
    for _ in range(tries):
        low = random.randint(LOWEST_WORKER_PORT, highest_start)
        if all(bindable(port) for port in range(low, low + width)):
            return low, low + width - 1
    raise RuntimeError(f"no {width} free consecutive ports in {LOWEST_WORKER_PORT}..{highest_start + width}")


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (each probe stays bound until all are found)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def ray_port_flags(extra_ports: int = 0, worker_ports: int = 61) -> tuple[list[str], list[int]]:
    """(`ray start` port flags, `extra_ports` more ports distinct from all of them)."""
    ports = free_ports(len(COMPONENT_FLAGS) + extra_ports)
    flags = [str(word) for flag, port in zip(COMPONENT_FLAGS, ports) for word in (flag, port)]
    low, high = worker_port_range(worker_ports)
    return flags + ["--min-worker-port", str(low), "--max-worker-port", str(high)], ports[len(COMPONENT_FLAGS):]


if __name__ == "__main__":
    flags, extra = ray_port_flags(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(" ".join(flags))
    print(" ".join(map(str, extra)))
