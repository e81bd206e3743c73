"""CPU mode (`--gd2po.cpu`, openrlhf_gd2po/cpu.py) is opt-in: without it a CPU machine stops at once, naming the
flag; with it the CLI's own local Ray gets the logical GPUs OpenRLHF's actors ask for and every worker runs in CPU
mode. The real trainer in CPU mode is what every tiny run of the suite runs (test_train_tiny_cpu.py)."""

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

TESTS = Path(__file__).parent
# OpenRLHF's main block runs until its first use of the model (ray_job_driver.py): one actor rank and one vLLM
# engine, no KL; the reward server is never asked.
FLAGS = ["--actor.model_name_or_path", "/nonexistent/model", "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
         "--vllm.num_engines", "1", "--algo.kl.init_coef", "0", "--reward.servers", "length=http://127.0.0.1:9#length",
         "--algo.advantage.estimator", "gdpo", "--rollout.n_samples_per_prompt", "2"]  # fmt: skip


def run_cli(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GD2PO_CPU")}
    return subprocess.run([sys.executable, str(TESTS / "ray_job_driver.py"), "openrlhf_gd2po.cli.train_gd2po_ray",
                           *flags, *FLAGS], env=env, capture_output=True, text=True, timeout=300, cwd=TESTS)  # fmt: skip


def test_a_cpu_machine_without_the_opt_in_stops_at_once_naming_it(monkeypatch, capsys):
    # The CLI in this process (it imports OpenRLHF as a fresh one would); Ray never starts.
    import ray

    from openrlhf_gd2po.cli.train_gd2po_ray import main

    for name in ("RAY_ADDRESS", "GD2PO_CPU"):
        monkeypatch.delenv(name, raising=False)
    with (
        mock.patch.object(sys, "argv", ["train_gd2po_ray", *FLAGS]),
        mock.patch.object(ray, "is_initialized", return_value=False),  # as in a fresh process: OpenRLHF calls ray.init
        mock.patch.object(ray, "init") as ray_init,
    ):
        with pytest.raises(SystemExit) as exit_info:
            main()
    ray_init.assert_not_called()
    assert "this machine has no CUDA device" in str(exit_info.value.code) and "pass --gd2po.cpu" in str(exit_info.value.code)
    assert "PROBE" not in capsys.readouterr().out


def test_cpu_mode_gives_its_local_ray_logical_gpus_and_every_worker_cpu_mode():
    result = run_cli("--gd2po.cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PROBE cluster_gpus=2.0" in result.stdout  # the actor rank and the engine, placed apart
    assert "Started a local Ray instance." in result.stderr and "View the dashboard" not in result.stderr  # none
    assert 'PROBE worker_cpu_mode={"GD2PO_CPU": "1", "DS_ACCELERATOR": "cpu", "TORCHDYNAMO_DISABLE": "1"}' in result.stdout


def test_a_training_process_without_cuda_or_the_opt_in_stops_before_deepspeed(monkeypatch):
    # The check every OpenRLHF training actor (policy, reference, critic) meets on its own node, e.g. a GPU node
    # whose driver broke: before DeepSpeed starts, never a silent CPU run.
    import openrlhf_gd2po

    monkeypatch.delenv("GD2PO_CPU", raising=False)
    openrlhf_gd2po.install()
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    with pytest.raises(RuntimeError, match=r"a DeepSpeed training process on .* found no CUDA device .* pass --gd2po.cpu"):
        DeepspeedStrategy.setup_distributed(object())
