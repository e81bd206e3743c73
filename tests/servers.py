"""Start a real reward server for a test: `with running_server(["length", "--target-length", "10"]) as url:`."""

import contextlib
import os
import sys
from collections.abc import Iterator

from reward_servers.local import free_port, running_process  # noqa: F401  (used by the tests)


@contextlib.contextmanager
def running_server(task_args: list[str], api_key: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python -m reward_servers <task_args...> --port P` until the block ends; yield its base URL.

    `env` adds variables to this process's environment, from which GD2PO_REWARD_API_KEY is
    dropped so that only `api_key` or `env` turn authentication on.
    """
    command = [sys.executable, "-m", "reward_servers", *task_args]
    if api_key is not None:
        command += ["--api-key", api_key]
    server_env = {name: value for name, value in os.environ.items() if name != "GD2PO_REWARD_API_KEY"} | (env or {})
    with running_process(command, server_env) as (url, _):
        yield url
