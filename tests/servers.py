"""Start a real reward server for a test: `with running_server(["length", "--target-length", "10"]) as url:`."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_SECONDS = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(task_args: list[str], api_key: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python -m reward_servers <task_args...> --port P` until the block ends; yield its base URL.

    `env` adds variables to this process's environment, from which GD2PO_REWARD_API_KEY is
    dropped so that only `api_key` or `env` turn authentication on.
    """
    command = [sys.executable, "-m", "reward_servers", *task_args]
    if api_key is not None:
        command += ["--api-key", api_key]
    with running_process(command, env) as (url, _):
        yield url


@contextlib.contextmanager
def running_process(command: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `command --port P` (any server with GET /health) until the block ends; yield (base URL, process).

    Fails with the server's stderr if it exits or does not answer GET /health within
    STARTUP_TIMEOUT_SECONDS.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = {name: value for name, value in os.environ.items() if name != "GD2PO_REWARD_API_KEY"} | (env or {})
    # stderr goes to a file, not a pipe: a chatty server must never block on a full pipe.
    with tempfile.TemporaryFile() as stderr:
        server = subprocess.Popen(
            [*command, "--port", str(port)], cwd=REPO_ROOT, env=server_env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            wait_until_healthy(url, server, stderr)
            yield url, server
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_until_healthy(url: str, server: subprocess.Popen, stderr) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"reward server exited with code {server.returncode}:\n{read_all(stderr)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"reward server not healthy after {STARTUP_TIMEOUT_SECONDS} s:\n{read_all(stderr)}")


def read_all(stream) -> str:
    stream.seek(0)
    return stream.read().decode(errors="replace")
