"""Multi-turn agents (`--train.agent_func_path`) with several reward dimensions, in process: the shipped
calculator agent run by OpenRLHF's real MultiTurnAgentExecutor (a scripted engine stands in for vLLM: these
tests choose the model's turns), its responses turned into samples by OpenRLHF's own samples generator, then
our request columns, `agent` dimensions and GD2POExperienceMaker. The real run is test_train_tiny_cpu.py's
sync gd2po_snr run (TINY_AGENT=1); what the servers read of an agent request is in test_reward_servers.py."""

import asyncio
import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openrlhf_gd2po import agent_rewards
from openrlhf_gd2po.agent_rewards import request_columns
from openrlhf_gd2po.reward_client import RewardServerError, fetch_rewards
from openrlhf_gd2po.reward_spec import parse_reward_servers
from test_openrlhf_integration import N_SAMPLES, InProcessActorGroup, parse_cli, real_package_missing, training_argv

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "examples" / "agents" / "calculator_agent.py"
ANSWER_REWARD = ROOT / "examples" / "rewards" / "answer_reward.py"  # brevity = -len(response) / 1000
END = "<|im_end|>"
LABEL = "122"
# The model's turns in each rollout of one prompt (a turn without END was cut at the turn's token limit).
TURNS = [
    [f"<calculator>59 + 63</calculator>{END}", f"The answer is \\boxed{{122}}.{END}"],  # tool, then right
    [f"<calculator>59 + 63</calculator>{END}", f"\\boxed{{5}}{END}"],  # tool, then wrong
    ["hmm", "let me think", "no idea"],  # three cut turns: the agent stops at MAX_TURNS
    [f"\\boxed{{122}}{END}"],  # answers at once
]
SERVERS = "win=agent,turns=agent#turns,calls=agent#tool_calls," f"brevity={ANSWER_REWARD}#brevity"

pytestmark = pytest.mark.skipif(real_package_missing("vllm"), reason="OpenRLHF's samples generator imports vllm")


class ScriptedEngine:
    """vLLM's answer to each turn as the executor reads it: token ids (an ended turn's end token included)
    and text (without it, as vLLM detokenizes a stop-terminated output)."""

    def __init__(self, tokenizer, turns):
        self.tokenizer, self.turns = tokenizer, list(turns)

    async def generate(self, prompt_token_ids, sampling_params, **kwargs):
        turn = self.turns.pop(0)
        ids = self.tokenizer(turn, add_special_tokens=False)["input_ids"]
        assert len(ids) <= sampling_params.max_tokens
        completion = SimpleNamespace(token_ids=ids, text=turn.removesuffix(END), logprobs=None,
                                     finish_reason="stop" if turn.endswith(END) else "length")
        return SimpleNamespace(outputs=[completion])


def agent_samples(tokenizer):
    """The calculator agent's rollouts of TURNS, as OpenRLHF's samples generator makes them into samples."""
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    spec = importlib.util.spec_from_file_location("calculator_agent", AGENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 59 + 63?"}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    params = SimpleNamespace(max_tokens=48, logprobs=None)  # --rollout.max_new_tokens 48: each turn's limit
    executor = module.AgentExecutor()

    async def run(turns):
        return await executor.execute(prompt, LABEL, params, 1024, tokenizer, ScriptedEngine(tokenizer, turns))

    responses = [asyncio.run(run(turns)) for turns in TURNS]
    return [SamplesGenerator._process_response_into_experience(None, r, max_len=1024) for r in responses], prompt


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer()


def agent_args(servers=SERVERS, *flags, estimator="gd2po_snr"):
    args, _ = parse_cli(training_argv(estimator, servers, "--train.agent_func_path", str(AGENT), *flags))
    return args


def test_the_calculator_agent_and_what_a_request_carries(tokenizer):
    samples, prompt = agent_samples(tokenizer)
    dimensions = parse_reward_servers(SERVERS)
    columns = request_columns(agent_args(), samples, dimensions, tokenizer)
    # The model's own turns, decoded from OpenRLHF's action ranges as the query is (end tokens kept).
    assert columns["model_turns"] == TURNS
    queries = [tokenizer.decode(s.sequences[0], skip_special_tokens=False) for s in samples]
    assert "<result>122</result>" in queries[0] and "<result>122</result>" not in "".join(TURNS[0])
    assert all(q.startswith(prompt) for q in queries)
    # agent: the summed reward; agent#key: the last step's extra_logs (a 0-d tensor and a float here)
    assert columns["agent_values"] == [
        {"win": 1.0, "turns": 2.0, "calls": 1.0}, {"win": 0.0, "turns": 2.0, "calls": 1.0},
        {"win": 0.0, "turns": 3.0, "calls": 0.0}, {"win": 1.0, "turns": 1.0, "calls": 0.0},
    ]  # fmt: skip
    batch = fetch_rewards(dimensions, queries, [prompt] * 4, [LABEL] * 4, **columns)
    assert not batch.failed.any()
    brevity = [-len(turns[-1]) / 1000 for turns in TURNS]  # the reward file reads the prompt and the last turn
    expected = torch.tensor([[*v.values(), b] for v, b in zip(columns["agent_values"], brevity)])
    assert torch.allclose(batch.rewards, expected), batch.rewards
    # Without --train.agent_func_path nothing is added, and an agent dimension cannot be read.
    assert request_columns(SimpleNamespace(train=SimpleNamespace(agent_func_path=None)), samples, dimensions,
                           tokenizer) == {}  # fmt: skip
    with pytest.raises(ValueError, match="--train.agent_func_path"):
        fetch_rewards(dimensions, queries, [prompt] * 4, [LABEL] * 4)


@pytest.mark.parametrize("broken", ["missing", "nan", "inf"])
def test_a_missing_or_non_finite_agent_value_is_a_failed_fetch_never_zero(tokenizer, broken):
    samples, prompt = agent_samples(tokenizer)
    if broken == "missing":
        del samples[2].info["turns"]
    else:
        samples[2].info["turns"] = torch.tensor([float(broken)])
    dimensions = parse_reward_servers(SERVERS)
    columns = request_columns(agent_args(), samples, dimensions, tokenizer)
    queries = [tokenizer.decode(s.sequences[0], skip_special_tokens=False) for s in samples]
    message = "agent dimension 'turns', sample 2: extra_logs\\['turns'\\] of the agent's last step is "
    with pytest.raises(RewardServerError, match=message + ("missing" if broken == "missing" else broken)):
        fetch_rewards(dimensions, queries, [prompt] * 4, [LABEL] * 4, **columns)
    batch = fetch_rewards(dimensions, queries, [prompt] * 4, [LABEL] * 4, on_failure="mask", **columns)
    assert batch.failed.tolist() == [False, False, True, False]
    assert batch.rewards[2].isnan().all() and not batch.rewards[[0, 1, 3]].isnan().any()


def test_an_agent_reward_no_dimension_reads_is_named_once(tokenizer, monkeypatch, caplog):
    samples, _ = agent_samples(tokenizer)
    monkeypatch.setattr(agent_rewards, "warned", False)
    logger = logging.getLogger("openrlhf_gd2po.agent_rewards")
    logger.addHandler(caplog.handler)
    try:
        servers = f"brevity={ANSWER_REWARD}#brevity,turns=agent#turns"
        args, dimensions = agent_args(servers), parse_reward_servers(servers)
        request_columns(args, samples, dimensions, tokenizer)
        request_columns(args, samples, dimensions, tokenizer)
        read = parse_reward_servers(SERVERS)
        monkeypatch.setattr(agent_rewards, "warned", False)
        request_columns(args, samples, read, tokenizer)  # `win=agent` reads it: nothing to say
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if "no --reward.servers dimension reads" in r.getMessage()]
    assert len(warnings) == 1 and "e.g. 1" in warnings[0] and "`NAME=agent`" in warnings[0], caplog.text


