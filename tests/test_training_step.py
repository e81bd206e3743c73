"""GD2POExperienceMaker's experiences through OpenRLHF's real PPO actor training step (ActorPPOTrainer,
PolicyLoss, KL loss, entropy, replay buffer, ppo_train) under DeepSpeed ZeRO-3 on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from servers import free_port
from test_openrlhf_integration import (
    TESTS, make_experiences, parse_cli, training_argv,
)

ENTROPY_COEF = 0.01


def trainer_argv(mode, *extra):
    return ["--algo.kl.use_loss", "--algo.kl.init_coef", "0.1", "--actor.entropy_coef", str(ENTROPY_COEF),
            "--ds.zero_stage", "3", "--train.micro_batch_size", "1", "--train.batch_size", "8",
            "--actor.adam.lr", "1e-3", "--actor.lr_scheduler", "constant", "--gd2po.masked_rollouts", mode, *extra]  # fmt: skip


def training_inputs(path, tiny_model, toolcall_url, probes, *extra, modes=("zero_advantage", "exclude")):
    """Experiences of the --gd2po.masked_rollouts `modes` from the maker and the probes to run, saved to `path`."""
    servers = f"correctness={toolcall_url}#correctness,format={toolcall_url}#format"
    experiences = {}
    for mode in modes:
        args, _ = parse_cli(training_argv("gd2po_hard", servers, *trainer_argv(mode, *extra)))
        experiences[mode], _, _ = make_experiences(tiny_model, args, reference=True)
    torch.save({"args": args, "experiences": experiences, "probes": probes, "entropy_coef": ENTROPY_COEF}, path)
    return path


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_model, toolcall_url, local_ray):
    """One script run, one trainer per test's inputs: the imports and DeepSpeed's start dominate a run."""
    root = tmp_path_factory.mktemp("training_step")
    inputs = {
        "masked_rollouts": training_inputs(root / "masked.pt", tiny_model, toolcall_url, ["direction", "gradients", "ppo_train"]),
        # OpenRLHF turns packing on with dynamic batching (and asks for vLLM engines); packing needs
        # flash-attn's varlen kernels, so the script runs the padded layout.
        "dynamic_batch": training_inputs(root / "dynamic.pt", tiny_model, toolcall_url, ["ppo_train"],
                                         "--train.dynamic_batch_enable", "--train.max_tokens_per_gpu", "512",
                                         "--vllm.num_engines", "1", modes=["exclude"]),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(TESTS / "zero3_actor_training_step.py"), str(tiny_model), str(free_port()),
         *map(str, inputs.values())],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.removeprefix("REPORT ") for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert len(lines) == len(inputs), result.stdout[-4000:]
    return dict(zip(inputs, map(json.loads, lines)))


def test_masked_rollouts_in_the_real_actor_step(reports):
    report = reports["masked_rollouts"]
    assert report["zero_stage"] == 3
    gradients = report["gradients"]
    for mode in ("zero_advantage", "exclude"):
        assert gradients[mode]["masked_rows"] == [1, 2, 5, 6]  # the mixed-sign rollouts of gd2po_hard
        assert gradients[mode]["gradient_norm"] > 0
        assert gradients[mode]["kept_changed_max_diff"] > 0  # kept rows move the gradient: the check can fail
    # zero_advantage (the authors'): advantage 0, yet the KL loss still pulls on masked rollouts ...
    assert gradients["zero_advantage"]["masked_changed_max_diff"] > 0
    # ... while the policy gradient alone (KL loss and entropy off) gets nothing from them.
    assert gradients["zero_advantage_policy_only"]["gradient_norm"] > 0
    assert gradients["zero_advantage_policy_only"]["masked_changed_max_diff"] == 0
    # exclude, with the KL loss and the entropy bonus on: masked rollouts contribute exactly nothing,
    # and their tokens are in no denominator (the step counts only kept tokens).
    assert gradients["exclude"]["masked_changed_max_diff"] == 0
    assert 0 < gradients["exclude"]["num_action_tokens"] < gradients["zero_advantage"]["num_action_tokens"]

    # An optimizer step of excluded rollouts only: zero gradient, finite metrics. OpenRLHF's step alone
    # divides 0 by 0 there (NaN gradient), which is why install() wraps it.
    only_excluded = gradients["only_excluded"]
    assert only_excluded["rows"] == 4
    assert only_excluded["gradient_finite"] and only_excluded["gradient_max_abs"] == 0
    assert only_excluded["metrics_finite"]
    assert not only_excluded["unguarded_gradient_finite"]

    # OpenRLHF's ppo_train with micro-batches of one rollout: the excluded ones are token-less micro-batches.
    assert report["ppo_train"]["error"] is None and report["ppo_train"]["status_finite"]
    assert report["ppo_train"]["weights_finite"] and report["ppo_train"]["weight_change"] > 0
    assert "ZeroDivisionError" in report["ppo_train_unguarded"]["error"]
    # Direction: one optimizer step (ppo_train, KL and entropy off) on the maker's zero_advantage
    # experiences raises the log-prob of positive-advantage rollouts and lowers the negative ones.
    advantage = torch.tensor(report["direction"]["advantage"])
    change = torch.tensor(report["direction"]["log_prob_change"])
    assert (advantage > 0).any() and (advantage < 0).any()
    assert (change[advantage > 0] > 0).all(), (advantage, change)
    assert (change[advantage < 0] < 0).all(), (advantage, change)


def test_exclude_with_dynamic_batch(reports):
    # The Actor unpacks packed log-probs to the padded [batch, time] layout before `* action_mask`,
    # so exclusion is unchanged with dynamic batching.
    report = reports["dynamic_batch"]
    assert report["ppo_train"]["error"] is None and report["ppo_train"]["status_finite"]
    assert report["ppo_train"]["weights_finite"] and report["ppo_train"]["weight_change"] > 0


@pytest.fixture(scope="module")
def dp2_reports(tmp_path_factory):
    """tests/dp2_actor_training_step.py on 2 gloo ranks: the recorded DP=2 NaN case's model and step-1
    experiences with the rehearsal's actor settings (ZeRO-3, bf16, micro-batches of 2, optimizer steps of 8)."""
    root = tmp_path_factory.mktemp("dp2")
    args, _ = parse_cli(training_argv(
        "group_norm", "length=http://127.0.0.1:9#length", "--ds.zero_stage", "3", "--ds.param_dtype", "bf16",
        "--ds.attn_implementation", "sdpa", "--train.micro_batch_size", "2", "--train.batch_size", "8",
        "--actor.adam.lr", "1e-2", "--actor.lr_warmup_ratio", "0", "--algo.kl.init_coef", "0",
        "--vllm.sync_backend", "gloo",
    ))  # fmt: skip
    torch.save({"args": args}, root / "inputs.pt")
    command = [sys.executable, str(TESTS / "dp2_actor_training_step.py")]
    port, out = str(free_port()), str(root / "report")
    ranks = [subprocess.Popen([*command, str(rank), port, str(root / "inputs.pt"), out], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]  # fmt: skip
    logs = [rank.communicate(timeout=600)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)], logs


