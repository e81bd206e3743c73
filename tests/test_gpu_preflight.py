"""The GPU count of train_gd2po_ray's preflight (openrlhf_gd2po/cli/gpu_preflight.py) on OpenRLHF's real
processed args, and its refusal on a Ray cluster without GPUs. The refusal with the numbers, the Serve
application named, and a fitting job let through run as real jobs in tests/test_ray_job_submit.py."""

import pytest

from openrlhf_gd2po.cli.gpu_preflight import check_gpus, gpus_asked
from test_openrlhf_integration import parse_cli, training_argv

LAYOUTS = [  # flags -> what OpenRLHF 0.11.2's train() places, role by role (cli/train_ppo_ray.py)
    ([], {"actor": 1, "reference": 8}),  # the reference model with KL (OpenRLHF's default 0.01), 8 GPUs by default
    (["--algo.kl.init_coef", "0", "--vllm.num_engines", "2", "--vllm.tensor_parallel_size", "2"],
     {"actor": 1, "vLLM engines": 4}),
    (["--actor.num_gpus_per_node", "4", "--ref.num_gpus_per_node", "4", "--train.colocate_actor_ref",
      "--vllm.num_engines", "4"], {"actor": 4, "vLLM engines": 4}),  # the reference in the actor's bundles
    (["--actor.num_gpus_per_node", "4", "--ref.num_gpus_per_node", "4", "--train.colocate_all",
      "--vllm.num_engines", "4"], {"actor": 4}),  # everything in the actor's bundles
    (["--actor.num_gpus_per_node", "4", "--ref.num_gpus_per_node", "4", "--train.colocate_all",
      "--vllm.num_engines", "4", "--train.async_enable"], {"actor": 4, "vLLM engines": 4}),  # async: engines apart
]  # fmt: skip


@pytest.mark.parametrize("flags, asked", LAYOUTS)
def test_the_gpus_each_role_asks_for_follow_openrlhfs_placement(flags, asked):
    args, _ = parse_cli(training_argv("gd2po_snr", "c=http://h:1", *flags))
    assert gpus_asked(args) == asked


def test_a_critic_and_a_reward_model_count_unless_colocated():
    # gae keeps a critic (on the actor's model); without a remote reward, a reward model group too.
    args, _ = parse_cli(["--actor.model_name_or_path", "m", "--reward.model_name_or_path", "rm",
                         "--algo.advantage.estimator", "gae", "--algo.kl.init_coef", "0", "--actor.num_gpus_per_node", "2",
                         "--critic.num_gpus_per_node", "2", "--reward.num_gpus_per_node", "2"])  # fmt: skip
    assert gpus_asked(args) == {"actor": 2, "critic": 2, "reward model": 2}
    args.train.colocate_critic_reward = True  # one placement group for both
    assert gpus_asked(args) == {"actor": 2, "critic": 2}


def test_a_cluster_without_gpus_is_refused_naming_the_cpu_mode(local_ray):
    args, _ = parse_cli(training_argv("gd2po_snr", "c=http://h:1", "--vllm.num_engines", "1", "--algo.kl.init_coef", "0"))
    with pytest.raises(SystemExit) as refused:
        check_gpus(args)  # the session's Ray has no GPUs
    message = str(refused.value.code)
    assert "the Ray cluster has no GPUs" in message and "(2: actor 1, vLLM engines 1)" in message
    assert "--gd2po.cpu" in message
