"""Start a real reward server for a test: `with running_server(["length", "--target-length", "10"]) as url:`."""

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from reward_servers.api_key import API_KEY_ENV, API_KEY_FILE_ENV
from reward_servers.local import free_port, running_process  # noqa: F401  (used by the tests)

KEY_VARIABLES = (API_KEY_ENV, API_KEY_FILE_ENV)


@contextlib.contextmanager
def running_server(task_args: list[str], api_key: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python -m reward_servers <task_args...> --port P` until the block ends; yield its base URL.

    `api_key` goes to the server as users give it: in a key file that GD2PO_REWARD_API_KEY_FILE names.
    `env` adds variables to this process's environment, from which both key variables are dropped so
    that only `api_key` or `env` turn authentication on.
    """
    command = [sys.executable, "-m", "reward_servers", *task_args]
    server_env = {name: value for name, value in os.environ.items() if name not in KEY_VARIABLES} | (env or {})
    with tempfile.TemporaryDirectory() as folder:
        if api_key is not None:
            key_file = Path(folder) / "reward_key"
            key_file.write_text(api_key + "\n")
            server_env[API_KEY_FILE_ENV] = str(key_file)
        with running_process(command, server_env) as (url, process):
            if api_key is not None:  # nowhere in what `ps` shows
                assert all(api_key not in arg for arg in psutil.Process(process.pid).cmdline())
            yield url


@contextlib.contextmanager
def running_servers(*task_args: list[str]) -> Iterator[list[str]]:
    """Several `running_server`s, started side by side (each start is seconds of imports); yields their URLs."""
    servers = [running_server(args) for args in task_args]
    with ThreadPoolExecutor(len(servers)) as pool:
        starts = [pool.submit(server.__enter__) for server in servers]
    with contextlib.ExitStack() as stack:
        for server, start in zip(servers, starts):
            if start.exception() is None:
                stack.push(server.__exit__)
        yield [start.result() for start in starts]  # the first failure raises, and the started ones stop
