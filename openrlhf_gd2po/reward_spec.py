"""`--reward.servers` as RewardDimensions: its grammar (SPEC_FORMAT), checked where the flags are parsed, before
any process scores. What each target is and how it is scored: reward_client.py."""

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from openrlhf_gd2po.reward_serve import SERVE_PREFIX

SPEC_FORMAT = ("name=http://host:port[/path][|http://replica...][#dimension], name=serve:APPLICATION[#dimension], "
               "name=path/to/reward.py[#dimension] or name=agent[#extra_logs_key]")
AGENT_TARGET = "agent"


@dataclass(frozen=True)
class RewardDimension:
    name: str  # the dimension's name in logs, e.g. "correctness"
    url: str  # a /get_reward URL, replica URLs joined by "|", "serve:NAME", a .py reward file's path, or "agent"
    field: str | None  # extra_logs key (a reward file's dimension) to read; None: "rewards" (a file's first)

    @property
    def is_agent(self) -> bool:
        return self.url == AGENT_TARGET

    @property
    def is_file(self) -> bool:
        return not self.is_agent and not self.url.startswith(("http://", "https://", SERVE_PREFIX))

    @property
    def is_serve(self) -> bool:
        return self.url.startswith(SERVE_PREFIX)


def parse_reward_servers(spec: str) -> list[RewardDimension]:
    """`name=target[#field],...` → dimensions; see SPEC_FORMAT. A URL without a path gets `/get_reward`.

    A reward file's path is made absolute against this process's working directory; the file is
    imported at the first fetch (reward_client.load_reward_files). Without `#field`, its first dimension.
    """
    dimensions = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, target = item.partition("=")
        target, _, field = target.strip().partition("#")
        if not sep or not name.strip() or not target:
            raise ValueError(f"--reward.servers entry {item!r} must look like {SPEC_FORMAT}")
        if target.endswith(".py") and "://" not in target:
            dimensions.append(_file_dimension(item, name.strip(), target, field or None))
            continue
        if target == AGENT_TARGET:
            dimensions.append(RewardDimension(name.strip(), AGENT_TARGET, field or None))
            continue
        if target.startswith(SERVE_PREFIX):
            dimensions.append(_serve_dimension(item, name.strip(), target, field or None))
            continue
        urls = [_endpoint(item, url.strip()) for url in target.split("|")]
        if len(set(urls)) != len(urls):
            raise ValueError(f"--reward.servers entry {item!r} lists a replica twice")
        dimensions.append(RewardDimension(name.strip(), "|".join(urls), field or None))
    names = [d.name for d in dimensions]
    if not dimensions or len(set(names)) != len(names):
        raise ValueError(f"--reward.servers needs at least one dimension and unique names, got {names}")
    return dimensions


def with_absolute_reward_files(spec: str) -> str:
    """`spec` with each reward file's path made absolute here. The driver checks the files in the
    directory it was launched from; the trainer actor opens them in its own (its raylet's, perhaps on
    another node, where the path must hold the file too, as the model's path must)."""
    items = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, target = item.partition("=")
        path, sep, field = target.strip().partition("#")
        if path.endswith(".py") and "://" not in path:  # as parse_reward_servers tells a file
            item = f"{name}={os.path.abspath(os.path.expanduser(path))}{sep}{field}"
        items.append(item)
    return ",".join(items)


def _endpoint(item: str, url: str) -> str:
    parsed = urlsplit(url)
    try:
        parsed.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as error:
        raise ValueError(f"--reward.servers entry {item!r}: {url!r} has an invalid port ({error})") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"--reward.servers entry {item!r} must look like {SPEC_FORMAT}")
    return url.rstrip("/") + "/get_reward" if parsed.path in ("", "/") else url


def _serve_dimension(item: str, name: str, target: str, field: str | None) -> RewardDimension:
    application = target[len(SERVE_PREFIX):]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", application):  # as `--ray-serve NAME` accepts them
        raise ValueError(f"--reward.servers entry {item!r}: Serve application name {application!r} must be "
                         "letters, digits, '_' and '-'")
    return RewardDimension(name, target, field)


def _file_dimension(item: str, name: str, path: str, field: str | None) -> RewardDimension:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"--reward.servers entry {item!r}: reward file {path} does not exist")
    return RewardDimension(name, path, field)