def test_dp2_zero3_load_holds_the_checkpoint(dp2_reports):
    # The DP=2 NaN's cause: DeepSpeed <= 0.19.7 read a module's gathered parameters after waiting only
    # for the last of their async gloo all-gathers (deepspeedai/DeepSpeed#8539, in 0.19.8).
    reports, _ = dp2_reports
    assert [report["late_all_gathers_load"]["wrong_partitions"] for report in reports] == [[], []]


def test_dp2_non_finite_update_skipped_on_every_rank(dp2_reports):
    reports, logs = dp2_reports
    for report in reports:
        guard = report["guard"]
        for case in ("nan_advantage_on_rank1", "nan_log_prob_on_rank0"):
            assert guard[case] == {"skipped_updates": 1.0, "unchanged": True, "weights_finite": True}, case
        # the skip left nothing behind: clean data trains
        assert guard["clean"] == {"skipped_updates": 0.0, "unchanged": False, "weights_finite": True}
        # OpenRLHF's step alone: a NaN policy_loss, and the update applied all the same
        assert guard["nan_log_prob_unguarded"] == {"skipped_updates": None, "unchanged": False, "weights_finite": True}
    assert "non-finite advantages and loss on at least one rank" in logs[0]  # sorted names
    assert "non-finite loss on at least one rank" in logs[0]
