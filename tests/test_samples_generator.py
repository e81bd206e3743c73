"""GD2POSamplesGenerator inside OpenRLHF's real SamplesGenerator.generate_samples, with the real CLI's
arguments, a real reward server over HTTP and a stand-in vLLM engine whose groups finish on a chosen
schedule (benchmarks/scheduled_engine.py): rewards fetched while groups generate, merged requests,
dynamic sampling's refills and cap, and failures. The real trainer run is tests/test_train_tiny_cpu.py."""

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch

from openrlhf_gd2po.reward_client import RewardServerError
from servers import free_port, running_process, running_server
from test_openrlhf_integration import N_SAMPLES, parse_cli, real_package_missing, training_argv, zero_copy_refusals

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from scheduled_engine import ScheduledEngine  # noqa: E402

ODD_LENGTH = ROOT / "tests" / "data" / "odd_label_length_reward.py"  # signal only on odd labels
ANSWER_REWARD = ROOT / "examples" / "rewards" / "answer_reward.py"
BREVITY = f"brevity={ANSWER_REWARD}#brevity"  # -len(response) / 1000
BATCH = 2  # training_argv: --rollout.batch_size 2, 4 samples per prompt

pytestmark = pytest.mark.skipif(real_package_missing("vllm"), reason="OpenRLHF's samples generator imports vllm")


@pytest.fixture(scope="module")
def odd_length_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("odd_length") / "requests.jsonl"
    with running_server(["file", "--path", str(ODD_LENGTH), "--workers", "1", "--request-log", str(log)]) as url:
        yield url, log


@pytest.fixture(scope="module")
def engine(local_ray):
    made = ScheduledEngine.remote()
    ray.get(made.reset.remote())  # started
    return made


@pytest.fixture
def generator_log(caplog):
    """caplog on the generator's logger: OpenRLHF's init_logger loggers do not propagate to the root logger
    that caplog listens on, so without this a test sees a warning only after another test set it up."""
    generator_logger = logging.getLogger("openrlhf_gd2po.samples_generator")
    generator_logger.addHandler(caplog.handler)
    yield caplog
    generator_logger.removeHandler(caplog.handler)


