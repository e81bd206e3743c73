"""Run a reward server (any server with `GET /health` and a `--port` flag) as a local subprocess.

Used by `gd2po-analyze` (which starts its own servers and calls
`exit_on_sigterm`), the benchmarks and the tests, so that all of them start, wait for and stop a
server the same way.
"""

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

STARTUP_SECONDS = 60


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler's or `kill`'s stop) into SystemExit, so that the `with` blocks of a
    command that runs servers stop them; by default SIGTERM ends Python without running them."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_process(command: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `command --port P` on a free 127.0.0.1 port until the block ends; yield (base URL, process).

    Fails with the server's output if it exits, or does not answer GET /health within
    STARTUP_SECONDS. `env` replaces the environment when given.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Output goes to a file, not a pipe: a chatty server must never block on a full pipe.
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=log, stderr=log)
        try:
            wait_until_healthy(url, server, log)
            yield url, server
        finally:
            stop(server, timeout=10)


def stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_healthy(url: str, server: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server {url} exited with code {server.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"server {url} did not answer /health within {STARTUP_SECONDS} s:\n{tail(log)}")


def tail(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]