@pytest.mark.parametrize("estimator", ["gdpo", "grpo", "gd2po_hard", "gd2po_snr"])
def test_environment_tokens_carry_no_advantage_and_no_length(tiny_model, tokenizer, local_ray, estimator):
    """Agent dimensions through each estimator; the environment's tokens are in no advantage and no length."""
    from openrlhf.models import Actor
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    from openrlhf_gd2po.advantages import compute_advantages
    from openrlhf_gd2po.experience_maker import GD2POExperienceMaker

    # SERVERS' four dimensions disagree in sign on every rollout, so GD²PO's filters would keep none: they get the
    # two agent dimensions, which agree on rollouts 0 and 2 of each group (win 1, 0, 0, 1; calls 1, 1, 0, 0).
    servers = SERVERS if estimator in ("gdpo", "grpo") else "win=agent,calls=agent#tool_calls"
    names = [dimension.name for dimension in parse_reward_servers(servers)]
    args = agent_args(servers, estimator=estimator)
    samples = agent_samples(tokenizer)[0] + agent_samples(tokenizer)[0]  # two groups of N_SAMPLES
    assert len(samples) == 2 * N_SAMPLES
    # after the model's first token, the tokens it did not write
    environment = [~mask.bool() & (torch.arange(len(mask)) >= int(mask.nonzero()[0]))
                   for mask in (s.action_mask[0] for s in samples)]
    assert environment[0].sum() > 10 and environment[3].sum() == 0  # rollout 3 answers at once: no environment
    actor = Actor(str(tiny_model), attn_implementation="sdpa", param_dtype="bf16")
    maker = GD2POExperienceMaker(InProcessActorGroup(actor), None, None, None, FixedKLController(0.0),
                                 SimpleNamespace(args=args), tokenizer)  # fmt: skip
    experiences = maker.make_experience_batch(samples)
    rewards = torch.cat([torch.stack([e.info[f"reward/{name}"] for name in names], 1) for e in experiences])
    lengths = torch.stack([s.action_mask.sum() for s in samples])  # the model's tokens only
    expected = compute_advantages(rewards, torch.arange(8) // N_SAMPLES, estimator, lengths,
                                  snr_threshold=args.gd2po.snr_threshold)  # fmt: skip
    row = 0
    for experience in experiences:
        for advantages, action_mask in zip(experience.advantages, experience.action_mask.bool()):
            width = len(environment[row])  # the batch pads on the right
            assert not action_mask[:width][environment[row]].any()  # OpenRLHF's action mask leaves them out
            assert (advantages[:width][environment[row]] == 0).all()
            assert (advantages[~action_mask] == 0).all()
            assert torch.allclose(advantages[action_mask], expected.advantages[row].float()), row
            row += 1
    if estimator == "gdpo":  # masks nothing: every rollout has an advantage
        assert (expected.advantages != 0).all()
    if estimator.startswith("gd2po"):
        assert expected.keep_mask.tolist() == [True, False, True, False] * 2
    assert expected.advantages.any() and torch.equal(
        torch.cat([e.info["gd2po/keep"] for e in experiences]).bool(), expected.keep_mask)