def generator(engine, tiny_model, url, labels, *flags, seconds=None, estimator="gd2po_snr", servers=None):
    """OpenRLHF's generator as train_gd2po_ray builds it (install() swaps the class), over prompts
    "prompt i" with the given labels, one engine answering with responses of distinct lengths."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    from transformers import AutoTokenizer

    import openrlhf_gd2po

    openrlhf_gd2po.install()
    args, _ = parse_cli(training_argv(estimator, servers or f"odd_length={url}", "--reward.flush_wait", "0.05", *flags))
    prompts = [f"prompt {i}" for i in range(len(labels))]
    responses = {p: ["x" * (i + 1) for i in range(N_SAMPLES)] for p in prompts}
    ray.get(engine.reset.remote(seconds={p: s for p, s in zip(prompts, seconds or [])}, responses=responses))
    dataloader = [(None, [p], [str(label)], [None]) for p, label in zip(prompts, labels)]
    made = ppo_trainer.SamplesGenerator(strategy=SimpleNamespace(args=args), prompts_dataloader=dataloader,
                                        eval_dataloader=None, tokenizer=AutoTokenizer.from_pretrained(tiny_model),
                                        vllm_engines=[engine])  # fmt: skip
    return made


def groups(samples):
    return [samples[i : i + N_SAMPLES] for i in range(0, len(samples), N_SAMPLES)]


def info(samples, key):
    return torch.cat([s.info[key] for s in samples])


def test_dynamic_sampling_refills_dropped_groups_with_new_prompts(engine, tiny_model, odd_length_server):
    url, log = odd_length_server
    labels = [2, 3, 4, 6, 5, 8, 7, 9, 11]
    made = generator(engine, tiny_model, url, labels, "--gd2po.dynamic_sampling", "no_signal")
    assert type(made).__name__ == "GD2POSamplesGenerator"
    start = len(log.read_text().splitlines()) if log.exists() else 0
    batches = [made.generate_samples(max_new_tokens=8) for _ in range(2)]
    for samples, _, prompts_consumed, _ in batches:
        assert len(samples) == BATCH * N_SAMPLES  # full
        for group in groups(samples):  # every kept group has signal: an odd label, rewards that differ
            assert int(group[0].labels[0]) % 2 == 1 and len(set(info(group, "reward/odd_length").tolist())) == N_SAMPLES
            assert len({s.prompts[0] for s in group}) == 1
        # a call's totals on its first sample (the experience maker sums them per step: sum_call_totals)
        assert info(samples, "gd2po/prompts_consumed").tolist() == [prompts_consumed] + [0] * (len(samples) - 1)
    # Step 1 drew 2, 3, 4, 6, 5 (three dropped), step 2 drew 8, 7, 9 (one dropped): never a repeat.
    assert [b[2] for b in batches] == [5, 3]
    # Each prompt once, compared as a set: prompts dispatched together may reach the engine in either order
    # (prompt 5 before prompt 4 was seen under load).
    assert sorted(ray.get(engine.dispatched.remote())) == [f"prompt {i}" for i in range(8)]
    first, second = batches[0][0], batches[1][0]
    assert info(first, "gd2po/dynamic_sampling_pass_rate")[0] == pytest.approx(2 / 5)
    assert info(first, "gd2po/dynamic_sampling_drop_no_signal")[0] == pytest.approx(3 / 5)
    assert info(second, "gd2po/dynamic_sampling_pass_rate")[0] == pytest.approx(2 / 3)
    # The server scored every generated rollout once, the dropped ones too.
    logged = [json.loads(line) for line in log.read_text().splitlines()[start:]]
    assert len(logged) == 8 * N_SAMPLES and len({(r["prompt"], r["query"]) for r in logged}) == 8 * N_SAMPLES


def test_at_the_cap_the_step_keeps_what_it_has_and_the_next_step_goes_on(engine, tiny_model, odd_length_server,
                                                                         generator_log):
    url, _ = odd_length_server
    # One optimizer step per group (--train.batch_size 4), so the one group kept is trained on.
    made = generator(engine, tiny_model, url, [3, 2, 4, 6, 8, 5, 7], "--gd2po.dynamic_sampling", "no_signal",
                     "--gd2po.dynamic_sampling_max_extra_prompts", "2", "--train.batch_size", "4")  # fmt: skip
    samples, _, prompts_consumed, _ = made.generate_samples(max_new_tokens=8)
    assert prompts_consumed == 4 and [s.labels[0] for s in samples] == ["3"] * N_SAMPLES
    assert "kept 1/2 groups after drawing 4 prompts" in generator_log.text
    assert "Short batch" not in generator_log.text  # one group is a whole optimizer step: nothing is left out
    assert sorted(ray.get(engine.dispatched.remote())) == [f"prompt {i}" for i in range(4)]
    samples, _, prompts_consumed, _ = made.generate_samples(max_new_tokens=8)
    # Prompts 4 and 5 (labels 8 and 5); 8 is dropped and refilled with prompt 6 (label 7): a full batch.
    assert prompts_consumed == 3 and sorted({s.labels[0] for s in samples}) == ["5", "7"]
    # each prompt once, the next step from prompt 4 on (in any order within a batch: see the test above)
    assert sorted(ray.get(engine.dispatched.remote())) == [f"prompt {i}" for i in range(7)]


def test_groups_are_scored_while_later_groups_generate(engine, tiny_model, odd_length_server):
    url, _ = odd_length_server
    # Prompt 0 finishes at once, prompt 1 after 2 s. Room for both in one batch, but prompt 0's group
    # waits only --reward.flush_wait (0.05 s): two requests, the first long before generation ends.
    made = generator(engine, tiny_model, url, [3, 5], "--reward.batch_size", "256", seconds=[0.0, 2.0])
    samples, *_ = made.generate_samples(max_new_tokens=8)
    assert info(samples, "gd2po/reward_requests")[0] == 2
    # Both groups at once, a flush wait of 1 s: one merged request of 8 samples.
    made = generator(engine, tiny_model, url, [3, 5], "--reward.batch_size", "256", "--reward.flush_wait", "1")
    samples, *_ = made.generate_samples(max_new_tokens=8)
    assert info(samples, "gd2po/reward_requests")[0] == 1
    want = [i / 100 + 120 * i % 1000 / 1e6 for i in range(1, 5)]  # responses "x" * i; ord("x") = 120
    assert info(samples, "reward/odd_length").tolist() == pytest.approx(want * 2)


def test_every_sample_tensor_crosses_the_async_trainers_ray_queue(engine, tiny_model, odd_length_server):
    # The async trainer puts the generator's samples on a Ray queue, whose zero-copy serializer refused
    # reward/<dimension> when it was a column of the batch's rewards (stride K; two dimensions here).
    url, _ = odd_length_server
    made = generator(engine, tiny_model, url, [3, 5], servers=f"odd_length={url},{BREVITY}")
    samples, *_ = made.generate_samples(max_new_tokens=8)
    assert len(samples) == 2 * N_SAMPLES and "reward/brevity" in samples[0].info
    assert zero_copy_refusals(samples) == []


def test_a_server_that_is_down_raises_or_masks_as_on_failure_says(engine, tiny_model):
    down = f"http://127.0.0.1:{free_port()}"
    made = generator(engine, tiny_model, down, [3, 5], "--reward.retries", "0")
    with pytest.raises(RewardServerError, match=rf"reward server {down}/get_reward .*samples \d+\.\.\d+: failed"):
        made.generate_samples(max_new_tokens=8)
    made = generator(engine, tiny_model, down, [3, 5], "--reward.retries", "0", "--reward.on_failure", "mask",
                        "--gd2po.dynamic_sampling", "estimator")  # fmt: skip
    samples, _, prompts_consumed, _ = made.generate_samples(max_new_tokens=8)
    # Failed groups are never dropped and refilled around: the experience maker masks them.
    assert prompts_consumed == 2 and info(samples, "reward_fetch_failed").eq(1).all()


def test_a_short_batch_trains_whole_optimizer_steps_and_carries_the_rest_over(engine, tiny_model, odd_length_server,
                                                                               generator_log):
    # Two ranks, an optimizer step of 8 samples: the one group kept at the cap (4 samples) would be half a
    # step (its gradient would stay accumulated into the next) and one micro-batch on one rank only. It
    # waits for the next batch instead of being thrown away (it was: 0 of those samples trained, ever).
    url, _ = odd_length_server
    made = generator(engine, tiny_model, url, [3, 2, 4, 6, 5, 7], "--gd2po.dynamic_sampling", "no_signal",
                     "--gd2po.dynamic_sampling_max_extra_prompts", "2", "--train.batch_size", "8",
                     "--actor.num_gpus_per_node", "2")  # fmt: skip
    samples, _, prompts_consumed, exhausted = made.generate_samples(max_new_tokens=8)
    assert samples == [] and prompts_consumed == 4 and not exhausted  # OpenRLHF's trainer then draws the next batch
    # The next batch: the carried group first, then prompts 4 and 5 (labels 5 and 7): 12 samples, so one
    # step of 8, in the order the prompts were drawn; the group drawn last waits again.
    samples, _, prompts_consumed, exhausted = made.generate_samples(max_new_tokens=8)
    assert [s.labels[0] for s in samples] == ["3"] * N_SAMPLES + ["5"] * N_SAMPLES and prompts_consumed == 2
    assert info(samples, "gd2po/samples_carried_over").tolist() == [N_SAMPLES] + [0] * 7
    assert info(samples, "gd2po/samples_dropped").sum() == 0
    # Both calls' totals go to the step that trains their samples (the experience maker sums them).
    assert info(samples, "gd2po/prompts_consumed").sum() == 4 + 2
    # Out of prompts: what is left makes no whole step and is dropped, with a warning.
    samples, _, prompts_consumed, exhausted = made.generate_samples(max_new_tokens=8)
    assert samples == [] and prompts_consumed == 0 and exhausted and made.carried == []
    assert "The prompts ran out with 4 samples that make no whole optimizer step (a multiple of 8" in generator_log.text


def test_a_short_last_batch_trains_the_groups_drawn_first_not_the_fastest(engine, tiny_model, odd_length_server,
                                                                          generator_log):
    # Three prompts left for a batch of four, two ranks, an optimizer step of 8 samples: 12 samples would
    # give the ranks 2 and 1 rollout micro-batches (ZeRO-3 hangs) and leave half a step's gradient behind.
    # The first prompt's group finishes last (the longest responses): it is trained all the same.
    url, _ = odd_length_server
    made = generator(engine, tiny_model, url, [3, 5, 7], "--rollout.batch_size", "4", "--train.batch_size", "8",
                     "--actor.num_gpus_per_node", "2", seconds=[1.0, 0.0, 0.0])  # fmt: skip
    samples, _, prompts_consumed, exhausted = made.generate_samples(max_new_tokens=8)
    assert prompts_consumed == 3 and exhausted
    assert [s.labels[0] for s in samples] == ["3"] * N_SAMPLES + ["5"] * N_SAMPLES
    assert info(samples, "gd2po/samples_dropped").tolist() == [N_SAMPLES] + [0] * 7
    assert info(samples, "gd2po/samples_carried_over").sum() == 0
    assert "The prompts ran out with 4 samples" in generator_log.text


def test_install_swaps_the_generator_and_eval_metrics_of_the_sync_and_the_async_trainer():
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import openrlhf.trainer.ppo_trainer_async as ppo_trainer_async

    import openrlhf_gd2po
    from openrlhf_gd2po import eval_metrics
    from openrlhf_gd2po.samples_generator import GD2POSamplesGenerator

    openrlhf_gd2po.install()
    assert ppo_trainer.SamplesGenerator is GD2POSamplesGenerator is ppo_trainer_async.SamplesGenerator
    # GenerateSamplesActor._run_eval calls its module's compute_eval_metrics; prepare_datasets is ppo_trainer's
    assert ppo_trainer.compute_eval_metrics is eval_metrics.compute_eval_metrics is ppo_trainer_async.compute_eval_metrics
    assert ppo_trainer.PromptDataset is eval_metrics.PromptDataset and ppo_trainer_async.prepare_datasets is ppo_trainer.prepare_datasets


# Two data sources, named by OpenRLHF's key and by verl's (the GD²PO authors' files); `datasource` wins.
EVAL_ROWS = [
    {"prompt": "eval 0", "label": "3", "datasource": "odd"},
    {"prompt": "eval 1", "label": "5", "datasource": "odd", "data_source": "not this one"},
    {"prompt": "eval 2", "label": "2", "data_source": "even"},
    {"prompt": "eval 3", "label": "4", "data_source": "even"},
]
EVAL_N = 2
# What PPOTrainer.fit passes for an evaluation: its generate kwargs with --eval.temperature and --eval.n_samples_per_prompt.
EVAL_KWARGS = dict(max_new_tokens=8, temperature=0.0, n_samples_per_prompt=EVAL_N)


def eval_generator(engine, tiny_model, folder, servers, *flags, seconds=None):
    """OpenRLHF's prepare_datasets and generator as PPOTrainer builds them (install() swaps the generator,
    the PromptDataset and compute_eval_metrics), with EVAL_ROWS as --eval.dataset; responses "x" * (i + 1)."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    from openrlhf.utils import get_strategy
    from transformers import AutoTokenizer

    import openrlhf_gd2po

    for name, rows in (("train", [{"prompt": "train 0", "label": "1"}]), ("eval", EVAL_ROWS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    openrlhf_gd2po.install()
    args, _ = parse_cli(training_argv("gd2po_snr", servers, "--reward.flush_wait", "0.05", "--reward.batch_size", "256",
                                      "--data.prompt_dataset", str(folder / "train.jsonl"), "--data.input_key", "prompt",
                                      "--data.label_key", "label", "--eval.dataset", str(folder / "eval.jsonl"), *flags))  # fmt: skip
    strategy, tokenizer = get_strategy(args), AutoTokenizer.from_pretrained(tiny_model)
    prompts_dataloader, eval_dataloader, _ = ppo_trainer.prepare_datasets(strategy, tokenizer)
    responses = {row["prompt"]: ["x" * (i + 1) for i in range(N_SAMPLES)] for row in EVAL_ROWS}
    ray.get(engine.reset.remote(seconds=seconds, responses=responses))
    made = ppo_trainer.SamplesGenerator(strategy=strategy, prompts_dataloader=prompts_dataloader,
                                        eval_dataloader=eval_dataloader, tokenizer=tokenizer, vllm_engines=[engine])  # fmt: skip
    return made, eval_dataloader


def test_eval_scores_every_group_once_with_the_eval_flags_and_logs_each_dimension_per_source(
        engine, tiny_model, odd_length_server, tmp_path):
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    from openrlhf_gd2po.eval_metrics import openrlhf_eval_metrics

    url, log = odd_length_server
    start = len(log.read_text().splitlines()) if log.exists() else 0
    # Dynamic sampling on: in training it would drop the odd labels' groups, which gd2po_snr masks whole (below).
    made, eval_dataloader = eval_generator(engine, tiny_model, tmp_path, f"odd_length={url},{BREVITY}",
                                           "--gd2po.dynamic_sampling", "estimator")  # fmt: skip
    samples = made.generate_eval_samples(**EVAL_KWARGS)
    assert sorted(s.prompts[0] for s in samples) == sorted([row["prompt"] for row in EVAL_ROWS] * EVAL_N)
    assert ray.get(engine.sampled_with.remote()) == [(0.0, EVAL_N)] * len(EVAL_ROWS)  # --eval.* reached the engine
    logged = [json.loads(line) for line in log.read_text().splitlines()[start:]]
    assert len(logged) == len(EVAL_ROWS) * EVAL_N  # each eval rollout scored once, in the streamed requests

    logs = ppo_trainer.compute_eval_metrics(eval_dataloader, samples, EVAL_N)  # what OpenRLHF's evaluate calls
    by_source = {"odd": ["eval 0", "eval 1"], "even": ["eval 2", "eval 3"]}
    brevity = -(1 + 2) / 2 / 1000  # responses "x" and "xx" in every group
    for source, prompts in by_source.items():
        server = [line["odd_length"] for line in logged if line["prompt"] in prompts]
        assert logs[f"eval_{source}_reward/odd_length"] == pytest.approx(sum(server) / len(server))
        assert logs[f"eval_{source}_reward/brevity"] == pytest.approx(brevity)
        assert logs[f"eval_{source}_reward"] == pytest.approx(sum(server) / len(server) + brevity)
        assert logs[f"eval_{source}_reward_fetch_failed"] == 0.0
        assert logs[f"eval_{source}_pass1"] == pytest.approx(logs[f"eval_{source}_reward"])
    # Nothing failed, so OpenRLHF's own pass@k of the weighted sum is the same as ours.
    openrlhf_logs = openrlhf_eval_metrics(eval_dataloader, samples, EVAL_N)
    assert {k: logs[k] for k in openrlhf_logs} == pytest.approx(openrlhf_logs)
    assert logs["eval_num_samples"] == 8 and "eval_odd_response_length_mean" in logs
    # Odd labels: the longer response wins on odd_length, the shorter on brevity, by almost the same
    # normalised amount: every rollout conflicts, cancels, and gd2po_snr masks it. Even: only brevity varies.
    assert logs["eval_odd_gd2po/conflict_ratio"] == 1.0 and logs["eval_odd_gd2po/keep_ratio"] == 0.0
    assert logs["eval_odd_gd2po/advantage_cancellation"] == pytest.approx(1.0, abs=1e-3)
    assert logs["eval_even_gd2po/conflict_ratio"] == 0.0 and logs["eval_even_gd2po/keep_ratio"] == 1.0
    assert logs["eval_even_gd2po/advantage_cancellation"] == pytest.approx(0.0, abs=1e-9)
    assert not any("not this one" in key for key in logs)


def test_eval_with_a_failing_server_masks_and_counts_or_raises_as_on_failure_says(engine, tiny_model, tmp_path,
                                                                                generator_log):
    fault = [sys.executable, str(ROOT / "tests" / "fault_server.py"), "--fail-first", "1"]
    with running_process(fault) as (url, _):  # HTTP 500 to its first request: the group of "eval 0", first done
        made, eval_dataloader = eval_generator(engine, tiny_model, tmp_path, f"up={url}#up", "--reward.retries", "0",
                                               "--reward.on_failure", "mask", "--reward.batch_size", str(EVAL_N),
                                               seconds={row["prompt"]: 0.5 for row in EVAL_ROWS[1:]})  # fmt: skip
        import openrlhf.trainer.ppo_trainer as ppo_trainer

        samples = made.generate_eval_samples(**EVAL_KWARGS)
        logs = ppo_trainer.compute_eval_metrics(eval_dataloader, samples, EVAL_N)
    assert len(samples) == len(EVAL_ROWS) * EVAL_N  # a failed group is kept, and counted
    assert "Reward fetch failed for 2/4 eval rollouts; they are left out of the eval means" in generator_log.text
    assert logs["eval_odd_reward_fetch_failed"] == 0.5 and logs["eval_even_reward_fetch_failed"] == 0.0
    # The odd source's means are those of "eval 1" alone (up = len(query)), not pulled towards 0 by "eval 0".
    fetched = [len(made.tokenizer.decode(s.sequences[0])) for s in samples if s.prompts[0] == "eval 1"]
    assert logs["eval_odd_reward/up"] == pytest.approx(sum(fetched) / len(fetched))
    assert logs["eval_odd_pass1"] == pytest.approx(sum(fetched) / len(fetched))
    assert logs["eval_odd_pass2"] == pytest.approx(max(fetched))

    down = f"http://127.0.0.1:{free_port()}"
    made, eval_dataloader = eval_generator(engine, tiny_model, tmp_path, f"up={down}", "--reward.retries", "0",
                                           "--reward.on_failure", "mask")  # fmt: skip
    logs = ppo_trainer.compute_eval_metrics(eval_dataloader, made.generate_eval_samples(**EVAL_KWARGS), EVAL_N)
    for source in ("odd", "even"):  # every rollout failed: no mean at all (OpenRLHF's pass1 would say 0)
        assert logs[f"eval_{source}_reward_fetch_failed"] == 1.0
        assert not [k for k in logs if k.startswith(f"eval_{source}_") and ("pass" in k or "reward/" in k)]
    made, _ = eval_generator(engine, tiny_model, tmp_path, f"up={down}", "--reward.retries", "0")
    with pytest.raises(RewardServerError, match=rf"reward server {down}/get_reward .*samples \d+\.\.\d+: failed"):
        made.generate_eval_samples(**EVAL_KWARGS)


def test_a_generation_call_that_feeds_two_async_steps_counts_its_totals_once(engine, tiny_model, odd_length_server):
    # Async over-sampling: one vLLM call of 4 prompts feeds two steps of 2 (OpenRLHF's sample buffer).
    from openrlhf.models import Actor
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from test_openrlhf_integration import InProcessActorGroup

    from openrlhf_gd2po.experience_maker import GD2POExperienceMaker

    url, _ = odd_length_server
    made = generator(engine, tiny_model, url, [3, 5, 7, 9], "--train.async_enable",
                     "--rollout.vllm_generate_batch_size", "4")  # fmt: skip
    steps = [made.generate_samples(max_new_tokens=8) for _ in range(2)]
    assert [prompts_consumed for *_, prompts_consumed, _ in steps] == [4, 0]  # OpenRLHF's count: the call, then the buffer
    call = {key: steps[0][0][0].info[key].item() for key in ("gd2po/prompts_consumed", "gd2po/reward_requests")}
    assert call["gd2po/prompts_consumed"] == 4 and call["gd2po/reward_requests"] == 4  # a group each (4 > batch 3)

    actor = InProcessActorGroup(Actor(str(tiny_model), attn_implementation="sdpa", param_dtype="bf16"))
    maker = GD2POExperienceMaker(actor, None, None, None, FixedKLController(0.0), made.strategy, made.tokenizer)
    logged = []
    for samples, *_ in steps:
        experiences = maker.make_experience_batch(samples)
        # OpenRLHF's actor logs each info key as its mean over the step's samples
        logged.append({key: torch.cat([e.info[key] for e in experiences]).mean().item()
                       for key in [*call, "reward_seconds/odd_length", "gd2po/dynamic_sampling_pass_rate"]})  # fmt: skip
    for key, total in call.items():  # the step that trains the call's first sample logs the call; the other 0
        assert [row[key] for row in logged] == [total, 0.0], key
    assert logged[0]["reward_seconds/odd_length"] > 0 == logged[1]["reward_seconds/odd_length"]
    assert [row["gd2po/dynamic_sampling_pass_rate"] for row in logged] == [1.0, 1.0]  # a rate: the call's, per step


def trainer_generator(tiny_model, *flags):
    """The prompt loader and generator OpenRLHF's PPOTrainer builds (its own prepare_datasets and strategy,
    no process group, as in the trainer actor), over the first 16 arithmetic prompts."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    from openrlhf.utils import get_strategy
    from transformers import AutoTokenizer

    import openrlhf_gd2po

    openrlhf_gd2po.install()
    args, _ = parse_cli(training_argv(
        "gd2po_snr", "odd_length=http://127.0.0.1:1", "--data.prompt_dataset",
        str(ROOT / "openrlhf_gd2po" / "data" / "arithmetic_prompts.jsonl"), "--data.input_key", "prompt",
        "--data.label_key", "label", "--data.max_samples", "16", *flags))  # fmt: skip
    strategy, tokenizer = get_strategy(args), AutoTokenizer.from_pretrained(tiny_model)
    loader, _, _ = ppo_trainer.prepare_datasets(strategy, tokenizer)
    return ppo_trainer.SamplesGenerator(strategy=strategy, prompts_dataloader=loader, eval_dataloader=None,
                                        tokenizer=tokenizer, vllm_engines=[])  # fmt: skip


def trainer_prompt_loader(tiny_model, *flags):
    return trainer_generator(tiny_model, *flags).prompts_dataloader


def drawn(batches) -> list[str]:
    return [label for _, _, labels, _ in batches for label in labels]


def test_the_prompt_order_follows_train_seed_and_a_restored_loader_goes_on_with_it(tiny_model):
    # Two trainer processes (torch's global generator in another state in each) draw one order.
    torch.manual_seed(1)
    first = trainer_prompt_loader(tiny_model)
    torch.manual_seed(2)
    order = drawn(trainer_prompt_loader(tiny_model))
    assert drawn(first) == order and sorted(order) != order  # shuffled, the same way
    assert drawn(trainer_prompt_loader(tiny_model, "--train.seed", "7")) != order
    # What OpenRLHF's resume does with the checkpoint's data_loader_state_dict: after 6 prompts drawn
    # (a step's refills included), a new loader restored from it draws the other 10, in the same order.
    interrupted = trainer_prompt_loader(tiny_model)
    iterator = iter(interrupted)
    assert drawn(next(iterator) for _ in range(6)) == order[:6]
    state = interrupted.state_dict()
    torch.manual_seed(3)
    restored = trainer_prompt_loader(tiny_model)
    restored.load_state_dict(state)
    assert drawn(restored) == order[6:]


def test_the_groups_carried_over_are_saved_and_restored_with_the_loaders_position(tiny_model, tmp_path):
    # OpenRLHF checkpoints prompts_dataloader.state_dict() in DeepSpeed's client states (torch.save) and
    # restores it at resume: the carried groups' prompts count as drawn there, so the groups go with it.
    from test_openrlhf_integration import rollout_samples

    order = drawn(trainer_prompt_loader(tiny_model))
    made = trainer_generator(tiny_model)
    iterator = iter(made.prompts_dataloader)
    next(iterator), next(iterator)
    made.carried = rollout_samples(made.tokenizer)[:N_SAMPLES]
    torch.save({"data_loader_state_dict": made.prompts_dataloader.state_dict()}, tmp_path / "client_states.pt")
    restored = trainer_generator(tiny_model)
    restored.prompts_dataloader.load_state_dict(
        torch.load(tmp_path / "client_states.pt", weights_only=False)["data_loader_state_dict"])
    assert [s.sequences.tolist() for s in restored.carried] == [s.sequences.tolist() for s in made.carried]
    assert drawn(restored.prompts_dataloader) == order[2:]
