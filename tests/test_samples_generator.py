"""GD2POSamplesGenerator inside OpenRLHF's real SamplesGenerator.generate_samples, with the real CLI's
arguments, a real reward server over HTTP and a stand-in vLLM engine whose groups finish on a chosen
schedule (benchmarks/scheduled_engine.py): rewards fetched while groups generate, merged requests,
dynamic sampling's refills and cap, and failures. The real trainer run is tests/test_train_tiny_cpu.py."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch

from openrlhf_gd2po.reward_client import RewardServerError
from servers import running_server
from test_openrlhf_integration import N_SAMPLES, parse_cli, real_package_missing, training_argv, zero_copy_refusals

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from scheduled_engine import ScheduledEngine  # noqa: E402

ODD_LENGTH = ROOT / "tests" / "data" / "odd_label_length_reward.py"  # signal only on odd labels
ANSWER_REWARD = ROOT / "examples" / "rewards" / "answer_reward.py"
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
        assert info(samples, "gd2po/prompts_consumed").eq(prompts_consumed).all()
    # Step 1 drew 2, 3, 4, 6, 5 (three dropped), step 2 drew 8, 7, 9 (one dropped): never a repeat.
    assert [b[2] for b in batches] == [5, 3]
    dispatched = ray.get(engine.dispatched.remote())
    assert dispatched == [f"prompt {i}" for i in range(8)]
    first, second = batches[0][0], batches[1][0]
    assert info(first, "gd2po/dynamic_sampling_pass_rate")[0] == pytest.approx(2 / 5)
    assert info(first, "gd2po/dynamic_sampling_drop_no_signal")[0] == pytest.approx(3 / 5)
    assert info(second, "gd2po/dynamic_sampling_pass_rate")[0] == pytest.approx(2 / 3)
    # The server scored every generated rollout once, the dropped ones too.
    logged = [json.loads(line) for line in log.read_text().splitlines()[start:]]
    assert len(logged) == 8 * N_SAMPLES and len({(r["prompt"], r["query"]) for r in logged}) == 8 * N_SAMPLES


def test_at_the_cap_the_step_keeps_what_it_has_and_the_next_step_goes_on(engine, tiny_model, odd_length_server,
                                                                         caplog):
    url, _ = odd_length_server
    # One optimizer step per group (--train.batch_size 4), so the one group kept is trained on.
    made = generator(engine, tiny_model, url, [3, 2, 4, 6, 8, 5, 7], "--gd2po.dynamic_sampling", "no_signal",
                     "--gd2po.dynamic_sampling_max_extra_prompts", "2", "--train.batch_size", "4")  # fmt: skip
    samples, _, prompts_consumed, _ = made.generate_samples(max_new_tokens=8)
    assert prompts_consumed == 4 and [s.labels[0] for s in samples] == ["3"] * N_SAMPLES
    assert "kept 1/2 groups after drawing 4 prompts" in caplog.text and "trains on 4 of them and leaves out 0" not in caplog.text
    samples, _, prompts_consumed, _ = made.generate_samples(max_new_tokens=8)
    # Prompts 4 and 5 (labels 8 and 5); 8 is dropped and refilled with prompt 6 (label 7): a full batch.
    assert prompts_consumed == 3 and sorted({s.labels[0] for s in samples}) == ["5", "7"]
    assert ray.get(engine.dispatched.remote()) == [f"prompt {i}" for i in range(7)]


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
    made = generator(engine, tiny_model, url, [3, 5], servers=f"odd_length={url},brevity={ANSWER_REWARD}#brevity")
    samples, *_ = made.generate_samples(max_new_tokens=8)
    assert len(samples) == 2 * N_SAMPLES and "reward/brevity" in samples[0].info
    assert zero_copy_refusals(samples) == []


def test_a_server_that_is_down_raises_or_masks_as_on_failure_says(engine, tiny_model):
    from servers import free_port

    down = f"http://127.0.0.1:{free_port()}"
    made = generator(engine, tiny_model, down, [3, 5], "--reward.retries", "0")
    with pytest.raises(RewardServerError, match=rf"reward server {down}/get_reward .*samples \d+\.\.\d+: failed"):
        made.generate_samples(max_new_tokens=8)
    made = generator(engine, tiny_model, down, [3, 5], "--reward.retries", "0", "--reward.on_failure", "mask",
                        "--gd2po.dynamic_sampling", "estimator")  # fmt: skip
    samples, _, prompts_consumed, _ = made.generate_samples(max_new_tokens=8)
    # Failed groups are never dropped and refilled around: the experience maker masks them.
    assert prompts_consumed == 2 and info(samples, "reward_fetch_failed").eq(1).all()


def test_a_short_batch_trains_whole_optimizer_steps_only(engine, tiny_model, odd_length_server, caplog):
    # Two ranks, an optimizer step of 8 samples: the one group kept (4 samples) would be half a step
    # (its gradient would stay accumulated into the next) and one micro-batch on one rank only.
    url, _ = odd_length_server
    made = generator(engine, tiny_model, url, [3, 2, 4, 6], "--gd2po.dynamic_sampling", "no_signal",
                     "--gd2po.dynamic_sampling_max_extra_prompts", "2", "--train.batch_size", "8",
                     "--actor.num_gpus_per_node", "2")  # fmt: skip
    samples, _, prompts_consumed, _ = made.generate_samples(max_new_tokens=8)
    assert samples == [] and prompts_consumed == 4  # OpenRLHF's trainer then draws the next batch
    assert "Short batch of 4 samples (a full one has 8): this step trains on 0 of them and leaves out 4" in caplog.text
    assert "a multiple of 8 samples" in caplog.text


def test_a_short_last_batch_is_cut_to_whole_optimizer_steps_without_dynamic_sampling(engine, tiny_model,
                                                                                      odd_length_server, caplog):
    # Three prompts left for a batch of four, two ranks, an optimizer step of 8 samples: 12 samples would
    # give the ranks 2 and 1 rollout micro-batches (ZeRO-3 hangs) and leave half a step's gradient behind.
    url, _ = odd_length_server
    made = generator(engine, tiny_model, url, [3, 5, 7], "--rollout.batch_size", "4", "--train.batch_size", "8",
                     "--actor.num_gpus_per_node", "2")  # fmt: skip
    samples, _, prompts_consumed, exhausted = made.generate_samples(max_new_tokens=8)
    assert prompts_consumed == 3 and exhausted
    assert [s.labels[0] for s in samples] == ["3"] * N_SAMPLES + ["5"] * N_SAMPLES  # whole groups, in order
    assert "Short batch of 12 samples (a full one has 16): this step trains on 8 of them and leaves out 4" in caplog.text


def test_install_swaps_the_generator_of_the_sync_and_the_async_trainer():
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import openrlhf.trainer.ppo_trainer_async as ppo_trainer_async

    import openrlhf_gd2po
    from openrlhf_gd2po.samples_generator import GD2POSamplesGenerator

    openrlhf_gd2po.install()
    assert ppo_trainer.SamplesGenerator is GD2POSamplesGenerator is ppo_trainer_async.SamplesGenerator
